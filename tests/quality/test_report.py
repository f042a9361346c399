"""quality/report.py: the rows and metrics of a report on known specs (every number recomputed here with
numpy from the arrays the test wrote), flags, totals and the JSON text."""

import json
import math
from types import SimpleNamespace

import numpy as np

from mlqpipe.formats.nn.model import CoreMLModel
from mlqpipe.quality.report import build_report, flags, stage_rows, to_json, to_markdown
from mlqpipe.recipe.types import Stage
from tests.builders import add_inner_product, describe, model, network
from tests.metrics import snr_db

rng = np.random.default_rng(7)
SHAPES = {"a": (4, 6), "b": (4, 4), "c": (4, 4), "d": (4, 4)}
W = {n: rng.standard_normal(shape).astype(np.float32) for n, shape in SHAPES.items()}
NOISE = {"a": 1e-3, "b": 2e-3, "c": 1.5e-3, "d": 0.3}  # d: far noisier than the rest
AFTER = {n: (W[n] + NOISE[n] * rng.standard_normal(W[n].shape)).astype(np.float16) for n in W}


def _spec(after: bool):
    """innerProducts a (6 -> 4), b, c, d (4 -> 4), with bias. `after`: their weights stored as float16 with
    known noise (AFTER); the biases stay float32 (unchanged, so no report row)."""
    m = model()
    nn = network(m)
    prev = "x"
    for name, (oc, ic) in SHAPES.items():
        out = "y" if name == "d" else f"h_{name}"
        p = add_inner_product(nn, name, prev, out, ic=ic, oc=oc, seed=1).innerProduct
        if after:
            p.ClearField("weights")
            p.weights.float16Value = AFTER[name].astype("<f2").tobytes()
        else:
            p.weights.floatValue = W[name].astype("<f4").tobytes()
        prev = out
    return describe(m, [("x", [6])], [("y", [4])])


def _expected(name):
    before, after = W[name].astype(np.float64), AFTER[name].astype(np.float64)
    noise = after - before
    return {"snr_db": snr_db(before, after), "max_abs_error": np.abs(noise).max(),
            "relative_l2_error": math.sqrt(np.sum(noise**2) / np.sum(before**2)), "count": before.size}


STAGES = [Stage(name="f", mode="fold"), Stage(name="half", mode="fp16")]


def _models(*specs):
    return [CoreMLModel(s) for s in specs]


def _specs():
    before = _spec(False)
    return _models(before, before, _spec(True))  # before the fold, after it (nothing folded), after fp16


def test_rows_and_metrics():
    decisions = [[], [SimpleNamespace(id=f"{n}:weights", rule="halves") for n in W]]
    rows = stage_rows(_specs(), STAGES, decisions)
    assert [r["id"] for r in rows] == ["a:weights", "b:weights", "c:weights", "d:weights"]  # biases unchanged: no row
    for r in rows:
        name = r["layer"]
        want = _expected(name)
        assert (r["type"], r["field"], r["stage"], r["mode"], r["nbits"], r["rule"]) == ("innerProduct", "weights", "half", "fp16", None, "halves")
        assert r["shape"] == ([4, 6] if name == "a" else [4, 4])
        assert (r["bytes_before"], r["bytes_after"]) == (4 * want["count"], 2 * want["count"])
        assert math.isclose(r["snr_db"], want["snr_db"], rel_tol=1e-9)
        assert math.isclose(r["max_abs_error"], want["max_abs_error"], rel_tol=1e-9)
        assert math.isclose(r["relative_l2_error"], want["relative_l2_error"], rel_tol=1e-9)
    assert rows[3]["snr_db"] < rows[0]["snr_db"] - 15


def test_identical_values_give_infinite_snr():
    before = _spec(False)
    after = _spec(False)
    nn = network(after)
    w = np.frombuffer(nn.layers[1].innerProduct.weights.floatValue, "<f4")
    exact = np.round(w * 8) / 8  # float16 holds these exactly
    nn.layers[1].innerProduct.weights.floatValue = exact.astype("<f4").tobytes()
    before_nn = network(before)
    before_nn.layers[1].innerProduct.weights.floatValue = exact.astype("<f4").tobytes()
    nn.layers[1].innerProduct.ClearField("weights")
    nn.layers[1].innerProduct.weights.float16Value = exact.astype("<f2").tobytes()
    (row,) = stage_rows(_models(before, after), [Stage(name="half", mode="fp16")])
    assert row["id"] == "b:weights" and row["snr_db"] == math.inf and row["max_abs_error"] == 0 and row["relative_l2_error"] == 0
    assert row["rule"] is None


def test_flags_name_the_outlier():
    rows = stage_rows(_specs(), STAGES)
    flagged = flags(rows)
    assert [f["id"] for f in flagged] == ["d:weights"]
    median = float(np.median([_expected(n)["snr_db"] for n in W]))
    assert math.isclose(flagged[0]["median_snr_db"], median, rel_tol=1e-9)
    assert "more bits" in flagged[0]["hint"]
    assert flags(rows[:2]) == []  # fewer than three measured weights: nothing to compare with


def test_report_totals_versions_and_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    specs = _specs()
    specs[-1].spec.specificationVersion = 2
    job = SimpleNamespace(input=tmp_path / "m.mlmodel", output=tmp_path / "out" / "m.q.mlmodel", stages=STAGES)
    recipe = SimpleNamespace(path=tmp_path / "r.yaml")
    report = build_report(job, recipe, specs)
    before, after = len(specs[0].SerializeToString()), len(specs[-1].SerializeToString())
    assert report["totals"] == {"bytes_before": before, "bytes_after": after, "compression": round(before / after, 4)}
    assert (report["input"], report["output"], report["recipe"]) == ("m.mlmodel", "out/m.q.mlmodel", "r.yaml")
    assert report["specification_version"]["before"] == 1 and report["specification_version"]["after"] == 2
    assert report["status"] == "passed" and report["gates"] == [] and report["evaluation"] is None
    assert [f["id"] for f in report["flags"]] == ["d:weights"]
    doc = json.loads(to_json(report))
    assert "_rows" not in doc and len(doc["weights"]) == 4
    assert doc["weights"][0]["snr_db"] == round(_expected("a")["snr_db"], 6)
    assert to_json(report) == to_json(build_report(job, recipe, _specs_v2()))  # deterministic
    md = to_markdown(report)
    assert "`d:weights`: SNR" in md and f"Size: {before} → {after} bytes" in md


def _specs_v2():
    specs = _specs()
    specs[-1].spec.specificationVersion = 2
    return specs
