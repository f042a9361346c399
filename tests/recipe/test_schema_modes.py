"""schemas/recipe.schema.json stays static JSON for editors; this keeps its modes equal to the mode
registry (mlqpipe/engine/modes.py): the mode enum, which modes take nbits and in what range, which need a
function, which may round like coremltools. Probed with jsonschema itself, so the if/then rules are tested
for what they do, not for how they are written."""

import pytest
from jsonschema import Draft202012Validator

from mlqpipe.engine.modes import MODES, NBITS, STAGE_MODES
from mlqpipe.recipe.schema_check import _forbidden, stage_nbits
from mlqpipe.schema import recipe_schema

STAGE = recipe_schema()["$defs"]["stage"]
VALID = Draft202012Validator(STAGE)


def _stage(mode, **extra):
    mode_entry = MODES.get(mode)
    base = {"mode": mode, "rules": ["r"]}
    if mode_entry and "function" in mode_entry.needs:
        base["function"] = "m:f"
    if mode == "prune" and not {"n_m", "threshold"} & set(extra):
        base["target_sparsity"] = 0.5
    return {**base, **extra}


# a valid value of every weight setting a stage may take (the schema's types)
SAMPLES = {"coremltools_rounding": True, "dtype": "int4", "granularity": "per_tensor", "block_size": 32,
           "group_size": 16, "channel_axis": 0, "cluster_dim": 2, "per_channel_scale": True, "lut_dtype": "int8",
           "target_sparsity": 0.5, "n_m": [2, 4], "dim": 1, "threshold": 0.01, "minimum_sparsity": 0.5, "joint": True}


def test_mode_enum_is_the_registry():
    assert STAGE["properties"]["mode"]["enum"] == list(STAGE_MODES)


@pytest.mark.parametrize("mode", list(MODES))
def test_nbits_rules_are_the_registry(mode):
    m = MODES[mode]
    accepted = {n for n in range(0, NBITS[1] + 3) if VALID.is_valid(_stage(mode, nbits=n))}
    assert accepted == (set(range(m.nbits[0], m.nbits[1] + 1)) if m.nbits else set())
    # n-bit modes require nbits, unless a format finds it elsewhere (ML programs: dtype, the weight, the LUT)
    assert VALID.is_valid(_stage(mode)) == (m.nbits is None or bool(m.infers_nbits))
    if m.nbits:
        assert stage_nbits(mode) == m.nbits  # what recipe/load.py checks per-model overrides against
    assert _forbidden("nbits", {"mode": mode}) == (m.nbits is None)


@pytest.mark.parametrize("mode", list(MODES))
def test_needs_and_settings_are_the_registry(mode):
    m = MODES[mode]
    nbits = {"nbits": m.nbits[0]} if m.nbits else {}
    with_function = {**_stage(mode, **nbits), "function": "m:f"}
    without = {k: v for k, v in with_function.items() if k != "function"}
    assert VALID.is_valid(with_function) == ("function" in m.needs)
    assert VALID.is_valid(without) == ("function" not in m.needs)
    assert VALID.is_valid(_stage(mode, **nbits, coremltools_rounding=True)) == m.coremltools_rounding
    assert _forbidden("coremltools_rounding", {"mode": mode}) == (not m.coremltools_rounding)
    assert ("coremltools_rounding" in m.all_keys) == m.coremltools_rounding
    assert _forbidden("function", {"mode": mode}) == ("function" not in m.needs)
    assert not VALID.is_valid(_stage(mode, **nbits, fold=["scale"]))  # only fold stages take a fold list


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("key", sorted(SAMPLES))
def test_setting_keys_are_the_registry(mode, key):
    """The schema takes a weight setting in exactly the modes some format reads it in (the plan then
    refuses it, located, for a format that does not)."""
    m = MODES[mode]
    nbits = {"nbits": 4} if m.nbits and not m.infers_nbits else {}
    stage = _stage(mode, **nbits, **{key: SAMPLES[key]})
    if mode == "prune" and key == "minimum_sparsity":
        stage = {**{k: v for k, v in stage.items() if k != "target_sparsity"}, "threshold": 0.1}
    if key == "granularity" and mode in ("linear", "linear_symmetric", "linear_lut", "kmeans_lut", "unique_lut", "custom_lut"):
        stage["granularity"] = "per_tensor"
    assert VALID.is_valid(stage) == (key in m.all_keys), stage
    assert _forbidden(key, {"mode": mode}) == (key not in m.all_keys)


def test_granularity_follows_the_mode():
    assert VALID.is_valid(_stage("linear", granularity="per_block"))
    assert not VALID.is_valid(_stage("linear", granularity="per_grouped_channel"))
    assert VALID.is_valid(_stage("kmeans_lut", nbits=4, granularity="per_grouped_channel"))
    assert not VALID.is_valid(_stage("kmeans_lut", nbits=4, granularity="per_block"))


def test_prune_takes_exactly_one_way_of_pruning():
    assert not VALID.is_valid({"mode": "prune", "rules": ["r"]})
    assert not VALID.is_valid({"mode": "prune", "rules": ["r"], "target_sparsity": 0.5, "threshold": 0.1})
    assert VALID.is_valid({"mode": "prune", "rules": ["r"], "n_m": [2, 4], "dim": 0})


def test_fold_is_a_stage_mode_without_weight_settings():
    assert VALID.is_valid({"mode": "fold"}) and VALID.is_valid({"mode": "fold", "fold": ["bias"]})
    for extra in ({"nbits": 4}, {"function": "m:f"}, {"coremltools_rounding": True}):
        assert not VALID.is_valid({"mode": "fold", **extra})
        assert _forbidden(next(iter(extra)), {"mode": "fold"})


def test_coremltools_names_and_aliases_resolve():
    from mlqpipe.engine.compat import _CT_MODES
    from mlqpipe.engine.modes import canonical_mode

    assert set(_CT_MODES.values()) <= set(MODES)
    assert list(_CT_MODES) == ["linear", "linear_symmetric", "linear_lut", "kmeans_lut", "kmeans", "custom_lut", "dequantization"]
    for m in MODES.values():
        assert all(canonical_mode(a) == m.name for a in m.aliases)
