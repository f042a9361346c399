"""Weights whose size their layer does not state (PReLU alpha: 1 or C values) are measured and evaluated
once quantized, like every other weight the engine can quantize."""

import json

import numpy as np
import pytest

import mlqpipe
from mlqpipe.cli import main
from tests.builders import add_conv, describe, model, network, set_float


def prelu_model(per_channel: bool = True) -> bytes:
    m = model()
    nn = network(m)
    add_conv(nn, "conv", "x", "c", oc=6, kc=3, seed=1)
    alpha = nn.layers.add(name="act", input=["c"], output=["y"]).activation.PReLU.alpha
    set_float(alpha, np.linspace(0.05, 0.3, 6 if per_channel else 1))
    return describe(m, [("x", [3, 8, 8])], [("y", [6, 6, 6])]).SerializeToString()


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("mode, nbits", [("linear", 4), ("linear", 8), ("kmeans_lut", 2), ("linear_lut", 3)])
def test_quantized_prelu_alpha_is_reported_and_evaluated(tmp_path, monkeypatch, capsys, per_channel, mode, nbits):
    (tmp_path / "m.mlmodel").write_bytes(prelu_model(per_channel))
    (tmp_path / "r.yaml").write_text(
        "version: 1\nmodels:\n  - {input: m.mlmodel, output: out/m.mlmodel, evaluation: {random_inputs: 8}}\n"
        f"rules:\n  everything: {{}}\nstages:\n  - {{mode: {mode}, nbits: {nbits}, rules: [everything]}}\n"
        "gates: {max_output_error: 0.5}\n"
    )
    monkeypatch.chdir(tmp_path)
    assert main(["quantize", "r.yaml"]) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "m.report.json").read_text())
    rows = {w["id"]: w for w in report["weights"]}
    alpha = rows["act:PReLU.alpha"]
    assert alpha["mode"] == mode and alpha["shape"] == [6 if per_channel else 1]
    assert isinstance(alpha["snr_db"], (float, str)) and alpha["relative_l2_error"] < 0.5
    assert report["evaluation"]["evaluated"] is True, report["evaluation"]
    stored = {str(r.storage) for r in mlqpipe.inventory(mlqpipe.load_model(tmp_path / "out" / "m.mlmodel").spec)}
    assert len(stored) == 1 and stored.pop().endswith(str(nbits))
