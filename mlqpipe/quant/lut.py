"""Lookup-table quantization: k-means tables, custom tables, and reading tables back.

k-means here is 1-D, exact up to binning, and deterministic (no random state). Millions of float32 weights
are reduced to at most 65,536 bins keyed by the top 16 bits of each float (relative width about 0.4 %),
with exact per-bin counts and sums. The optimal k-means of the bins (merged to at most 2,048) comes from a
dynamic programme; Lloyd's algorithm on the fine bins then refines it (each centroid is the exact mean of
its values, since bin sums are exact), and values are assigned to the nearest table entry, bin by bin, value
by value only in the few bins a decision boundary crosses. Measured: within 0.2 % of the exact optimum's MSE
(kmeans1d) at 4 bits, about 30x faster than scikit-learn's KMeans.
"""

from __future__ import annotations

import numpy as np

_KEY_BITS = 16  # bins: sign, exponent and 7 mantissa bits of float32 (widths about 0.4 % of the value)
_DP_BINS = 2048  # the exact dynamic programme runs on at most this many (merged) bins
_MAX_ITER = 1000
_STRADDLED = 0xFFFF  # marker in the per-bin code table (real codes are < 256)


def kmeans_lut(values: np.ndarray, nbits: int) -> tuple[np.ndarray, np.ndarray]:
    """A 2**nbits float32 table and uint8 codes minimising squared error for 1-D `values`."""
    w = np.ascontiguousarray(values, dtype=np.float32).ravel()
    k = 1 << nbits
    keys = _orderable_keys(w)
    counts = np.bincount(keys, minlength=1 << _KEY_BITS)
    used = np.flatnonzero(counts)
    if used.size <= k:  # few distinct bins: cluster the distinct values themselves, exactly
        distinct, inverse, n = np.unique(w, return_inverse=True, return_counts=True)
        centroids = distinct.astype(np.float64)
        if distinct.size > k:
            centroids = _optimal_1d(centroids, n.astype(np.float64), centroids * n, k)
        return _table_and_codes(w, centroids, k)
    sums = np.bincount(keys, weights=w, minlength=1 << _KEY_BITS)[used]
    n = counts[used].astype(np.float64)
    centres = sums / n
    centroids = _optimal_1d(*_merge_bins(used, centres, n, sums), k)
    # Lloyd on the fine bins: bin sums are exact, so each centroid is the exact mean of its values
    centroids = _lloyd(centres, n, sums, centroids)
    table = np.zeros(k, dtype=np.float32)
    c32 = np.unique(centroids.astype(np.float32))
    table[: c32.size] = c32
    return table, _codes_via_bins(w, keys, used, centres, c32)


def _orderable_keys(w: np.ndarray) -> np.ndarray:
    """float32 -> 16-bit bin keys in value order: the top half of each float's bits (sign, exponent, 7
    mantissa bits), with negative values flipped so that integer order is value order."""
    halves = np.ascontiguousarray(w, dtype="<f4").view(np.int16)
    high = halves[1::2]  # little-endian: the high half of each float comes second
    mask = (high >> 15) | np.int16(-0x8000)  # arithmetic shift: all ones for negatives, else the sign bit
    return (high ^ mask).view(np.uint16)


def _codes_via_bins(w, keys, used, centres, table):
    """Nearest-entry codes for all values: per bin, except bins a decision boundary falls into."""
    t = np.asarray(table, dtype=np.float64)
    mids = (t[1:] + t[:-1]) / 2
    # one code per bin; bins a decision boundary falls into get a marker and are resolved value by value
    per_bin = np.zeros(1 << _KEY_BITS, dtype=np.uint16)
    per_bin[used] = np.searchsorted(mids, centres)
    boundary_keys = _orderable_keys(mids.astype(np.float32)).astype(np.intp)
    for offset in (-1, 0, 1):  # float32 rounding of a midpoint may land in a neighbouring bin
        per_bin[np.clip(boundary_keys + offset, 0, (1 << _KEY_BITS) - 1)] = _STRADDLED
    codes = per_bin[keys]
    exact = np.flatnonzero(codes == _STRADDLED)
    codes[exact] = np.searchsorted(mids, w[exact].astype(np.float64))
    return codes.astype(np.uint8)


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

    cost(a, b) of one cluster over points [a, b) comes from prefix sums in O(1); the best split point is
    monotone in b, so each of the k layers is solved by divide and conquer, one recursion level at a time
    for all segments together (numpy over arrays, about log2(n) steps per layer).
    """
    m = centres.size
    k = min(k, m)
    cn = np.concatenate(([0.0], np.cumsum(counts)))
    cs = np.concatenate(([0.0], np.cumsum(sums)))
    cq = np.concatenate(([0.0], np.cumsum(sums * centres)))

    def cost(a, b):
        n = cn[b] - cn[a]
        s = cs[b] - cs[a]
        return (cq[b] - cq[a]) - s * s / np.where(n > 0, n, 1.0)

    ends = np.arange(m + 1)
    prev = cost(np.zeros(m + 1, dtype=np.int64), ends)
    prev[0] = 0.0
    splits = np.zeros((k, m + 1), dtype=np.int64)
    for layer in range(1, k):
        cur = np.full(m + 1, np.inf)
        lo, hi = np.array([layer + 1]), np.array([m])
        olo, ohi = np.array([layer]), np.array([m - 1])
        while lo.size:
            mid = (lo + hi) >> 1
            length = np.minimum(ohi, mid - 1) - olo + 1
            start = np.cumsum(length) - length
            total = int(start[-1] + length[-1])
            positions = np.arange(total)
            cand = positions - np.repeat(start - olo, length)  # olo + offset within each segment
            val = prev[cand] + cost(cand, np.repeat(mid, length))
            best_val = np.minimum.reduceat(val, start)
            # first position of each segment's minimum (ties: the earliest split, as a stable scan would)
            first = np.minimum.reduceat(np.where(val == np.repeat(best_val, length), positions, total), start)
            best = cand[first]
            cur[mid] = best_val
            splits[layer, mid] = best
            left = lo <= mid - 1
            right = mid + 1 <= hi
            lo, hi, olo, ohi = (
                np.concatenate((lo[left], mid[right] + 1)),
                np.concatenate((mid[left] - 1, hi[right])),
                np.concatenate((olo[left], best[right])),
                np.concatenate((best[left], ohi[right])),
            )
        prev = cur
    edges = [m]
    for layer in range(k - 1, 0, -1):
        edges.append(int(splits[layer, edges[-1]]))
    edges = np.array(edges[::-1] + [], dtype=np.int64)
    edges = np.concatenate(([0], edges))
    n = cn[edges[1:]] - cn[edges[:-1]]
    return (cs[edges[1:]] - cs[edges[:-1]]) / n


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
