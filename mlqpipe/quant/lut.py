"""Lookup-table quantization: k-means tables, custom tables, and reading tables back.

k-means here is 1-D, exact up to binning, and deterministic (no random state). Millions of float32 weights
are reduced to at most 65,536 bins keyed by the top 16 bits of each float (relative width about 0.4 %),
with exact per-bin counts and sums. The optimal k-means of the bins (merged to at most 2,048) comes from a
dynamic programme; Lloyd's algorithm on the fine bins then refines it (each centroid is the exact mean of
its values, since bin sums are exact), and values are assigned to the nearest table entry, bin by bin, value
by value only in the few bins a decision boundary crosses. Nothing sorts the values: they are read twice,
once for the histogram and once for the codes (a gather from a 65,536-entry per-bin table), both in
cache-sized chunks. Measured (bench/run.py): within 0.2 % of the exact optimum's MSE (kmeans1d) at 4
bits; on 4M weights, load -> quantize -> write about 50x faster than scikit-learn's KMeans fit alone.
"""

from __future__ import annotations

import numpy as np

_KEY_BITS = 16  # bins: sign, exponent and 7 mantissa bits of float32 (widths about 0.4 % of the value)
_DP_BINS = 2048  # the exact dynamic programme runs on at most this many (merged) bins
_MAX_ITER = 1000
_CHUNK = 1 << 17  # values per step of the passes over all values (keys 1 MB, weights 1 MB)


def kmeans_lut(values: np.ndarray, nbits: int) -> tuple[np.ndarray, np.ndarray]:
    """A 2**nbits float32 table and uint8 codes minimising squared error for 1-D `values`."""
    w = np.ascontiguousarray(values, dtype=np.float32).ravel()
    k = 1 << nbits
    counts, sums = _histogram(w)
    counts, sums = counts[_RAW_OF_KEY], sums[_RAW_OF_KEY]  # value order
    used = np.flatnonzero(counts)
    if used.size <= k:  # few distinct bins: cluster the distinct values themselves, exactly
        distinct, inverse, n = np.unique(w, return_inverse=True, return_counts=True)
        centroids = distinct.astype(np.float64)
        if distinct.size > k:
            centroids = _optimal_1d(centroids, n.astype(np.float64), centroids * n, k)
        return _table_and_codes(w, centroids, k)
    sums = sums[used]
    n = counts[used].astype(np.float64)
    centres = sums / n
    centroids = _optimal_1d(*_merge_bins(used, centres, n, sums), k)
    # Lloyd on the fine bins: bin sums are exact, so each centroid is the exact mean of its values
    centroids = _lloyd(centres, n, sums, centroids)
    table = np.zeros(k, dtype=np.float32)
    c32 = np.unique(centroids.astype(np.float32))
    table[: c32.size] = c32
    return table, _codes_via_bins(w, used, centres, c32)


def _histogram(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Count and sum of the values in each bin, indexed by the float's raw high half.

    Chunked so that the int64 keys and float64 weights numpy makes for bincount stay in cache (about twice
    as fast at 4M values as one pass). The sums are exact in float64 whatever the order (a bin's values
    share one exponent: integer multiples of one ulp, far below 2**53 of them), so chunking changes no bit.
    """
    counts = np.zeros(1 << _KEY_BITS, dtype=np.intp)
    sums = np.zeros(1 << _KEY_BITS)
    for start in range(0, w.size, _CHUNK):
        part = w[start : start + _CHUNK]
        raw = _raw_keys(part)
        counts += np.bincount(raw, minlength=1 << _KEY_BITS)
        sums += np.bincount(raw, weights=part, minlength=1 << _KEY_BITS)
    return counts, sums


def _raw_keys(w: np.ndarray) -> np.ndarray:
    """The high 16 bits of each float32 as stored, as the intp numpy's bincount and gathers want (handing
    them uint16 makes each convert again)."""
    return w.view(np.uint16)[1 if np.little_endian else 0 :: 2].astype(np.intp)


def _orderable_keys(w: np.ndarray) -> np.ndarray:
    """float32 -> 16-bit bin keys in value order: the top half of each float's bits (sign, exponent, 7
    mantissa bits), with negative values flipped so that integer order is value order."""
    halves = np.ascontiguousarray(w, dtype="<f4").view(np.int16)
    high = halves[1::2]  # little-endian: the high half of each float comes second
    mask = (high >> 15) | np.int16(-0x8000)  # arithmetic shift: all ones for negatives, else the sign bit
    return (high ^ mask).view(np.uint16)


# raw high half for each key in value order: per-bin tables are built in value order on 65,536 entries and
# moved to raw order there, instead of transforming millions of values
def _raw_of_key() -> np.ndarray:
    raw = np.arange(1 << _KEY_BITS, dtype=np.intp)
    out = np.empty_like(raw)
    out[_orderable_keys((raw.astype(np.uint32) << 16).view(np.float32))] = raw
    return out


_RAW_OF_KEY = _raw_of_key()


def _codes_via_bins(w, used, centres, table):
    """Nearest-entry codes for all values: a gather from a 65,536-entry per-bin table (chunked, like the
    histogram), then value by value only in the bins a decision boundary falls into."""
    t = np.asarray(table, dtype=np.float64)
    mids = (t[1:] + t[:-1]) / 2  # exact: sums of two float32 in float64
    marker = np.iinfo(np.uint8 if table.size < 256 else np.uint16).max  # real codes are < table.size
    per_bin = np.zeros(1 << _KEY_BITS, dtype=np.uint8 if marker == 0xFF else np.uint16)
    per_bin[_RAW_OF_KEY[used]] = np.searchsorted(mids, centres)
    # the float32 neighbours of each midpoint: values <= lo go below it, values >= hi above; only their bins
    # can hold values on both sides
    m32 = mids.astype(np.float32)
    lo = np.where(m32 > mids, np.nextafter(m32, np.float32(-np.inf)), m32)
    hi = np.nextafter(lo, np.float32(np.inf))
    per_bin[_raw_keys(np.concatenate((lo, hi)))] = marker
    codes = np.empty(w.size, dtype=per_bin.dtype)
    for start in range(0, w.size, _CHUNK):
        np.take(per_bin, _raw_keys(w[start : start + _CHUNK]), out=codes[start : start + _CHUNK])
    exact = np.flatnonzero(codes == marker)
    codes[exact] = np.searchsorted(mids, w[exact].astype(np.float64))
    return codes.astype(np.uint8, copy=False)


def _merge_bins(keys: np.ndarray, centres, counts, sums):
    """Merge neighbouring bins (dropping low key bits) until at most _DP_BINS remain."""
    shift = 0
    while np.unique(keys >> shift).size > _DP_BINS:
        shift += 1
    if shift == 0:
        return centres, counts, sums
    _, group = np.unique(keys >> shift, return_inverse=True)
    n = np.bincount(group, weights=counts)
    s = np.bincount(group, weights=sums)
    return s / n, n, s


def _optimal_1d(centres: np.ndarray, counts: np.ndarray, sums: np.ndarray, k: int) -> np.ndarray:
    """Exact k-means of sorted weighted points by dynamic programming.

    cost(a, b) of one cluster over points [a, b) comes from prefix sums in O(1). The best split point is
    monotone in b, so each of the k layers is solved by divide and conquer, one recursion level at a time
    for all segments together. Which ends b a level solves, and which solved neighbours bound their
    searches, does not depend on the data: that schedule is built once and serves every layer, and a level
    is a couple of dozen numpy calls (at 2,048 points, call overhead weighs as much as the arithmetic).
    The last layer is solved for the whole data only.
    """
    from mlqpipe.quant.kmeans import compiled

    if centres.size and (native := compiled()) is not None:  # the same DP in C: the same result
        points = [np.ascontiguousarray(a, dtype=np.float64) for a in (centres, counts, sums)]
        out = np.empty(min(k, centres.size))
        native.optimal_1d(*points, centres.size, out.size, out)
        return out
    m = centres.size
    k = min(k, m)
    pre = np.zeros((4, m + 1))  # prefix counts, sums, weighted squares; row 3: the previous layer's costs
    np.cumsum(counts, out=pre[0, 1:])
    np.cumsum(sums, out=pre[1, 1:])
    np.cumsum(sums * centres, out=pre[2, 1:])
    cn, cs, cq = pre[:3]
    prev = pre[3]
    prev[1:] = cq[1:] - cs[1:] * cs[1:] / cn[1:]
    prev[0] = np.inf  # one cluster over no points: infeasible, like every layer's too-short prefixes
    levels = [(b, bounds, pre[:3, b]) for b, bounds in _split_schedule(m)]
    splits = np.zeros((k, m + 2), dtype=np.int64)  # per layer: best split for each end; sentinels 0 and m
    for layer in range(1, k):
        opt = splits[layer]
        opt[m + 1] = m
        if layer == k - 1:  # the last layer is only needed at the end of the data
            levels = [(np.array([m]), np.array([[0], [m + 1]]), pre[:3, [m]])]
        cur = np.empty(m + 1)
        for b, bounds, at_b in levels:
            cur[b], opt[b] = _best_splits(pre, opt, b, bounds, at_b)
        cur[: layer + 1] = np.inf  # fewer points than clusters
        prev[:] = cur
    edges = [m]
    for layer in range(k - 1, 0, -1):
        edges.append(int(splits[layer, edges[-1]]))
    edges = np.array([0] + edges[::-1], dtype=np.int64)
    n = cn[edges[1:]] - cn[edges[:-1]]
    return (cs[edges[1:]] - cs[edges[:-1]]) / n


def _best_splits(pre, opt, b, bounds, at_b):
    """One recursion level: for each end b, the minimum over its allowed splits a of prev[a] + cost(a, b),
    and the earliest a reaching it. The candidates of all segments form one ragged array; the minimum is
    taken on complex numbers (value, split), which numpy orders lexicographically: ties go to the earliest
    split, as a stable scan would."""
    lo_hi = opt[bounds]
    lo = lo_hi[0]
    length = np.minimum(lo_hi[1], b - 1) + 1 - lo
    stops = np.cumsum(length)
    starts = stops - length
    cand = np.arange(stops[-1]) + np.repeat(lo - starts, length)
    at_cand = pre[:, cand]  # prefix counts, sums, squares and previous costs at each candidate
    d = np.repeat(at_b, length, axis=1) - at_cand[:3]
    both = np.empty(cand.size, dtype=np.complex128)
    both.real = at_cand[3] + (d[2] - d[1] * d[1] / d[0])
    both.imag = cand
    best = np.minimum.reduceat(both, starts)
    return best.real, best.imag.astype(np.int64)


def _split_schedule(m: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Breadth-first divide and conquer over ends 1..m: per level, the midpoints of the open segments and
    the two solved ends around each (0 and m + 1 are sentinels), whose best splits bound its search."""
    lo, hi = np.array([1]), np.array([m])
    out = []
    while lo.size:
        mid = (lo + hi) >> 1
        out.append((mid, np.stack((lo - 1, hi + 1))))
        lo, hi = np.concatenate((lo, mid + 1)), np.concatenate((mid - 1, hi))
        keep = lo <= hi
        lo, hi = lo[keep], hi[keep]
    return out


def _lloyd(centres: np.ndarray, counts: np.ndarray, sums: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Lloyd's algorithm on sorted weighted points; clusters are runs, so a step costs O(k log n).
    A cluster that empties keeps its previous centroid (the next step may give it points again)."""
    cum_n = np.concatenate(([0.0], np.cumsum(counts)))
    cum_s = np.concatenate(([0.0], np.cumsum(sums)))
    for _ in range(_MAX_ITER):
        edges = np.concatenate(([0], np.searchsorted(centres, (c[1:] + c[:-1]) / 2), [centres.size]))
        n = cum_n[edges[1:]] - cum_n[edges[:-1]]
        new = np.where(n > 0, (cum_s[edges[1:]] - cum_s[edges[:-1]]) / np.where(n > 0, n, 1.0), c)
        if np.array_equal(new, c):
            break
        c = new
    return c


def _table_and_codes(w, centroids, k):
    table = np.zeros(k, dtype=np.float32)
    c32 = np.unique(centroids.astype(np.float32))
    table[: c32.size] = c32
    codes = nearest_codes(w, c32)
    return table, codes


def nearest_codes(values: np.ndarray, sorted_table: np.ndarray) -> np.ndarray:
    """Index of the nearest entry of an ascending table, for every value (ties go to the lower entry)."""
    t = np.asarray(sorted_table, dtype=np.float64)
    if t.size == 1:
        return np.zeros(np.size(values), dtype=np.uint8)
    return np.searchsorted((t[1:] + t[:-1]) / 2, np.asarray(values, dtype=np.float64).ravel(), side="left").astype(np.uint8)


def check_custom_lut(result, nbits: int, count: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate what a custom `(nbits, weights) -> (lut, quantized_indices)` function returned."""
    try:
        lut, codes = result
    except (TypeError, ValueError):
        raise ValueError(f"{where}: custom LUT function must return (lut, quantized_indices)") from None
    lut = np.asarray(lut, dtype=np.float64).ravel()
    codes = np.asarray(codes).ravel()
    k = 1 << nbits
    if lut.size > k:
        raise ValueError(f"{where}: custom LUT has {lut.size} entries, at most 2**nbits = {k} allowed")
    if codes.size != count:
        raise ValueError(f"{where}: custom LUT function returned {codes.size} indices for {count} weights")
    if codes.size and (codes.min() < 0 or codes.max() >= k or not np.all(np.equal(np.mod(codes, 1), 0))):
        raise ValueError(f"{where}: custom LUT indices must be integers in 0..{k - 1}")
    if codes.size and codes.max() >= lut.size:
        raise ValueError(f"{where}: custom LUT index {int(codes.max())} points past the {lut.size} table entries returned")
    if not np.all(np.isfinite(lut)):
        raise ValueError(f"{where}: custom LUT contains NaN or Inf")
    table = np.zeros(k, dtype=np.float32)
    table[: lut.size] = lut.astype(np.float32)
    return table, codes.astype(np.uint8)


def dequantize_lut(codes: np.ndarray, table: np.ndarray) -> np.ndarray:
    return np.asarray(table, dtype=np.float32)[codes]
