"""numba-compiled exact 1-D k-means: kmeans.py's fp16 DP, one group at a time, and lut.py's DP, bit-identical.

Optional (the `fast` extra): mlqpipe.quant.kmeans imports this module lazily (kmeans._jit_solver says
when). kmeans1d_fp16 does every float64 operation of kmeans.py's numpy path in the same order: the
histogram of raw fp16 patterns in value order (-0.0 merged into +0.0), weighted prefix sums by a
sequential loop whose first sum is the first term (np.cumsum's), `_cost`'s operations one by one, the
first layer's costs from 0, each layer's divide and conquer over rows with the very same (row range,
split range) segments and the leftmost minimum of prev[j-1] + cost(j, i), the backtrack, and kmeans1d's
running-mean centroids. optimal_1d does the same for lut._optimal_1d (which calls it when kmeans says so).

numba compiles without fastmath, so LLVM neither reorders nor fuses (no FMA) these operations; with
error_model="numpy" it vectorises the candidates' costs (lane by lane the same IEEE operations), then a
scalar scan takes their leftmost minimum. The compiled code is cached on disk where numba can write
(next to this file, else its user-wide cache dir); with no usable cache location it compiles in every
process instead.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mlqpipe.quant.cost import cluster_cost


def _jit(fn):
    # error_model="numpy": IEEE division as numpy's (no zero-division check per division, which would
    # keep LLVM from vectorising the candidates' loop); no division here has a zero divisor anyway
    try:
        return njit(cache=True, nogil=True, error_model="numpy")(fn)
    except RuntimeError:  # numba raises this when it finds no writable cache location
        return njit(nogil=True, error_model="numpy")(fn)


# the cost kmeans.py computes on arrays, compiled and inlined where it is called: one source for the operations
# (numba's cache keys on this file only: an edit of cost.py needs a touch here, or the tests see stale code)
_cost = njit(inline="always", nogil=True, error_model="numpy")(cluster_cost)


@_jit
def _cluster_group(raw, key_of_raw, value_of_key, kmax, cents, codes):  # pragma: no cover (compiled)
    """kmeans1d of one fp16 group given as raw uint16 patterns: centroids (float64, sorted, then zeros)
    into cents[:kmax], the label of each value into codes."""
    nkeys = value_of_key.shape[0]
    counts = np.zeros(nkeys, dtype=np.int64)
    for t in range(raw.shape[0]):
        counts[key_of_raw[raw[t]]] += 1
    n = 0
    for key in range(nkeys):
        if counts[key] > 0:
            n += 1
    for c in range(kmax):
        cents[c] = 0.0
    if n == 0:
        return
    pts = np.empty(n)
    keys = np.empty(n, dtype=np.int64)
    cw = np.zeros(n + 1)  # prefix sums of w, w*x, w*x*x with a leading 0, sequential as np.cumsum (whose
    cs = np.zeros(n + 1)  # first sum is the first term itself)
    cq = np.zeros(n + 1)
    p = 0
    for key in range(nkeys):
        if counts[key] > 0:
            x = value_of_key[key]
            w = np.float64(counts[key])
            wx = w * x
            pts[p] = x
            keys[p] = key
            if p == 0:
                cw[1] = w
                cs[1] = wx
                cq[1] = wx * x
            else:
                cw[p + 1] = cw[p] + w
                cs[p + 1] = cs[p] + wx
                cq[p + 1] = cq[p] + wx * x
            p += 1
    k = min(n, kmax)

    prev = np.empty(n)  # layer 0: the cost of 0..i (kmeans.py subtracts 0.0 literals: the same numbers)
    for i in range(n):
        prev[i] = _cost(cw[i + 1], cs[i + 1], cq[i + 1], cw[0], cs[0], cq[0])
    cur = np.empty(n)
    val = np.empty(n)  # prev[j-1] + cost(j, i) of the candidates j of one row
    choice = np.zeros((max(k - 1, 1), n), dtype=np.uint16)
    stack = np.empty((64, 4), dtype=np.int64)  # depth <= log2(n) + 1 <= 18 pending segments per level
    for layer in range(1, k):
        lo = n - 1 if layer == k - 1 else layer  # the last layer: the last point only
        stack[0, 0] = lo
        stack[0, 1] = n - 1
        stack[0, 2] = layer
        stack[0, 3] = n - 1
        top = 1
        while top > 0:
            top -= 1
            rlo = stack[top, 0]
            rhi = stack[top, 1]
            olo = stack[top, 2]
            ohi = stack[top, 3]
            i = (rlo + rhi) >> 1
            cwi = cw[i + 1]
            csi = cs[i + 1]
            cqi = cq[i + 1]
            width = min(ohi, i) + 1 - olo
            cwj = cw[olo:]  # views from the first candidate: indices from 0, which LLVM vectorises
            csj = cs[olo:]
            cqj = cq[olo:]
            pj = prev[olo - 1 :]
            for q in range(width):  # the candidates' values first ...
                val[q] = _cost(cwi, csi, cqi, cwj[q], csj[q], cqj[q]) + pj[q]
            best = val[0]
            bestq = 0
            for q in range(1, width):  # ... then their leftmost minimum
                if val[q] < best:
                    best = val[q]
                    bestq = q
            bestj = olo + bestq
            cur[i] = best
            choice[layer - 1, i] = bestj
            if i + 1 <= rhi:
                stack[top, 0] = i + 1
                stack[top, 1] = rhi
                stack[top, 2] = bestj
                stack[top, 3] = ohi
                top += 1
            if rlo <= i - 1:
                stack[top, 0] = rlo
                stack[top, 1] = i - 1
                stack[top, 2] = olo
                stack[top, 3] = bestj
                top += 1
        prev, cur = cur, prev

    starts = np.empty(k + 1, dtype=np.int64)
    starts[0] = 0
    starts[k] = n
    end = n - 1
    for layer in range(k - 1, 0, -1):
        starts[layer] = choice[layer - 1, end]
        end = starts[layer] - 1

    label_of_key = np.zeros(nkeys, dtype=np.uint8)
    for c in range(k):  # kmeans1d's running means: c += (x - c) * w_i / W(start..i)
        first = starts[c]
        m = 0.0
        for i in range(first, starts[c + 1]):
            m += (pts[i] - m) * (cw[i + 1] - cw[i]) / (cw[i + 1] - cw[first])
            label_of_key[keys[i]] = c
        cents[c] = m
    for t in range(raw.shape[0]):
        codes[t] = label_of_key[key_of_raw[raw[t]]]


def kmeans1d_fp16(groups: np.ndarray, nbits: int, key_of_raw: np.ndarray, value_of_key: np.ndarray):
    """kmeans.kmeans1d_fp16, compiled: LUTs (G, 2**nbits) fp16 and uint8 labels (G, m). key_of_raw and
    value_of_key are kmeans.py's fp16 key tables."""
    raw = np.ascontiguousarray(groups, dtype=np.float16).view(np.uint16)
    kmax = 1 << nbits
    cents = np.zeros((len(raw), kmax))
    codes = np.empty(raw.shape, dtype=np.uint8)
    keys = np.ascontiguousarray(key_of_raw, dtype=np.int64)
    for g in range(len(raw)):
        _cluster_group(raw[g], keys, value_of_key, kmax, cents[g], codes[g])
    return cents.astype(np.float16), codes


@_jit
def optimal_1d(centres, counts, sums, k):  # pragma: no cover (compiled)
    """lut._optimal_1d compiled, bit-identical: the exact k-means centroids (float64, min(k, m)) of the
    sorted weighted points (centres, counts, sums = centres * counts), its float64 operations in its order:
    sequential prefix sums, cost(a, b) = d2 - d1 * d1 / d0 of [a, b), prev[a] + cost, the earliest split on
    ties, each layer's divide and conquer over ends 1..m bounded by the solved ends around each segment
    (depth first here, breadth first there: the same bounds), the last layer at the end m only."""
    m = centres.shape[0]
    k = min(k, m)
    cn = np.zeros(m + 1)  # np.cumsum's: the first sum is the first term itself (-0.0 stays -0.0)
    cs = np.zeros(m + 1)
    cq = np.zeros(m + 1)
    for i in range(m):
        if i == 0:
            cn[1] = counts[0]
            cs[1] = sums[0]
            cq[1] = sums[0] * centres[0]
        else:
            cn[i + 1] = cn[i] + counts[i]
            cs[i + 1] = cs[i] + sums[i]
            cq[i + 1] = cq[i] + sums[i] * centres[i]
    prev = np.empty(m + 1)
    prev[0] = np.inf
    for b in range(1, m + 1):
        prev[b] = cq[b] - cs[b] * cs[b] / cn[b]
    cur = np.empty(m + 1)
    val = np.empty(m + 1)
    splits = np.zeros((max(k, 1), m + 2), dtype=np.int64)
    stack = np.empty((64, 2), dtype=np.int64)
    for layer in range(1, k):
        opt = splits[layer]
        opt[m + 1] = m
        stack[0, 0] = m if layer == k - 1 else 1  # the last layer: the end m only (its bounds: 0 and m)
        stack[0, 1] = m
        top = 1
        while top > 0:
            top -= 1
            lo = stack[top, 0]
            hi = stack[top, 1]
            b = (lo + hi) >> 1
            first = opt[lo - 1]
            width = min(opt[hi + 1], b - 1) + 1 - first
            cnb = cn[b]
            csb = cs[b]
            cqb = cq[b]
            cna = cn[first:]
            csa = cs[first:]
            cqa = cq[first:]
            pa = prev[first:]
            for q in range(width):
                d0 = cnb - cna[q]
                d1 = csb - csa[q]
                d2 = cqb - cqa[q]
                val[q] = pa[q] + (d2 - d1 * d1 / d0)
            best = val[0]
            bestq = 0
            for q in range(1, width):
                if val[q] < best:
                    best = val[q]
                    bestq = q
            cur[b] = best
            opt[b] = first + bestq
            if b + 1 <= hi:
                stack[top, 0] = b + 1
                stack[top, 1] = hi
                top += 1
            if lo <= b - 1:
                stack[top, 0] = lo
                stack[top, 1] = b - 1
                top += 1
        for b in range(layer + 1):
            cur[b] = np.inf
        prev, cur = cur, prev
    edges = np.empty(k + 1, dtype=np.int64)
    edges[0] = 0
    edges[k] = m
    for layer in range(k - 1, 0, -1):
        edges[layer] = splits[layer, edges[layer + 1]]
    out = np.empty(k)
    for c in range(k):
        out[c] = (cs[edges[c + 1]] - cs[edges[c]]) / (cn[edges[c + 1]] - cn[edges[c]])
    return out
