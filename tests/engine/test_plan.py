"""engine/plan.py: the decision for every weight in every stage, the size estimates (computed here from the
layer sizes), and the problems a plan finds (rules that match nothing, re-quantizing, half-float16 layers)."""

import pytest

from mlqpipe.engine.plan import plan_recipe
from mlqpipe.recipe import load_recipe
from tests.builders import conv_batchnorm_model, small_model

# small_model(): conv1 (8 out, 4 in, 3x3, bias) -> relu -> dense (32 -> 10, bias)
COUNTS = {"conv1:weights": 8 * 4 * 3 * 3, "conv1:bias": 8, "dense:weights": 10 * 32, "dense:bias": 10}


def _plan(tmp_path, monkeypatch, rules: str, stages: str, spec=None):
    (tmp_path / "m.mlmodel").write_bytes((spec or small_model()).SerializeToString())
    (tmp_path / "r.yaml").write_text(
        "version: 1\nmodels:\n  - {input: m.mlmodel, output: out/m.mlmodel}\n"
        f"rules:\n{rules}\nstages:\n{stages}\n"
    )
    monkeypatch.chdir(tmp_path)
    plans, problems = plan_recipe(load_recipe("r.yaml"))
    assert len(plans) == 1 and not (tmp_path / "out").exists()  # a plan writes nothing
    return plans[0], problems


RULES = """\
  convs: {layer_type: convolution}
  dense_w: {layer: dense, field: weights}
  no_bias: {field: bias, exclude: true}
  rest: {storage: float32}"""
STAGES = """\
  - {name: big, mode: linear, nbits: 8, rules: [no_bias, convs]}
  - {name: lut, mode: kmeans_lut, nbits: 4, rules: [dense_w]}
  - {name: rest, mode: fp16, rules: [rest]}"""


def _table(plan):
    return {(sp.stage.name, d.id): (d.action, d.rule, d.storage_before, d.storage_after) for sp in plan.stages for d in sp.decisions}


def test_decisions_follow_each_stage_and_the_state_it_leaves(tmp_path, monkeypatch):
    plan, problems = _plan(tmp_path, monkeypatch, RULES, STAGES)
    assert problems == []
    assert _table(plan) == {
        ("big", "conv1:weights"): ("quantize", "convs", "float32", "linear8"),
        ("big", "conv1:bias"): ("keep", "no_bias", "float32", "float32"),  # excluded first, convs never asked
        ("big", "dense:weights"): ("keep", None, "float32", "float32"),
        ("big", "dense:bias"): ("keep", "no_bias", "float32", "float32"),
        ("lut", "conv1:weights"): ("keep", None, "linear8", "linear8"),  # the state the previous stage left
        ("lut", "conv1:bias"): ("keep", None, "float32", "float32"),
        ("lut", "dense:weights"): ("quantize", "dense_w", "float32", "lut4"),
        ("lut", "dense:bias"): ("keep", None, "float32", "float32"),
        ("rest", "conv1:weights"): ("keep", None, "linear8", "linear8"),  # storage: float32 no longer holds
        ("rest", "conv1:bias"): ("quantize", "rest", "float32", "float16"),
        ("rest", "dense:weights"): ("keep", None, "lut4", "lut4"),
        ("rest", "dense:bias"): ("quantize", "rest", "float32", "float16"),
    }
    reasons = {(sp.stage.name, d.id): d.reason for sp in plan.stages for d in sp.decisions}
    assert reasons[("big", "conv1:bias")] == "excluded by rule 'no_bias'"
    assert reasons[("big", "dense:weights")] == "no rule of this stage matches"
    assert reasons[("big", "conv1:weights")] == "rule 'convs'"


def _estimate(storage: str, rid: str) -> int:
    n = COUNTS[rid]
    if storage == "float32":
        return 4 * n
    if storage == "float16":
        return 2 * n
    bits = int(storage[-1])
    packed = -(-n * bits // 8)
    if storage.startswith("lut"):
        return packed + 4 * 2**bits  # the table, float32
    channels = 8 if rid.startswith("conv1:weights") else (10 if rid == "dense:weights" else 1)
    return packed + 8 * channels  # a float32 scale and bias per output channel


def test_size_estimates(tmp_path, monkeypatch):
    plan, _ = _plan(tmp_path, monkeypatch, RULES, STAGES)
    for sp in plan.stages:
        for d in sp.decisions:
            assert (d.bytes_before, d.bytes_after) == (_estimate(d.storage_before, d.id), _estimate(d.storage_after, d.id)), d
    assert plan.bytes_before == 4 * sum(COUNTS.values())
    assert plan.bytes_after == (288 + 8 * 8) + 2 * 8 + (160 + 64) + 2 * 10
    assert (plan.version_before, plan.version_after) == (1, 3)  # quantized weights need specification 3


def test_fp16_only_raises_the_version_to_2(tmp_path, monkeypatch):
    plan, _ = _plan(tmp_path, monkeypatch, "  all: {}", "  - {name: half, mode: fp16, rules: [all]}")
    assert (plan.version_before, plan.version_after) == (1, 2)
    assert plan.bytes_after == 2 * sum(COUNTS.values())


def test_a_fold_stage_changes_what_later_stages_see(tmp_path, monkeypatch):
    plan, problems = _plan(tmp_path, monkeypatch, "  all: {}", "  - {name: f, mode: fold}\n  - {name: q, mode: linear, nbits: 6, rules: [all]}",
                           spec=conv_batchnorm_model(scale_after=True))
    assert problems == []
    assert [(f.into, f.removed) for f in plan.stages[0].folds] == [("conv", "bn"), ("conv", "sc")]
    assert plan.stages[0].decisions == []
    assert _table(plan) == {("q", "conv:weights"): ("quantize", "all", "float32", "linear6"),
                            ("q", "conv:bias"): ("quantize", "all", "float32", "linear6")}
    assert plan.bytes_before == 4 * (4 * 3 * 3 * 3 + 4 + 4 * 4 + 4)  # conv, bias, batchnorm x4, scale
    assert plan.bytes_after == (-(-108 * 6 // 8) + 8 * 4) + (-(-4 * 6 // 8) + 8)


def test_a_rule_matching_nothing_is_a_problem(tmp_path, monkeypatch):
    plan, problems = _plan(tmp_path, monkeypatch, "  convs: {layer_type: convolution}\n  ghost: {layer: no_such_layer}",
                           "  - {name: q, mode: linear, nbits: 8, rules: [ghost, convs]}")
    assert [p.message for p in problems] == ["rule 'ghost' matches no weight in any of this recipe's 1 model(s)"]
    assert problems[0].line == 6  # where the rule is written
    assert plan.matched_rules == {"convs"}


def test_optional_rule_matching_nothing_is_fine(tmp_path, monkeypatch):
    _, problems = _plan(tmp_path, monkeypatch, "  ghost: {layer: no_such_layer, optional: true}",
                        "  - {name: q, mode: linear, nbits: 8, rules: [ghost]}")
    assert problems == []


def test_quantizing_again_is_an_error_decision_and_a_problem(tmp_path, monkeypatch):
    plan, problems = _plan(tmp_path, monkeypatch, "  convs: {layer_type: convolution}",
                           "  - {name: a, mode: linear, nbits: 8, rules: [convs]}\n  - {name: b, mode: kmeans_lut, nbits: 4, rules: [convs]}")
    second = {d.id: (d.action, d.reason) for d in plan.stages[1].decisions}
    assert second["conv1:weights"] == ("error", "already quantized (linear8)")
    assert second["dense:weights"][0] == "keep"
    assert len(problems) == 2 and all("stage 'b' would quantize conv1:" in p.message and "already quantized (linear8)" in p.message
                                      and "selected by rule 'convs'" in p.message for p in problems)
    assert "add a dequantize stage" in problems[0].hint


def test_dequantize_then_quantize_is_fine(tmp_path, monkeypatch):
    plan, problems = _plan(tmp_path, monkeypatch, "  convs: {layer_type: convolution}",
                           "  - {name: a, mode: linear, nbits: 8, rules: [convs]}\n  - {name: d, mode: dequantize, rules: [convs]}\n"
                           "  - {name: b, mode: kmeans_lut, nbits: 4, rules: [convs]}")
    assert problems == []
    assert _table(plan)[("d", "conv1:weights")] == ("quantize", "convs", "linear8", "float32")
    assert _table(plan)[("b", "conv1:weights")] == ("quantize", "convs", "float32", "lut4")


def test_half_float16_layer_is_a_problem(tmp_path, monkeypatch):
    plan, problems = _plan(tmp_path, monkeypatch, "  dense_w: {layer: dense, field: weights}",
                           "  - {name: h, mode: fp16, rules: [dense_w]}")
    assert [p.message for p in problems] == ["stage 'h' would leave layer dense mixing float16 and float32"]
    assert "field: [weights, bias]" in problems[0].hint


def test_python_rule_is_planned_as_custom(tmp_path, monkeypatch):
    (tmp_path / "team_rules.py").write_text("def pick(rec):\n    raise AssertionError('a plan must not run custom code')\n")
    plan, problems = _plan(tmp_path, monkeypatch, "  team: {python: 'team_rules:pick', layer: conv1}",
                           "  - {name: q, mode: linear, nbits: 8, rules: [team]}")
    got = {d.id: (d.action, d.rule, d.storage_after) for d in plan.stages[0].decisions}
    assert got == {"conv1:weights": ("custom", "team", "float32"), "conv1:bias": ("custom", "team", "float32"),
                   "dense:weights": ("keep", None, "float32"), "dense:bias": ("keep", None, "float32")}
    assert problems == []


@pytest.mark.invalid_models("m.mlmodel", reason="not a model at all: the input the plan must report")
def test_an_unreadable_model_is_a_problem_not_a_traceback(tmp_path, monkeypatch):
    (tmp_path / "m.mlmodel").write_bytes(b"not a model")
    (tmp_path / "r.yaml").write_text("version: 1\nmodels:\n  - {input: m.mlmodel, output: out/m.mlmodel}\n"
                                     "rules:\n  all: {}\nstages:\n  - {mode: linear, nbits: 8, rules: [all]}\n")
    monkeypatch.chdir(tmp_path)
    plans, problems = plan_recipe(load_recipe("r.yaml"))
    assert not plans[0].loaded and plans[0].stages == []
    assert len(problems) == 1 and "m.mlmodel" in problems[0].message and problems[0].line == 3
