"""The coremltools-compatible config classes (mlqpipe.optimize.config) against coremltools 9.0's own:
the same defaults, the same values accepted and refused (as ModelError here), the same normalised values,
the dict / YAML format read the same way (coremltools' documented examples), and round trips."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlqpipe.errors import ModelError
from mlqpipe.optimize import (
    OpLinearQuantizerConfig,
    OpMagnitudePrunerConfig,
    OpPalettizerConfig,
    OpThresholdPrunerConfig,
    OptimizationConfig,
)

CLASSES = {c.__name__: c for c in (OpLinearQuantizerConfig, OpPalettizerConfig, OpMagnitudePrunerConfig, OpThresholdPrunerConfig)}


@pytest.fixture(scope="module")
def cto():
    return pytest.importorskip("coremltools.optimize.coreml")


def _lut(weight):
    return np.array([0.0, 1.0]), np.zeros(weight.size, dtype=np.uint8)


def normalised(ct_config, cls) -> dict:
    """A coremltools config's values in our normal form (dtype and granularity as strings, tuples)."""
    from coremltools.converters.mil.mil import types

    out = {}
    for f in dataclasses.fields(cls):
        v = getattr(ct_config, f.name)
        if f.name == "dtype":
            v = types.builtin_to_string(v)
        elif f.name == "granularity":
            v = v.name.lower()
        elif isinstance(v, list):
            v = tuple(v)
        out[f.name] = v
    return out


def ours_normalised(config) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


@pytest.mark.parametrize("name", CLASSES)
def test_defaults_are_coremltools_defaults(cto, name):
    cls = CLASSES[name]
    args = {"target_sparsity": 0.5} if cls is OpMagnitudePrunerConfig else {"nbits": 4} if cls is OpPalettizerConfig else {}
    assert ours_normalised(cls(**args)) == normalised(getattr(cto, name)(**args), cls)
    assert [f.name for f in dataclasses.fields(cls)] == [a.name for a in getattr(cto, name).__attrs_attrs__]


def _mil(name):
    from coremltools.converters.mil.mil import types

    return getattr(types, name)


CASES = [
    # (class, kwargs) — both accept or both refuse
    ("OpLinearQuantizerConfig", dict(mode="linear")),
    ("OpLinearQuantizerConfig", dict(mode="LINEAR")),
    ("OpLinearQuantizerConfig", dict(mode="linear_affine")),
    ("OpLinearQuantizerConfig", dict(mode=3)),
    ("OpLinearQuantizerConfig", dict(dtype="int4")),
    ("OpLinearQuantizerConfig", dict(dtype="uint4")),
    ("OpLinearQuantizerConfig", dict(dtype="uint8")),
    ("OpLinearQuantizerConfig", dict(dtype="fp32")),
    ("OpLinearQuantizerConfig", dict(dtype="int16")),
    ("OpLinearQuantizerConfig", dict(dtype="int2")),
    ("OpLinearQuantizerConfig", dict(dtype="float32")),
    ("OpLinearQuantizerConfig", dict(dtype=np.int8)),
    ("OpLinearQuantizerConfig", dict(dtype=np.uint8)),
    ("OpLinearQuantizerConfig", dict(dtype=np.int16)),
    ("OpLinearQuantizerConfig", dict(dtype=np.float32)),
    ("OpLinearQuantizerConfig", dict(dtype=lambda: _mil("int4"))),
    ("OpLinearQuantizerConfig", dict(dtype=lambda: _mil("uint8"))),
    ("OpLinearQuantizerConfig", dict(dtype=lambda: _mil("fp16"))),
    ("OpLinearQuantizerConfig", dict(granularity="per_tensor")),
    ("OpLinearQuantizerConfig", dict(granularity="per_block", block_size=64)),
    ("OpLinearQuantizerConfig", dict(granularity="per_grouped_channel")),
    ("OpLinearQuantizerConfig", dict(granularity="per_row")),
    ("OpLinearQuantizerConfig", dict(block_size=0)),
    ("OpLinearQuantizerConfig", dict(block_size=-1)),
    ("OpLinearQuantizerConfig", dict(granularity="per_block", block_size=[1, 32])),
    ("OpLinearQuantizerConfig", dict(block_size=(1, -1))),
    ("OpLinearQuantizerConfig", dict(block_size="32")),
    ("OpLinearQuantizerConfig", dict(weight_threshold=-1)),
    ("OpLinearQuantizerConfig", dict(weight_threshold=0)),
    ("OpLinearQuantizerConfig", dict(weight_threshold=2.5)),
    ("OpPalettizerConfig", dict()),
    ("OpPalettizerConfig", dict(mode="uniform")),
    ("OpPalettizerConfig", dict(mode="unique")),
    ("OpPalettizerConfig", dict(mode="unique", nbits=4)),
    ("OpPalettizerConfig", dict(mode="custom")),
    ("OpPalettizerConfig", dict(mode="custom", lut_function=_lut)),
    ("OpPalettizerConfig", dict(mode="custom", lut_function=3)),
    ("OpPalettizerConfig", dict(nbits=4, lut_function=_lut)),
    ("OpPalettizerConfig", dict(mode="linear", nbits=4)),
    ("OpPalettizerConfig", dict(nbits=3)),
    ("OpPalettizerConfig", dict(nbits=5)),
    ("OpPalettizerConfig", dict(nbits=16)),
    ("OpPalettizerConfig", dict(nbits=4, granularity="per_grouped_channel", group_size=16, channel_axis=1)),
    ("OpPalettizerConfig", dict(nbits=4, granularity="per_channel")),
    ("OpPalettizerConfig", dict(nbits=4, cluster_dim=2, enable_per_channel_scale=True, num_kmeans_workers=2)),
    ("OpPalettizerConfig", dict(nbits=4, enable_per_channel_scale=1)),
    ("OpPalettizerConfig", dict(nbits=4, cluster_dim=2.0)),
    ("OpMagnitudePrunerConfig", dict()),
    ("OpMagnitudePrunerConfig", dict(target_sparsity=0.5, n_m_ratio=(1, 2))),
    ("OpMagnitudePrunerConfig", dict(target_sparsity=1.5)),
    ("OpMagnitudePrunerConfig", dict(target_sparsity=-0.1)),
    ("OpMagnitudePrunerConfig", dict(target_sparsity=0.0)),
    ("OpMagnitudePrunerConfig", dict(target_sparsity=1.0)),
    ("OpMagnitudePrunerConfig", dict(target_sparsity=0.5, block_size=1)),
    ("OpMagnitudePrunerConfig", dict(target_sparsity=0.5, block_size=2)),
    ("OpMagnitudePrunerConfig", dict(target_sparsity=0.5, block_size=2, dim=1)),
    ("OpMagnitudePrunerConfig", dict(n_m_ratio=(1, 2), block_size=2)),
    ("OpMagnitudePrunerConfig", dict(n_m_ratio=(3, 4))),
    ("OpMagnitudePrunerConfig", dict(n_m_ratio=[3, 4], dim=0)),
    ("OpMagnitudePrunerConfig", dict(n_m_ratio=(5, 4))),
    ("OpMagnitudePrunerConfig", dict(n_m_ratio=(1, 2, 3))),
    ("OpMagnitudePrunerConfig", dict(target_sparsity=0.5, dim=0)),
    ("OpMagnitudePrunerConfig", dict(n_m_ratio=(1, 2), dim=2)),
    ("OpThresholdPrunerConfig", dict()),
    ("OpThresholdPrunerConfig", dict(threshold=0.5, minimum_sparsity_percentile=0.0)),
    ("OpThresholdPrunerConfig", dict(threshold=-1.0)),
    ("OpThresholdPrunerConfig", dict(minimum_sparsity_percentile=1.5)),
    ("OpThresholdPrunerConfig", dict(threshold="0.1")),
]


def _resolve(kwargs):
    return {k: v() if callable(v) and getattr(v, "__name__", "") == "<lambda>" else v for k, v in kwargs.items()}


@pytest.mark.parametrize("name, kwargs", CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_same_values_accepted_and_refused_as_coremltools(cto, name, kwargs):
    kwargs = _resolve(kwargs)
    try:
        theirs = getattr(cto, name)(**kwargs)
    except (ValueError, TypeError):
        theirs = None
    if theirs is None:
        with pytest.raises(ModelError, match=f"^{name}: "):
            CLASSES[name](**kwargs)
    else:
        assert ours_normalised(CLASSES[name](**kwargs)) == normalised(theirs, CLASSES[name])


def test_messages_say_what_to_use():
    with pytest.raises(ModelError, match=r"^OpLinearQuantizerConfig: dtype 'fp32' is not supported; use one of int8, uint8, int4, uint4"):
        OpLinearQuantizerConfig(dtype="fp32")
    with pytest.raises(ModelError, match=r"^OpLinearQuantizerConfig: dtype <class 'numpy.float32'> \(float32\) is not supported"):
        OpLinearQuantizerConfig(dtype=np.float32)
    with pytest.raises(ModelError, match=r"^OpPalettizerConfig: nbits 5 is not supported for palettization; use one of 1, 2, 3, 4, 6, 8$"):
        OpPalettizerConfig(nbits=5)
    with pytest.raises(ModelError, match=r"^OpPalettizerConfig: mode 'kmeans' needs nbits"):
        OpPalettizerConfig()
    with pytest.raises(ModelError, match=r"^OpMagnitudePrunerConfig: set exactly one of target_sparsity and n_m_ratio$"):
        OpMagnitudePrunerConfig()
    with pytest.raises(ModelError, match=r"^OpMagnitudePrunerConfig: target_sparsity must be in \[0, 1\], got 1.5$"):
        OpMagnitudePrunerConfig(target_sparsity=1.5)
    with pytest.raises(ModelError, match=r"granularity 'per_grouped_channel' is not supported; use one of 'per_tensor', 'per_channel', 'per_block'"):
        OpLinearQuantizerConfig(granularity="per_grouped_channel")


def test_documented_differences(cto):
    """Ints for floats are accepted (coremltools: TypeError); weight_threshold=None, non-positive group sizes
    and workers are refused at once (coremltools fails later)."""
    with pytest.raises(TypeError):
        cto.OpMagnitudePrunerConfig(target_sparsity=1)
    assert OpMagnitudePrunerConfig(target_sparsity=1) == OpMagnitudePrunerConfig(target_sparsity=1.0)
    assert OpThresholdPrunerConfig(threshold=0).threshold == 0.0
    cto.OpLinearQuantizerConfig(weight_threshold=None)
    for make in (lambda: OpLinearQuantizerConfig(weight_threshold=None), lambda: OpPalettizerConfig(nbits=4, group_size=0),
                 lambda: OpPalettizerConfig(nbits=4, num_kmeans_workers=0), lambda: OpPalettizerConfig(nbits=4, channel_axis="1")):
        with pytest.raises(ModelError):
            make()


def test_normal_forms_equality_hash_and_frozen():
    a, b = OpLinearQuantizerConfig(mode="linear", dtype=np.uint8), OpLinearQuantizerConfig(mode="LINEAR", dtype="uint8")
    assert a == b and hash(a) == hash(b) and a.mode == "LINEAR" and a.dtype == "uint8" and (a.nbits, a.signed) == (8, False)
    assert OpLinearQuantizerConfig(dtype="int4").nbits == 4
    assert OpLinearQuantizerConfig(block_size=[1, 32]).block_size == (1, 32)
    assert OpMagnitudePrunerConfig(target_sparsity=0.5, block_size=2).dim == 0
    assert OpMagnitudePrunerConfig(n_m_ratio=[1, 2]).dim == 1 and OpMagnitudePrunerConfig(n_m_ratio=[1, 2]).n_m_ratio == (1, 2)
    assert a != OpLinearQuantizerConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.mode = "LINEAR_SYMMETRIC"
    assert repr(OpThresholdPrunerConfig()) == "OpThresholdPrunerConfig(threshold=1e-12, minimum_sparsity_percentile=0.5, weight_threshold=2048)"


def test_granularity_enum_of_coremltools_is_accepted(cto):
    from coremltools.optimize.coreml._config import CompressionGranularity

    assert OpLinearQuantizerConfig(granularity=CompressionGranularity.PER_BLOCK).granularity == "per_block"


# -- OptimizationConfig -------------------------------------------------------------------------------------


def test_optimization_config_checks_and_mutators(cto):
    config = OptimizationConfig()
    assert (config.global_config, config.op_type_configs, config.op_name_configs) == (None, {}, {})
    config.set_global(OpLinearQuantizerConfig())
    config.set_op_type("conv", None)
    config.set_op_name("fc1", OpLinearQuantizerConfig(dtype="int4"))
    assert config == OptimizationConfig(OpLinearQuantizerConfig(), {"conv": None}, {"fc1": OpLinearQuantizerConfig(dtype="int4")})
    with pytest.raises(ModelError, match=r"global_config must be an op config"):
        OptimizationConfig(global_config={"mode": "linear"})
    with pytest.raises(ValueError):  # coremltools refuses structured pruning by op type on other ops, as we do
        cto.OptimizationConfig(op_type_configs={"matmul": cto.OpMagnitudePrunerConfig(n_m_ratio=(1, 2))})
    with pytest.raises(ModelError, match=r"op_type_configs\['matmul'\]: block or n:m pruning supports only op types conv, linear"):
        OptimizationConfig(op_type_configs={"matmul": OpMagnitudePrunerConfig(n_m_ratio=(1, 2))})
    with pytest.raises(ModelError, match=r"op_type_configs\['const'\] is not allowed"):
        config.set_op_type("const", OpLinearQuantizerConfig())
    with pytest.raises(ModelError, match=r"^prune_weights accepts only OpMagnitudePrunerConfig or OpThresholdPrunerConfig; "
                                         r"global_config is OpLinearQuantizerConfig$"):
        config.require("prune_weights", OpMagnitudePrunerConfig, OpThresholdPrunerConfig)
    config.require("linear_quantize_weights", OpLinearQuantizerConfig)


DOC_PALETTIZER = {  # coremltools' from_dict docstring examples
    "config_type": "OpPalettizerConfig",
    "global_config": {"mode": "kmeans", "nbits": 4},
    "op_type_configs": {"conv": {"mode": "uniform", "nbits": 1}},
    "op_name_configs": {"conv_1": {"mode": "unique"}},
}
DOC_PRUNER = {
    "config_type": "OpThresholdPrunerConfig",
    "global_config": {"threshold": 0.01},
    "op_type_configs": {"conv": {"config_type": "OpMagnitudePrunerConfig", "n_m_ratio": [3, 4]}},
}
DOC_YAML = """\
config_type: OpThresholdPrunerConfig
global_config:
    threshold: 0.01
op_type_configs:
    conv:
        config_type: OpMagnitudePrunerConfig
        n_m_ratio: [3, 4]
    linear: null
"""


def _same_as_coremltools(ours: OptimizationConfig, theirs) -> None:
    def norm(c):
        return None if c is None else (type(c).__name__, normalised(c, CLASSES[type(c).__name__]))

    def mine(c):
        return None if c is None else (type(c).__name__, ours_normalised(c))

    assert mine(ours.global_config) == norm(theirs.global_config)
    for key in ("op_type_configs", "op_name_configs"):
        assert {k: mine(v) for k, v in getattr(ours, key).items()} == {k: norm(v) for k, v in getattr(theirs, key).items()}


@pytest.mark.parametrize("d", [DOC_PALETTIZER, DOC_PRUNER, {"config_type": "OpLinearQuantizerConfig",
                                                             "global_config": {"dtype": "int4", "granularity": "per_block", "block_size": [1, 16]},
                                                             "op_name_configs": {"fc1": None}}])
def test_from_dict_reads_coremltools_format(cto, d):
    import copy

    before = copy.deepcopy(d)
    ours = OptimizationConfig.from_dict(d)
    assert d == before  # not modified (coremltools deletes config_type keys from its input)
    _same_as_coremltools(ours, cto.OptimizationConfig.from_dict(copy.deepcopy(d)))
    assert OptimizationConfig.from_dict(ours.to_dict()) == ours


def test_from_yaml_text_path_and_file(cto, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(DOC_YAML)
    expected = OptimizationConfig(OpThresholdPrunerConfig(threshold=0.01),
                                  {"conv": OpMagnitudePrunerConfig(n_m_ratio=(3, 4)), "linear": None})
    assert OptimizationConfig.from_yaml(DOC_YAML) == expected
    assert OptimizationConfig.from_yaml(str(path)) == expected
    assert OptimizationConfig.from_yaml(path) == expected
    assert OptimizationConfig.from_yaml(io.StringIO(DOC_YAML)) == expected
    _same_as_coremltools(expected, cto.OptimizationConfig.from_yaml(str(path)))
    assert OptimizationConfig.from_yaml(expected.to_yaml()) == expected


@pytest.mark.parametrize("d, message", [
    ({"global_config": {"threshold": 0.1}}, r"config_type must name a config class \(OpLinearQuantizerConfig, .*\), got None"),
    ({"config_type": "OpQuantizer"}, r"config_type must name a config class"),
    ({"config_type": "OpThresholdPrunerConfig", "op_name_config": {}}, r"unknown key\(s\) 'op_name_config'; the keys are config_type, global_config, op_type_configs, op_name_configs"),
    ({"config_type": "OpThresholdPrunerConfig", "global_config": {"threshhold": 0.1}},
     r"global_config: OpThresholdPrunerConfig: unknown argument\(s\) 'threshhold'; arguments: minimum_sparsity_percentile, threshold, weight_threshold"),
    ({"config_type": "OpPalettizerConfig", "global_config": {"mode": "custom", "lut_function": "m:f"}},
     r"unknown argument\(s\) 'lut_function' \(a function cannot come from a dict or YAML"),
    ({"config_type": "OpPalettizerConfig", "op_type_configs": [1]}, r"op_type_configs must be a mapping"),
    ({"config_type": "OpPalettizerConfig", "op_type_configs": {"conv": 4}}, r"op_type_configs\['conv'\] must be a mapping of arguments or null"),
    ({"config_type": "OpPalettizerConfig", "global_config": {"nbits": 5}}, r"global_config: OpPalettizerConfig: nbits 5 is not supported"),
])  # fmt: skip
def test_from_dict_errors(cto, d, message):
    with pytest.raises(ModelError, match=message):
        OptimizationConfig.from_dict(d)
    if d == {"config_type": "OpQuantizer"}:  # coremltools only looks the class up for an entry; we always do
        cto.OptimizationConfig.from_dict(dict(d))
        return
    with pytest.raises(Exception):  # noqa: B017  (coremltools: ValueError, TypeError or a cattrs error)
        cto.OptimizationConfig.from_dict(dict(d))


def test_from_yaml_errors(tmp_path):
    with pytest.raises(ModelError, match=r"is neither an existing file nor YAML text"):
        OptimizationConfig.from_yaml(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("config_type: [unclosed\n")
    with pytest.raises(ModelError, match=rf"^{bad}: not valid YAML"):
        OptimizationConfig.from_yaml(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ModelError, match=rf"^{bad}: expected a mapping"):
        OptimizationConfig.from_yaml(bad)
    with pytest.raises(ModelError, match=r"^YAML: OptimizationConfig.from_dict: unknown key"):
        OptimizationConfig.from_yaml("config_type: OpLinearQuantizerConfig\nglobal: {}\n")


def test_to_dict_refuses_a_function():
    config = OptimizationConfig(OpPalettizerConfig(mode="custom", lut_function=_lut))
    with pytest.raises(ModelError, match="lut_function cannot be written to a dict or YAML"):
        config.to_dict()


_linear = st.builds(OpLinearQuantizerConfig, mode=st.sampled_from(["linear", "linear_symmetric"]),
                    dtype=st.sampled_from(["int8", "uint8", "int4", "uint4"]),
                    granularity=st.sampled_from(["per_tensor", "per_channel", "per_block"]),
                    block_size=st.one_of(st.integers(0, 64), st.lists(st.integers(0, 8), min_size=2, max_size=4)),
                    weight_threshold=st.integers(0, 10**6))
_pal = st.builds(OpPalettizerConfig, mode=st.just("kmeans"), nbits=st.sampled_from([1, 2, 3, 4, 6, 8]),
                 granularity=st.sampled_from(["per_tensor", "per_grouped_channel"]), group_size=st.integers(1, 64),
                 cluster_dim=st.integers(1, 4), enable_per_channel_scale=st.booleans())
_prune = st.one_of(st.builds(OpMagnitudePrunerConfig, target_sparsity=st.floats(0, 1)),
                   st.builds(OpThresholdPrunerConfig, threshold=st.floats(0, 10), minimum_sparsity_percentile=st.floats(0, 1)))
_any = st.one_of(st.none(), _linear, _pal, _prune)


@given(_any, st.dictionaries(st.sampled_from(["conv", "linear", "matmul", "gather"]), _any, max_size=3),
       st.dictionaries(st.text("abc_", min_size=1, max_size=5), _any, max_size=3))
def test_dict_and_yaml_round_trips(global_config, by_type, by_name):
    config = OptimizationConfig(global_config, by_type, by_name)
    assert OptimizationConfig.from_dict(config.to_dict()) == config
    assert OptimizationConfig.from_yaml(config.to_yaml()) == config
