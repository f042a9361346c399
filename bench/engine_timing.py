"""Time the engine on one 4096x1024 innerProduct next to coremltools (linear) and sklearn / kmeans1d (k-means).

    python bench/engine_timing.py [--skip-kmeans1d]

Prints seconds per call (median of repeats) and the ratio to mlqpipe. coremltools, scikit-learn and kmeans1d
are optional; a missing one is reported, not fatal.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time
import warnings

import numpy as np

import mlqpipe
from mlqpipe.coreml import proto
from mlqpipe.quant.lut import kmeans_lut


def make_model(ic=1024, oc=4096) -> bytes:
    m = proto.Model(specificationVersion=1)
    layer = m.neuralNetwork.layers.add(name="dense", input=["x"], output=["y"])
    ip = layer.innerProduct
    ip.inputChannels, ip.outputChannels = ic, oc
    ip.weights.floatValue = (np.random.default_rng(0).standard_normal(ic * oc) * 0.02).astype("<f4").tobytes()
    return m.SerializeToString()


def timed(fn, repeat=3):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-kmeans1d", action="store_true")
    args = ap.parse_args()
    data = make_model()
    rows = []
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            import coremltools as ct
            from coremltools.models.neural_network import quantization_utils as qu
            from coremltools.proto import Model_pb2
    except ImportError:
        ct = None

    def ct_run(nbits, mode):
        spec = Model_pb2.Model.FromString(data)
        with contextlib.redirect_stdout(io.StringIO()):
            qu.quantize_weights(ct.models.MLModel(spec), nbits, mode).get_spec().SerializeToString()

    for nbits, mode in [(8, "linear"), (4, "linear"), (16, "linear"), (4, "kmeans_lut")]:
        ours = timed(lambda: mlqpipe.quantize_weights(data, nbits, mode).SerializeToString())
        theirs = None
        if ct is not None:
            try:
                theirs = timed(lambda: ct_run(nbits, mode), repeat=1)
            except Exception as e:  # coremltools 9.0 raises for kmeans
                theirs = f"raises {type(e).__name__}"
        rows.append((f"{mode} {nbits}-bit", ours, theirs))

    w = np.frombuffer(proto.Model.FromString(data).neuralNetwork.layers[0].innerProduct.weights.floatValue, "<f4")
    ours = timed(lambda: kmeans_lut(w, 4))
    rows.append(("kmeans 4-bit kernel only", ours, None))
    try:
        from sklearn.cluster import KMeans

        sk = timed(lambda: KMeans(16, init="k-means++", tol=1e-2, n_init=1, random_state=0).fit(w.reshape(-1, 1)), repeat=1)
        rows.append(("  vs sklearn KMeans (coremltools' settings)", ours, sk))
    except ImportError:
        pass
    if not args.skip_kmeans1d:
        try:
            import kmeans1d

            k1 = timed(lambda: kmeans1d.cluster(w.astype(np.float64), 16), repeat=1)
            rows.append(("  vs kmeans1d (exact)", ours, k1))
        except ImportError:
            pass
    print(f"{'case (4096x1024 innerProduct)':<44}{'mlqpipe s':>11}{'other s':>18}{'other/ours':>12}")
    for name, a, b in rows:
        other = f"{b:.3f}" if isinstance(b, float) else (b or "-")
        ratio = f"{b / a:.1f}x" if isinstance(b, float) else ""
        print(f"{name:<44}{a:>11.3f}{other:>18}{ratio:>12}")


if __name__ == "__main__":
    main()
