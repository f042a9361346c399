"""Properties of the engine on generated models (hypothesis)."""

import numpy as np
from hypothesis import given, settings, strategies as st

import mlqpipe
from mlqpipe.formats.nn.check import introduced_findings
from tests.builders import add_conv, add_inner_product, model, network


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 16), st.integers(1, 24), st.integers(1, 8), st.sampled_from(["<f4", "<f2"]), st.integers(0, 2**31))
def test_linear_error_at_most_half_a_step_per_channel(ic, oc, nbits, dtype, seed):
    m = model()
    add_inner_product(network(m), "ip", "x", "y", ic, oc, dtype=dtype, seed=seed)
    before = {r.field: r.values() for r in mlqpipe.inventory(m)}
    q = mlqpipe.quantize_weights(m, nbits, "linear")
    assert introduced_findings(m, q.spec) == []  # m declares no inputs: Core ML rejects both
    for r in mlqpipe.inventory(q.spec):
        lq = r.wp.quantization.linearQuantization
        scale = np.array(lq.scale, np.float32).reshape(-1, 1)
        got = r.values().reshape(len(scale), -1)
        want = before[r.field].reshape(len(scale), -1)
        # half a step; channels whose scale is under coremltools' 1e-6 threshold (kept by the compatibility
        # API) collapse to their minimum, so their error is bounded by the whole range instead
        bound = np.where(scale > 1e-6, scale / 2, scale * (2**nbits - 1))
        assert np.all(np.abs(got - want) <= bound + 1e-6 * (np.abs(want).max() + 1e-30)), r.id


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.booleans(), st.integers(1, 8), st.integers(0, 2**31))
def test_deconvolution_quantize_dequantize_round_trip(groups, per_group, bias, nbits, seed):
    m = model()
    add_conv(network(m), "d", "x", "y", oc=groups * per_group, kc=groups * 2, k=2, groups=groups, bias=bias, deconv=True, seed=seed)
    before = {r.field: r.values() for r in mlqpipe.inventory(m)}
    q = mlqpipe.quantize_weights(m, nbits, "linear")
    assert introduced_findings(m, q.spec) == []  # m declares no inputs: Core ML rejects both
    d = mlqpipe.quantize_weights(q, None, "dequantization")
    for r in mlqpipe.inventory(d.spec):
        w = before[r.field]
        step = max(float(np.ptp(w)), 1e-30) / (2**nbits - 1)
        assert np.abs(r.values() - w).max() <= step / 2 + 1e-6, r.id
