"""A classic network with the newly evaluated layers end to end: deconvolution -> GRU -> biLSTM, quantized
with mlqpipe's coremltools-compatible API and compared with its float model by the evaluator."""

from __future__ import annotations

import numpy as np

import mlqpipe
from mlqpipe.formats.nn.inventory import inventory
from mlqpipe.quality.evaluate.compare import evaluate
from tests.quality.evaluate import harness as H


def _model():
    rng = np.random.default_rng(7)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.4).astype(np.float32)

    seq, hidden, o = 4, 6, 5
    b = H.builder([("img", (2, 3, 3)), ("h0", (hidden,)), ("hf", (o,)), ("cf", (o,)), ("hb", (o,)), ("cb", (o,))],
                  [("y", None), ("h", None), ("hf_out", None), ("cf_out", None), ("hb_out", None), ("cb_out", None)], nd=False)
    for f in b.spec.description.input[1:]:
        f.type.isOptional = True  # the states start at zero
    b.add_convolution("up", kernel_channels=2, output_channels=4, height=3, width=3, stride_height=2, stride_width=2,
                      border_mode="valid", groups=1, W=w(3, 3, 2, 4), b=w(4), has_bias=True, is_deconv=True, input_name="img",
                      output_name="up")  # (4, 7, 7)
    b.add_activation("relu", "RELU", "up", "relu")
    b.add_flatten("flat", 0, "relu", "flat")
    b.add_reshape("seq", "flat", "seq", (seq, 49, 1, 1), 0)  # a sequence of 4 steps of 49 values
    b.add_gru("gru", W_h=[w(hidden, hidden) for _ in range(3)], W_x=[w(hidden, 49) * 0.3 for _ in range(3)],
              b=[w(hidden) for _ in range(3)], hidden_size=hidden, input_size=49, input_names=["seq", "h0"],
              output_names=["g", "h"], inner_activation="SIGMOID", output_all=True)
    b.add_bidirlstm("bilstm", W_h=[w(o, o) for _ in range(4)], W_x=[w(o, hidden) for _ in range(4)], b=[w(o) for _ in range(4)],
                    W_h_back=[w(o, o) for _ in range(4)], W_x_back=[w(o, hidden) for _ in range(4)],
                    b_back=[w(o) for _ in range(4)], hidden_size=o, input_size=hidden,
                    input_names=["g", "hf", "cf", "hb", "cb"], output_names=["y", "hf_out", "cf_out", "hb_out", "cb_out"],
                    output_all=True)
    return b


def test_deconvolution_gru_bilstm_quantized_is_evaluated(tmp_path):
    b = _model()
    raw = b.spec.SerializeToString()
    (tmp_path / "float.mlmodel").write_bytes(raw)
    quantized = mlqpipe.quantize_weights(raw, 8, "linear")
    (tmp_path / "linear8.mlmodel").write_bytes(quantized.spec.SerializeToString())
    stored = {r.storage for r in inventory(quantized.spec)}
    assert stored == {"linear8"}, stored
    r = evaluate(H.spec_of(b), quantized.spec, None, samples=8)
    assert r.evaluated, r.reason
    assert r.samples == 8 and set(r.outputs) >= {"y", "h", "hf_out", "hb_out"}
    assert 0 < r.outputs["y"]["relative_l2"] < 0.05
    y = H.run(b, {"img": np.random.default_rng(1).standard_normal((2, 2, 3, 3)).astype(np.float32)})["y"]
    assert y.shape == (2, 4, 10, 1, 1)  # 4 steps of forward and backward outputs
