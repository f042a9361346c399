"""k-means kernels for palettization: coremltools' exact 1-D k-means of fp16 groups, and vector k-means.

Exact 1-D k-means (coremltools 9.0 runs its vendored kmeans1d on fp16 groups of >= 10,000 values, MLPROGRAM.md
§7): np.unique, then the optimal weighted partition of the sorted distinct values by dynamic programming,
with kmeans1d's float64 arithmetic operation for operation, so that LUTs and indices are bit-identical. An
fp16 group has at most 65,536 distinct values, so the unique step is a histogram of the raw 16-bit patterns
(no sort), and the DP costs k·n_distinct cells. Each DP layer is solved by divide and conquer over its rows
(the best split is monotone in the row; leftmost minimum on ties, as kmeans1d's SMAWK), one recursion level
at a time for every segment of every group of a batch. Where setup.py could build it (a C compiler),
mlqpipe.quant._kmeans1d runs the same DP compiled, group by group: the same float64 operations in the same
order, so the same LUTs and indices, 10-20x faster and with no fixed cost (lut._optimal_1d uses it too).
MLQPIPE_NO_COMPILED=1 or _COMPILED = False keeps numpy.

Vector k-means (cluster_dim > 1, where coremltools runs scikit-learn's KMeans): Lloyd's algorithm from greedy
k-means++ seeds drawn with a fixed seed, converged on a random sample, then a few iterations on all
points (3 up to 16 clusters, else 30); distances from float32 products (einsum, not BLAS) in chunks.
"""

from __future__ import annotations

import os

import numpy as np

from mlqpipe.quant.cost import cluster_cost as _cost

_KEYS = 1 << 16
_DP_BUDGET = 1 << 25  # bytes of split choices (uint16, one per layer and distinct value) per batch of groups
_UNIQUE_BUDGET = 1 << 24  # bytes of per-group histograms per batch
_DP_POINTS = 1 << 15  # distinct values per DP run: more groups share numpy calls, but leave the cache (measured)
_COMPILED = True  # use mlqpipe.quant._kmeans1d (built where a C compiler works) unless MLQPIPE_NO_COMPILED=1


def _fp16_key_tables() -> tuple[np.ndarray, np.ndarray]:
    """(value-order key of each raw fp16 pattern, float64 value of each key). -0.0 shares +0.0's key, as
    np.unique merges them (their sign changes no bit of kmeans1d's sums or centroids)."""
    raw = np.arange(_KEYS, dtype=np.uint32)
    raw[raw == 0x8000] = 0
    flip = np.where(raw & 0x8000, 0xFFFF, 0x8000).astype(np.uint32)
    key = (raw ^ flip).astype(np.int64)  # int64: numpy indexes with it, and the compiled DP takes it as is
    value = np.zeros(_KEYS)
    value[key] = raw.astype(np.uint16).view(np.float16).astype(np.float64)
    return key, value


_KEY_OF_RAW, _VALUE_OF_KEY = _fp16_key_tables()


def kmeans1d_fp16(groups: np.ndarray, nbits: int) -> tuple[np.ndarray, np.ndarray]:
    """coremltools' kmeans1d of each row of `groups` (G, m) float16: LUTs (G, 2**nbits) fp16 (sorted
    centroids, then zeros) and uint8 labels (G, m)."""
    if (native := compiled()) is not None:
        raw = np.ascontiguousarray(groups, dtype=np.float16).view(np.uint16)
        cents = np.zeros((len(raw), 1 << nbits))
        codes = np.empty(raw.shape, dtype=np.uint8)
        native.cluster_fp16(raw, raw.shape[0], raw.shape[1], _KEY_OF_RAW, _VALUE_OF_KEY, 1 << nbits, cents, codes)
        return cents.astype(np.float16), codes
    per = max(1, _UNIQUE_BUDGET // (_KEYS * 8))
    luts = np.zeros((len(groups), 1 << nbits), dtype=np.float16)
    codes = np.empty(groups.shape, dtype=np.uint8)
    for at in range(0, len(groups), per):
        keys = _KEY_OF_RAW[groups[at : at + per].view(np.uint16)]
        keys += np.arange(len(keys))[:, None] * _KEYS  # one histogram row per group
        counts = np.bincount(keys.ravel(), minlength=len(keys) * _KEYS).reshape(len(keys), _KEYS)
        luts[at : at + per], label_of_key = _solve_batches(counts, nbits)
        codes[at : at + per] = label_of_key.ravel()[keys]
    return luts, codes


def compiled():
    """mlqpipe.quant._kmeans1d, or None: not built (no C compiler when the package was built) or switched off."""
    if not _COMPILED or os.environ.get("MLQPIPE_NO_COMPILED") == "1":
        return None
    try:
        from mlqpipe.quant import _kmeans1d
    except ImportError:
        return None
    return _kmeans1d


def _solve_batches(counts: np.ndarray, nbits: int) -> tuple[np.ndarray, np.ndarray]:
    """Optimal clusterings of histogram rows, in batches of at most _DP_POINTS values whose DP choices fit
    _DP_BUDGET: (LUTs, label per key)."""
    present = counts > 0
    sizes = present.sum(axis=1)
    luts = np.zeros((len(counts), 1 << nbits), dtype=np.float16)
    label_of_key = np.zeros(counts.shape, dtype=np.uint8)
    at = 0
    cap = min(_DP_POINTS, _DP_BUDGET // (2 << nbits))  # points per DP run (rows padded to the widest)
    while at < len(counts):  # rows at..end-1 share one DP
        end, widest = at + 1, int(sizes[at]) + 1
        while end < len(counts) and (end + 1 - at) * max(widest, sizes[end] + 1) <= cap:
            widest = max(widest, int(sizes[end]) + 1)
            end += 1
        part = slice(at, end)
        luts[part], labels = _exact_kmeans(counts[part], present[part], sizes[part], 1 << nbits)
        label_of_key[part][present[part]] = labels
        at = end
    return luts, label_of_key


def _exact_kmeans(counts, present, sizes, kmax):
    """kmeans1d on each row's (sorted distinct values, counts): fp16 LUT rows, and the label of each
    distinct value (row by row, in value order)."""
    g = len(counts)
    stride = int(sizes.max()) + 1  # prefix p of row r sits at r * stride + p
    ks = np.minimum(sizes, kmax)
    pts = np.zeros((g, stride))
    wts = np.zeros((g, stride))
    slot = np.arange(stride - 1)[None, :] < sizes[:, None]
    pts[:, :-1][slot] = np.broadcast_to(_VALUE_OF_KEY, counts.shape)[present]
    wts[:, :-1][slot] = counts[present]
    prefix = [_prefix(a) for a in (wts, wts * pts, wts * pts * pts)]
    starts = _optimal_starts(prefix, sizes, ks, stride, kmax)  # (g, kmax) in-row starts; unused entries 0
    sizes_per = np.diff(np.concatenate((starts, sizes[:, None]), axis=1), axis=1)
    first = starts + np.arange(g)[:, None] * stride
    cents = _running_means(pts.ravel(), prefix[0], first, sizes_per)
    lut = cents.astype(np.float16)
    labels = np.repeat(np.tile(np.arange(kmax, dtype=np.uint8), g), sizes_per.ravel())
    return lut, labels


def _prefix(a: np.ndarray) -> np.ndarray:
    """Sequential prefix sums of each row with a leading 0 (add.accumulate is sequential, as kmeans1d's
    loop), flattened and padded by one row of zeros for the DP's sliding windows."""
    out = np.zeros((a.shape[0] + 1, a.shape[1]))
    np.cumsum(a[:, :-1], axis=1, out=out[:-1, 1:])
    return out.ravel()


def _optimal_starts(prefix, sizes, ks, stride, columns) -> np.ndarray:
    """Per row, the start of each cluster in the optimal partition of its points into ks clusters
    (`columns` per row; the unused ones hold the row's size: empty clusters at its end).

    D[L][i] = min over j in [L, i] of D[L-1][j-1] + cost(j, i). The best j is monotone in i: each layer is
    solved by divide and conquer over its rows (the middle row of each segment against its split range,
    leftmost minimum), one level for all segments at once. The previous layer's best split is not used as
    a lower bound (Ckmeans.1d.dp does): with float ties it changed a partition in our kmeans1d tests."""
    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 past each row's end or range, never read
        return _layers(prefix, sizes, ks, stride, columns)


def _layers(prefix, sizes, ks, stride, columns):
    """The DP layer by layer; the split choices are kept as in-row positions (uint16: < 65,536 values)."""
    cw, cs, cq = prefix
    base = np.arange(len(sizes)) * stride
    total = len(sizes) * stride
    row_base = np.repeat(base, stride)
    prev = _cost(cw[1 : total + 1], cs[1 : total + 1], cq[1 : total + 1], 0.0, 0.0, 0.0)
    prev = np.concatenate((prev, np.zeros(stride)))
    kmax = int(ks.max())
    choice = np.zeros((max(kmax - 1, 1), total), dtype=np.uint16)
    for layer in range(1, kmax):
        live = np.flatnonzero(ks > layer)
        b, last = base[live], base[live] + sizes[live] - 1
        lo = np.where(ks[live] - 1 == layer, last, b + layer)  # a row's last layer: its last point only
        seg = np.stack((lo, last, b + layer, last), axis=1)
        cur = np.full(total + stride, np.inf)
        opt = np.zeros(total, dtype=np.int64)
        while seg.size:
            mid = (seg[:, 0] + seg[:, 1]) >> 1
            low = seg[:, 2]
            cur[mid], opt[mid] = _best_splits(prefix, prev, mid, low, np.minimum(seg[:, 3], mid) - low + 1)
            left = np.stack((seg[:, 0], mid - 1, low, opt[mid]), axis=1)
            right = np.stack((mid + 1, seg[:, 1], opt[mid], seg[:, 3]), axis=1)
            seg = np.concatenate((left, right))
            seg = seg[seg[:, 0] <= seg[:, 1]]
        choice[layer - 1] = np.maximum(opt - row_base, 0)  # rows not solved in this layer: 0, never read
        prev = cur
    return _backtrack(choice, sizes, ks, stride, columns)


def _best_splits(prefix, prev, row, low, width):
    """For each row, min over j in low..low+width-1 of prev[j-1] + cost(j, row) and its leftmost j: all
    ranges end to end in one array, one minimum per range (complex numbers compare by value, then split)."""
    ends = np.cumsum(width)
    offs = ends - width
    cand = np.arange(ends[-1]) + np.repeat(low - offs, width)
    val = _cost(*(np.repeat(a[row + 1], width) for a in prefix), *(a[cand] for a in prefix))
    both = np.empty(cand.size, dtype=np.complex128)
    both.real = val
    both.real += prev[cand - 1]
    both.imag = cand
    best = np.minimum.reduceat(both, offs)
    return best.real, best.imag.astype(np.int64)


def _backtrack(choice, sizes, ks, stride, columns) -> np.ndarray:
    """Cluster starts from the split choices: from each row's last point back, layer by layer."""
    starts = np.repeat(sizes[:, None].astype(np.int64), columns, axis=1)  # unused: empty clusters
    starts[:, 0] = 0
    end = sizes - 1
    for layer in range(int(ks.max()) - 1, 0, -1):
        live = np.flatnonzero(ks > layer)
        starts[live, layer] = choice[layer - 1][live * stride + end[live]]
        end[live] = starts[live, layer] - 1
    return starts


def _running_means(pts, cw, first, sizes_per) -> np.ndarray:
    """kmeans1d's centroids: c += (x - c) * w_i / W(start..i), point by point, all clusters at once."""
    start, size = first.ravel(), sizes_per.ravel()
    c = np.zeros(start.size)
    for step in range(int(size.max(initial=0))):
        act = np.flatnonzero(size > step)
        i = start[act] + step
        c[act] += (pts[i] - c[act]) * (cw[i + 1] - cw[i]) / (cw[i + 1] - cw[start[act]])
    return c.reshape(first.shape)


# vector k-means ------------------------------------------------------------------------------------

_SEED = 0
_SAMPLE = 1 << 16  # larger inputs converge on a fixed random sample of this many points first
_SAMPLE_PER_CLUSTER = 512  # ... or of this many per cluster, if more
_SAMPLE_TOL = 1e-5  # stop on the sample when the centres move less than this (squared, times the variance)
_SAMPLE_ITERS = 100  # and after at most this many iterations there
_FULL_TOL = 1e-4  # the same on all points (scikit-learn, as coremltools calls it, stops at 1e-2)
_SEED_SAMPLE = 1 << 16  # k-means++ seeds are drawn from at most this many sample points
# at most this many iterations on all points (they start from converged sample centres); many clusters
# need more to reach scikit-learn's MSE (measured on 4M N(0, 0.02) weights: cluster_dim 4, 8 bits: 30)
_FEW_CLUSTERS = 16
_FULL_ITERS_FEW = 3  # up to _FEW_CLUSTERS clusters (4 bits)
_FULL_ITERS_MANY = 30
_NEAREST_CELLS = 1 << 18  # distances per matrix product (1 MB of float32)


_RESTARTS = 4  # seedings tried on small inputs (the first is the one large inputs get)
_RESTART_WORK = 1 << 22  # points × clusters up to which the restarts run


def vector_kmeans(points: np.ndarray, nbits: int) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means of points [N, v] from greedy k-means++ seeds (fixed seed): LUT [2**nbits, v] in the
    points' dtype (rows past the clusters 0) and uint8 labels of the nearest entry.

    Large inputs converge on a fixed random sample (cheap iterations), then refine on all points."""
    x = np.ascontiguousarray(points, dtype=np.float32)
    k = min(len(x), 1 << nbits)
    rng = np.random.default_rng(_SEED)
    var = float(np.mean(np.var(x, axis=0, dtype=np.float64)))
    sample = _subset(x, max(_SAMPLE, _SAMPLE_PER_CLUSTER * k), rng)
    seeds = _subset(sample, _SEED_SAMPLE, rng).astype(np.float64)
    centres, labels = _lloyd(sample, _kmeanspp(seeds, k, rng), _SAMPLE_TOL * var, _SAMPLE_ITERS)
    if sample is x and len(x) * k <= _RESTART_WORK:  # small: a few more seedings are cheap, keep the best
        best = _inertia(x, centres, labels)
        for restart in range(1, _RESTARTS):
            more = np.random.default_rng([_SEED, restart])
            seeds = _subset(x, _SEED_SAMPLE, more).astype(np.float64)
            c, lab = _lloyd(x, _kmeanspp(seeds, k, more), _SAMPLE_TOL * var, _SAMPLE_ITERS)
            if (inertia := _inertia(x, c, lab)) < best:
                best, centres, labels = inertia, c, lab
    if sample is not x:
        iters = _FULL_ITERS_FEW if k <= _FEW_CLUSTERS else _FULL_ITERS_MANY
        centres, labels = _lloyd(x, centres, _FULL_TOL * var, iters)
    lut = np.zeros((1 << nbits, x.shape[1]))
    lut[:k] = centres
    return lut.astype(points.dtype), labels.astype(np.uint8)


def _inertia(x: np.ndarray, centres: np.ndarray, labels: np.ndarray) -> float:
    return float(np.sum((x - centres[labels]) ** 2, dtype=np.float64))


def _subset(x: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """x itself if it has at most `size` rows, else that many random rows (in their order)."""
    return x if len(x) <= size else x[np.sort(rng.choice(len(x), size, replace=False))]


def _lloyd(x: np.ndarray, centres: np.ndarray, tol: float, max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd iterations until the labels settle or the centres move less than tol (squared, summed); an
    empty cluster keeps its centre. Returns the centres and each point's nearest one."""
    k = len(centres)
    labels = _nearest(x, centres)
    for _ in range(max_iter):
        counts = np.bincount(labels, minlength=k)
        sums = np.stack([np.bincount(labels, weights=x[:, d], minlength=k) for d in range(x.shape[1])], axis=1)
        moved = np.where((counts > 0)[:, None], sums / np.maximum(counts, 1)[:, None], centres)
        shift = float(np.sum((moved - centres) ** 2))
        centres, new = moved, _nearest(x, moved)
        settled = shift <= tol or np.array_equal(new, labels)
        labels = new
        if settled:
            break
    return centres, labels


def _kmeanspp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++: each new centre is the best of 2 + log(k) candidates drawn ∝ squared distance."""
    trials = 2 + int(np.log(k))
    centres = np.empty((k, x.shape[1]))
    centres[0] = x[rng.integers(len(x))]
    d2 = np.sum((x - centres[0]) ** 2, axis=1)
    for c in range(1, k):
        total = d2.sum()
        if total <= 0:  # fewer distinct points than clusters: repeat one
            centres[c:] = centres[0]
            break
        picks = np.searchsorted(np.cumsum(d2), rng.random(trials) * total).clip(0, len(x) - 1)
        cand = np.minimum(d2, np.sum((x[:, None, :] - x[picks][None, :, :]) ** 2, axis=2).T)
        best = int(np.argmin(cand.sum(axis=1)))
        centres[c] = x[picks[best]]
        d2 = cand[best]
    return centres


def _nearest(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of the nearest centre for every point: argmin of |c|^2 - 2 x.c in float32, in cache-sized
    chunks. The products use einsum's own loops: with a handful of coordinates per point, BLAS adds
    threading overhead (measured 10x slower on a busy 2-core machine) and nothing else."""
    c = centres.astype(np.float32)
    scaled = np.ascontiguousarray(-2 * c.T)
    cc = np.sum(c * c, axis=1)
    out = np.empty(len(x), dtype=np.intp)
    chunk = max(256, _NEAREST_CELLS // len(c))
    for start in range(0, len(x), chunk):
        d = np.einsum("nv,vk->nk", x[start : start + chunk], scaled)
        d += cc
        out[start : start + chunk] = np.argmin(d, axis=1)
    return out
