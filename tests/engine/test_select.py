"""engine/select.py: each rule condition on its own, first-match precedence, exclude, and python rules that
a plan reports as pending (and a build runs)."""

import uuid

import pytest

from mlqpipe.engine.select import PENDING, Match, RuleMatcher, decide
from mlqpipe.formats.nn.inventory import inventory
from mlqpipe.formats.nn.model import CoreMLModel
from mlqpipe.recipe.types import CoremltoolsSelector, Range, Rule
from tests.builders import add_activation, add_conv, add_inner_product, model, network

ALL = {
    "conv1:weights", "conv1:bias", "dw:weights", "dw:bias", "dense_1:weights", "dense_1:bias",
    "dense_2:weights", "branch.ifBranch/inner_fc:weights",
}


@pytest.fixture(scope="module")
def spec():
    """conv1 (8 out, 4 in, 3x3) -> depthwise dw (8, groups 8) -> relu -> dense_1 (32 -> 16) -> dense_2 (16 ->
    4, float16, no bias); a branch whose if-network holds inner_fc (4 -> 4, no bias)."""
    m = model()
    nn = network(m)
    add_conv(nn, "conv1", "x", "a", oc=8, kc=4, seed=1)
    add_conv(nn, "dw", "a", "b", oc=8, kc=1, groups=8, seed=2)
    add_activation(nn, "relu", "b", "r")
    add_inner_product(nn, "dense_1", "r", "d1", ic=32, oc=16, seed=3)
    add_inner_product(nn, "dense_2", "d1", "y", ic=16, oc=4, bias=False, dtype="<f2", seed=4)
    branch = nn.layers.add(name="branch", input=["y"], output=[]).branch
    add_inner_product(branch.ifBranch, "inner_fc", "y", "z", ic=4, oc=4, bias=False, seed=5)
    assert {r.id for r in inventory(m)} == ALL
    return m


def _selected(spec, **conditions) -> set[str]:
    m = RuleMatcher(Rule(name="r", **conditions))
    m.prepare(CoreMLModel(spec))
    return {r.id for r in inventory(spec) if m.matches(r)}


@pytest.mark.parametrize("conditions, expected", [
    ({}, ALL),
    ({"layer": ("dense_*",)}, {"dense_1:weights", "dense_1:bias", "dense_2:weights"}),
    ({"layer": ("dense",)}, set()),  # a glob matches the whole name
    ({"layer": ("conv1", "dw")}, {"conv1:weights", "conv1:bias", "dw:weights", "dw:bias"}),
    ({"layer_regex": ("dense_[2-9]",)}, {"dense_2:weights"}),
    ({"layer_regex": ("dense",)}, set()),  # full match, not search
    ({"layer_type": ("convolution",)}, {"conv1:weights", "conv1:bias", "dw:weights", "dw:bias"}),
    ({"field": ("bias",)}, {"conv1:bias", "dw:bias", "dense_1:bias"}),
    ({"network": ("branch.*",)}, {"branch.ifBranch/inner_fc:weights"}),
    ({"count": Range(min=100)}, {"conv1:weights", "dense_1:weights"}),  # 288 and 512 values
    ({"count": Range(max=8)}, {"conv1:bias", "dw:bias"}),
    ({"count": Range(min=64, max=72)}, {"dense_2:weights", "dw:weights"}),  # 64 and 72
    ({"out_channels": Range(min=16)}, {"dense_1:weights", "dense_1:bias"}),
    ({"in_channels": Range(max=4), "layer_type": ("innerProduct",)}, {"branch.ifBranch/inner_fc:weights"}),
    ({"kernel_channels": Range(min=2)}, {"conv1:weights", "conv1:bias"}),
    ({"layer_weight_count": Range(min=500)}, {"dense_1:weights", "dense_1:bias"}),  # the layer's weights decide
    ({"depthwise": True}, {"dw:weights", "dw:bias"}),
    ({"depthwise": False, "layer_type": ("convolution",)}, {"conv1:weights", "conv1:bias"}),
    ({"storage": ("float16",)}, {"dense_2:weights"}),
    ({"position": ("first",)}, {"conv1:weights", "conv1:bias"}),
    ({"position": ("last",)}, {"dense_2:weights"}),  # top-level network only
    ({"layer": ("dense_*",), "field": ("weights",), "storage": ("float32",)}, {"dense_1:weights"}),  # all must hold
])
def test_each_condition(spec, conditions, expected):
    assert _selected(spec, **conditions) == expected


def test_storage_quantized_matches_quantized_weights_only(spec):
    import mlqpipe

    with pytest.warns(UserWarning, match="already breaks a Core ML rule"):  # no declared inputs: fine here
        q = mlqpipe.quantize_weights(spec, 8, "linear", selector=lambda rec: rec.layer == "dense_1").spec
    assert _selected(q, storage=("quantized",)) == {"dense_1:weights", "dense_1:bias"}
    assert _selected(q, storage=("float32",)) == ALL - {"dense_1:weights", "dense_1:bias", "dense_2:weights"}


def test_coremltools_selector_condition(spec):
    # coremltools' default selector: every weight of layers it quantizes (the branch's inner layer too)
    sel = CoremltoolsSelector("advanced", (("minimum_conv_kernel_channels", 4), ("minimum_conv_weight_count", 1)))
    assert _selected(spec, coremltools_selector=sel, layer_type=("convolution",)) == {"conv1:weights", "conv1:bias"}


def _decide(spec, *rules):
    matchers = [RuleMatcher(r) for r in rules]
    for m in matchers:
        m.prepare(CoreMLModel(spec))
    return {r.id: decide(r, matchers) for r in inventory(spec)}


def test_first_listed_matching_rule_decides(spec):
    got = _decide(spec,
                  Rule(name="keep_dw", depthwise=True, exclude=True),
                  Rule(name="convs", layer_type=("convolution",)),
                  Rule(name="weights", field=("weights",)))
    assert got["dw:weights"] == Match("keep_dw", False) and got["dw:bias"] == Match("keep_dw", False)
    assert got["conv1:weights"] == Match("convs", True) and got["conv1:bias"] == Match("convs", True)
    assert got["dense_1:weights"] == Match("weights", True)
    assert got["dense_1:bias"] == Match(None, False)  # no listed rule matches: left alone


def test_order_reverses_the_outcome(spec):
    include_first = _decide(spec, Rule(name="convs", layer_type=("convolution",)), Rule(name="keep_dw", depthwise=True, exclude=True))
    exclude_first = _decide(spec, Rule(name="keep_dw", depthwise=True, exclude=True), Rule(name="convs", layer_type=("convolution",)))
    assert include_first["dw:weights"] == Match("convs", True)
    assert exclude_first["dw:weights"] == Match("keep_dw", False)
    assert include_first["conv1:weights"] == exclude_first["conv1:weights"] == Match("convs", True)


def test_no_rules_decides_nothing(spec):
    assert set(_decide(spec).values()) == {Match(None, False)}


def test_python_rule_is_pending_in_a_plan(spec):
    """A plan (allow_custom=None) never imports the code: every weight the other conditions let through is
    pending, decided by that rule; the others fall through to later rules."""
    rule = Rule(name="team", python="no_such_module_anywhere:select", layer=("dense_*",))
    m = RuleMatcher(rule)
    m.prepare(CoreMLModel(spec))
    assert m.matches(next(r for r in inventory(spec) if r.id == "dense_1:weights")) == PENDING
    got = _decide(spec, rule, Rule(name="rest"))
    assert got["dense_1:weights"] == Match("team", True, pending=True)
    assert got["conv1:weights"] == Match("rest", True)
    excluded = _decide(spec, Rule(name="team", python="no_such_module_anywhere:select", exclude=True))
    assert excluded["conv1:weights"] == Match("team", False, pending=True)


def test_python_rule_runs_in_a_build(spec, tmp_path):
    name = f"sel_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("def select(rec):\n    return rec.count >= 100\n")
    m = RuleMatcher(Rule(name="team", python=f"{name}:select"), python_path=(tmp_path,), allow_custom=True)
    m.prepare(CoreMLModel(spec))
    assert {r.id for r in inventory(spec) if m.matches(r) is True} == {"conv1:weights", "dense_1:weights"}
    assert all(m.matches(r) is False for r in inventory(spec) if r.count < 100)
