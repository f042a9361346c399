"""Pruning of ML-program weights: coremltools 9.0's `prune_weights` (MLPROGRAM.md §7), with its tie bug fixed.

magnitude: zero the `target_sparsity` fraction of smallest |w| (block_size: rank blocks of `block_size`
consecutive channels on axis `dim` by their L2 norm; n_m: zero the n smallest of every m consecutive
elements along `dim`). threshold: zero |w| <= threshold, and keep the weight dense (None) when fewer
than `minimum_sparsity` of its values end up zero.

The tie fix. coremltools zeroes every element whose magnitude is <= numpy's (linearly interpolated)
percentile, so every value tied with the percentile goes: a constant weight is pruned to 100 % for a 50 %
target, lattice weights to 57 %. Ours prunes what coremltools prunes when at most one element (one
block) sits exactly at the percentile — identical results on tie-free weights — and otherwise breaks the
tie by position: everything below the percentile, then the tied elements (whole blocks) in row-major
order of their first element, until the percentile's rank `floor(q·(N − 1)) + 1` elements are pruned
(block mode: up to the block holding that rank). That count is numpy's percentile rank, not
`round(q·N)`: the two differ by one element for some N (e.g. N odd, q = 0.5), and only the former
matches coremltools on tie-free weights.

n:m: coremltools ranks each group of m with numpy's default (unstable) argsort; we use a stable sort, so
among equal magnitudes in one group the earlier elements are pruned. Results can differ only there
(groups with ties at the n-th smallest magnitude).

Values that are zero before pruning are never stored (mask = result != 0, as coremltools). An all-zero
result is returned as is (mask all False, empty `nonzero`): the writer decides to keep it dense. NaN
weights raise ValueError; settings that do not fit the weight raise `NotApplicable`.

Speed (issue #17: pruning at I/O speed), with results bit for bit those of the plain formulation (np.percentile,
element-level block ids, argsort; tests/quant/test_prune.py keeps it as the reference): magnitudes are
compared as integer bit patterns (numpy's fp16 loops are ~20x slower); the percentile's two order statistics
are selected in O(n) from a sampled bracket instead of a full partition; block decisions are made per block;
n:m ranks come from pairwise comparisons; the kept values are gathered with np.compress (not w[mask]).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlqpipe.quant.affine import NotApplicable
from mlqpipe.quant.results import SparseResult


@dataclass(frozen=True)
class PruneSettings:
    mode: str = "magnitude"  # "magnitude" | "threshold"
    target_sparsity: float | None = None  # magnitude (unstructured or block_size)
    threshold: float = 1e-12  # threshold mode
    minimum_sparsity: float = 0.5  # threshold mode: keep dense below this zero fraction
    block_size: int | None = None  # magnitude: blocks of channels on axis dim
    n_m: tuple[int, int] | None = None  # magnitude: n of every m along dim
    dim: int | None = None  # None: 0 for block_size, 1 for n_m


def prune(values: np.ndarray, s: PruneSettings) -> SparseResult | None:
    """Prune one weight; None when threshold pruning leaves it below `minimum_sparsity` (keep it dense)."""
    w = np.asarray(values)
    if w.dtype.kind != "f":
        raise ValueError(f"pruning needs float weights, not {w.dtype}")
    mag = _Magnitudes.of(w)
    if mag.has_nan():
        raise ValueError("the weight contains NaN; it cannot be pruned")
    if s.mode == "threshold":
        mask = _threshold_mask(w, mag, s.threshold)
        if (w.size - np.count_nonzero(mask)) / w.size < s.minimum_sparsity:
            return None
    elif s.mode == "magnitude":
        mask = _magnitude_mask(w, mag, s)
    else:
        raise ValueError(f"prune mode {s.mode!r} is not one of magnitude, threshold")
    return SparseResult(mask, np.compress(mask.ravel(), w.ravel()))  # compress: several times faster than w[mask]


def densify(r: SparseResult) -> np.ndarray:
    out = np.zeros(r.mask.shape, dtype=r.nonzero.dtype)
    out[r.mask] = r.nonzero
    return out


# --- magnitudes as sort keys -------------------------------------------------------------------------------


_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


class _Magnitudes:
    """|x| as sort keys. For IEEE floats the unsigned bit pattern with the sign cleared: it orders like the
    value (±0 → 0, inf below every NaN) and compares with integer instructions, which numpy runs ~20x faster
    than its fp16 loops. Other float types (long double) keep |x| itself.

    The keys of a weight are made chunk by chunk where a pass allows it (the NaN check, the percentile's
    bracket, the final comparison), into one cache-sized buffer: a weight-sized array of keys is built
    (`keys`) only for the paths that need one, so unstructured pruning writes no weight-sized temporary."""

    def __init__(self, source: np.ndarray, dtype: np.dtype, sign_off: np.generic | None):
        self._source = source  # C-contiguous: the keys themselves (sign_off None) or the weight's bits
        self._sign_off = sign_off
        self._keys = source if sign_off is None else None
        self.dtype = dtype  # the float type the keys stand for
        self.shape = source.shape
        self.size = source.size

    @staticmethod
    def of(x: np.ndarray) -> "_Magnitudes":
        """Keys of |x| for any float array."""
        uint = _UINT.get(x.dtype.itemsize) if x.dtype in (np.float16, np.float32, np.float64) else None
        if uint is None:
            return _Magnitudes(np.abs(x, order="C"), x.dtype, None)
        x = x if x.flags.c_contiguous else x.copy(order="C")  # (not ascontiguousarray: it makes 0-d arrays 1-d)
        return _Magnitudes(x.view(uint), x.dtype, uint(np.iinfo(uint).max >> 1))

    @staticmethod
    def of_nonnegative(x: np.ndarray) -> "_Magnitudes":
        """Keys of a C-contiguous array of values >= 0 (+0, not −0) without a copy."""
        uint = _UINT.get(x.dtype.itemsize) if x.dtype in (np.float16, np.float32, np.float64) else None
        return _Magnitudes(x if uint is None else x.view(uint), x.dtype, None)

    @property
    def keys(self) -> np.ndarray:
        """All keys, in the weight's shape (made on first use)."""
        if self._keys is None:
            self._keys = np.bitwise_and(self._source, self._sign_off)
        return self._keys

    @property
    def key_dtype(self) -> np.dtype:
        return self._source.dtype

    def chunks(self):
        """(start, keys of the flat elements start..start+len) in _CHUNK pieces; a piece is only valid until
        the next one is made."""
        flat = self._source.reshape(-1)
        if self._keys is not None:
            keys = self._keys.reshape(-1)
            for start in range(0, flat.size, _CHUNK):
                yield start, keys[start:start + _CHUNK]
            return
        buf = np.empty(min(flat.size, _CHUNK), flat.dtype)
        for start in range(0, flat.size, _CHUNK):
            part = flat[start:start + _CHUNK]
            yield start, np.bitwise_and(part, self._sign_off, out=buf[:part.size])

    def take(self, index: np.ndarray) -> np.ndarray:
        """The keys at these flat positions."""
        if self._keys is not None:
            return self._keys.reshape(-1)[index]
        return np.bitwise_and(self._source.reshape(-1)[index], self._sign_off)

    def greater(self, key: np.generic) -> np.ndarray:
        """keys > key, in the weight's shape."""
        if self._keys is not None:
            return self._keys > key
        out = np.empty(self.shape, dtype=bool)
        flat = out.reshape(-1)
        for start, part in self.chunks():
            np.greater(part, key, out=flat[start:start + part.size])
        return out

    @property
    def is_bits(self) -> bool:
        return self.key_dtype != self.dtype

    def key(self, value: np.generic) -> np.generic:
        """The key of a value >= 0 of our dtype (−0 maps to 0)."""
        v = abs(self.dtype.type(value))
        return np.asarray(v).view(self.key_dtype)[()] if self.is_bits else v

    def value(self, key: np.generic) -> np.generic:
        return np.asarray(key).view(self.dtype)[()] if self.is_bits else key

    def has_nan(self) -> bool:
        if not self.size:
            return False
        if self._keys is None and self.dtype in (np.float32, np.float64):  # numpy's own max is vectorised for these
            return bool(np.isnan(self._source.view(self.dtype).max()))
        top = max(part.max() for _, part in self.chunks())  # max propagates NaN for floats; NaN bit patterns lie above inf's
        return bool(top > self.key(np.inf)) if self.is_bits else bool(np.isnan(top))


def _keep(mag: _Magnitudes, pruned: np.ndarray) -> np.ndarray:
    """The stored elements: not pruned and not already zero."""
    keep = mag.keys != 0
    keep &= ~pruned
    return keep


def _threshold_mask(w: np.ndarray, mag: _Magnitudes, threshold: float) -> np.ndarray:
    if type(threshold) is float and threshold >= 0:  # a Python float compares as the weight's dtype (NEP 50)
        with np.errstate(over="ignore"):
            t = w.dtype.type(threshold)
        return mag.greater(mag.key(t))  # |w| > t >= 0 implies w != 0: one comparison
    return _keep(mag, np.abs(w) <= threshold)  # negative, NaN or numpy-typed thresholds: as written


def _magnitude_mask(w: np.ndarray, mag: _Magnitudes, s: PruneSettings) -> np.ndarray:
    if (s.target_sparsity is None) == (s.n_m is None):
        raise ValueError("magnitude pruning needs exactly one of target_sparsity and n_m")
    if s.block_size is not None and s.n_m is not None:
        raise ValueError("block_size and n_m cannot be combined")
    if s.n_m is not None:
        return _keep(mag, _n_m(mag.keys, s.n_m, 1 if s.dim is None else s.dim))
    t = float(s.target_sparsity)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"target_sparsity {t} is not in [0, 1]")
    blocks = None
    if s.block_size is not None:
        blocks = _block_norms(w, int(s.block_size), 0 if s.dim is None else s.dim)
    q = t * 100  # as coremltools: its special cases compare this product
    if q == 100:
        return np.zeros(w.shape, dtype=bool)
    if q == 0:
        return mag.keys != 0
    if blocks is not None:
        return _keep(mag, blocks.expand(_blocks_below_percentile(blocks, q)))
    return _unstructured_mask(mag, q)


# --- numpy's percentile (method "linear"), bit for bit, in O(n) ----------------------------------------------
#
# np.percentile(a, q) sorts a, takes the virtual index v = (n − 1)·(q/100) (float64), its neighbours
# k = floor(v) and k + 1 (both n − 1 when v >= n − 1, where numpy then uses gamma = v + 1), gamma = v − k,
# and interpolates in a's dtype: a_k + (a_k1 − a_k)·gamma, or a_k1 − (a_k1 − a_k)·(1 − gamma) when
# gamma >= 0.5. Only the two order statistics need a selection (on the keys, which sort like the values);
# the rest is replayed with the same numpy scalar operations, so the result is the same float.

_SMALL = 1 << 16  # below this, np.partition of a copy is as fast as anything
_SAMPLE = 1 << 15  # bracket estimate: rank error ~ sqrt(_SAMPLE) / 2 samples at worst
_CHUNK = 1 << 18  # elements per pass of the bracket (1 MB of fp32 keys)
_SIGMAS = 4.0  # bracket half-width in standard deviations of the sample rank: misses ~1e-4


@dataclass(frozen=True, eq=False)
class _Bracket:
    """Every key in [lo, hi] (all in `inside`, unordered) and the count of keys below lo; lo = hi = None: all
    keys are inside."""

    lo: np.generic | None
    hi: np.generic | None
    below: int
    inside: np.ndarray


def _percentile_index(n: int, q: float) -> tuple[int, int, float]:
    """numpy's neighbour ranks and interpolation weight for the q-th percentile of n values."""
    v = (n - 1) * float(np.true_divide(q, 100))
    if v >= n - 1:
        return n - 1, n - 1, v + 1.0  # numpy sets both neighbours to the last element (index −1)
    k = int(np.floor(v))
    return k, k + 1, v - float(k)


def _interpolate(a: np.generic, b: np.generic, gamma: float) -> np.generic:
    """numpy's linear interpolation (the two-sided form it uses for accuracy), in a's dtype."""
    diff = b - a
    return b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma


def _percentile(mag: _Magnitudes, q: float) -> tuple[np.generic, _Bracket]:
    """np.percentile(|x|, q) bit for bit, with the bracket of keys its order statistics came from."""
    k0, k1, gamma = _percentile_index(mag.size, q)
    (a, b), bracket = _select(mag, (k0, k1))
    return _interpolate(mag.value(a), mag.value(b), gamma), bracket


def _select(mag: _Magnitudes, ranks: tuple[int, int]) -> tuple[tuple[np.generic, np.generic], _Bracket]:
    """The keys of rank `ranks` in sorted(keys) (flat), and a bracket around them."""
    bracket = _bracket(mag, ranks) if mag.size > _SMALL and mag.key_dtype.kind == "u" else None
    if bracket is None:  # small, or the sample missed (improbable): select among everything
        bracket = _Bracket(None, None, 0, mag.keys.ravel().copy())
    if bracket.lo is not None and bracket.lo == bracket.hi:  # one key inside (e.g. the zeros of a sparse weight)
        return (bracket.lo, bracket.lo), bracket
    r = [k - bracket.below for k in ranks]
    bracket.inside.partition(r)  # our own copy
    return (bracket.inside[r[0]], bracket.inside[r[1]]), bracket


def _bracket(mag: _Magnitudes, ranks: tuple[int, int]) -> _Bracket | None:
    """Bound the ranks by quantiles of a sample, then one pass: d = key − lo wraps keys below lo past the
    signed maximum (keys of non-NaN values are below it) and lands [lo, hi] in [0, hi − lo]."""
    n, kt = mag.size, mag.key_dtype
    sample = mag.take(np.random.default_rng(0).integers(0, n, _SAMPLE))  # fixed seed: only the timing depends on it
    p = ranks[0] / (n - 1)
    margin = int(_SIGMAS * np.sqrt(_SAMPLE * p * (1 - p))) + 2
    at = int(p * (_SAMPLE - 1))
    r_lo, r_hi = max(at - margin, 0), min(at + 1 + margin, _SAMPLE - 1)
    sample.partition([r_lo, r_hi])
    lo = kt.type(0) if r_lo == 0 else sample[r_lo]
    hi = np.iinfo(kt).max >> 1 if r_hi == _SAMPLE - 1 else sample[r_hi]
    below, inside, span, buf = 0, [], kt.type(hi - lo), np.empty(min(n, _CHUNK), kt)
    signed = kt.str.replace("u", "i")
    for _, part in mag.chunks():  # in cache-sized chunks: no weight-sized temporaries
        d = np.subtract(part, lo, out=buf[:part.size])
        below += int(np.count_nonzero(d.view(signed) < 0))
        inside.append(np.compress(d <= span, part))
    inside = np.concatenate(inside)
    if below > ranks[0] or below + inside.size <= ranks[1]:
        return None
    return _Bracket(lo, kt.type(hi), below, inside)


def _counts_at(mag: _Magnitudes, key: np.generic, bracket: _Bracket) -> tuple[int, int]:
    """How many keys are < key and == key; from the bracket when key is inside it."""
    if bracket.lo is None or bracket.lo <= key <= bracket.hi:
        below = bracket.below + int(np.count_nonzero(bracket.inside < key))
        return below, int(np.count_nonzero(bracket.inside == key))
    keys = mag.keys
    return int(np.count_nonzero(keys < key)), int(np.count_nonzero(keys == key))


# --- unstructured --------------------------------------------------------------------------------------------


def _unstructured_mask(mag: _Magnitudes, q: float) -> np.ndarray:
    """Keep |w| > percentile, plus the tied elements past the percentile's rank (module doc): one comparison
    over the weight unless there is a tie."""
    thr, bracket = _percentile(mag, q)
    if np.isnan(thr):  # inf − inf in the interpolation: nothing is below or at NaN, so nothing is pruned
        return mag.keys != 0
    key = mag.key(thr)
    keep = mag.greater(key)  # |w| > thr >= 0, so w != 0
    if key == 0:  # the tied elements are zeros: never stored, whatever the tie-break
        return keep
    below, tied = _counts_at(mag, key, bracket)
    if tied > 1:
        flat = mag.keys.ravel()
        need = int(np.floor(q / 100 * (flat.size - 1))) + 1 - below
        keep.ravel()[np.flatnonzero(flat == key)[min(max(need, 0), tied):]] = True
    return keep


# --- blocks --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Blocks:
    """L2 norms of blocks of `size` channels along axis `dim`, laid out like the weight with that axis
    holding blocks instead of channels."""

    norms: np.ndarray
    counts: np.ndarray  # int64 [blocks]: channels in each block (the last may be short)
    dim: int
    size: int

    def expand(self, per_block: np.ndarray) -> np.ndarray:
        """A per-block array as a per-element array of the weight's shape."""
        return np.repeat(per_block, self.counts, axis=self.dim)

    def per_channel_count(self, per_block: np.ndarray) -> int:
        """How many elements the True blocks of a per-block bool cover."""
        others = tuple(a for a in range(per_block.ndim) if a != self.dim)
        return int(np.count_nonzero(per_block, axis=others) @ self.counts)


def _block_norms(w: np.ndarray, b: int, dim: int) -> _Blocks:
    """Block L2 norms in the weight's dtype, rounded exactly as coremltools' np.sum over axis 1 of the
    C-contiguous [blocks, b, ...] squares (channel axis moved first, zero-padded): that reduction adds the
    b squares one after the other, rounding each sum, unless nothing but the block axis is left to iterate
    (then numpy sums pairwise); the first is replayed here without moving the channel axis."""
    if dim not in (0, 1):
        raise ValueError(f"block pruning needs dim 0 or 1, not {dim}")
    if not 2 <= w.ndim <= 5:
        raise ValueError(f"block pruning needs a weight of rank 2 to 5, not {w.ndim}")
    if b < 1:
        raise ValueError(f"block_size {b} must be at least 1")
    channels = w.shape[dim]
    if b > channels / 2:
        raise NotApplicable(f"block_size {b} is more than half of the {channels} channels on axis {dim}")
    pad = -channels % b
    n_blocks = (channels + pad) // b
    counts = np.full(n_blocks, b, dtype=np.int64)
    counts[-1] = b - pad
    if w.size == channels:  # a single row or column: numpy's pairwise summation, so its very call
        squares = np.zeros((channels + pad,) + (1,) * (w.ndim - 1), dtype=w.dtype)
        np.multiply(w.reshape(squares[:channels].shape), w.reshape(squares[:channels].shape),
                    out=squares[:channels])
        norms = np.sqrt(np.sum(squares.reshape((n_blocks, b) + squares.shape[1:]), axis=1))
        return _Blocks(norms.reshape(tuple(n_blocks if a == dim else 1 for a in range(w.ndim))), counts, dim, b)
    padded = w.shape[:dim] + (channels + pad,) + w.shape[dim + 1:]
    squares = np.zeros(padded, dtype=w.dtype) if pad else np.empty(padded, dtype=w.dtype)
    np.multiply(w, w, out=squares[(slice(None),) * dim + (slice(0, channels),)])  # x·x = |x|·|x|
    split = squares.reshape(w.shape[:dim] + (n_blocks, b) + w.shape[dim + 1:])
    member = [split[(slice(None),) * (dim + 1) + (j,)] for j in range(b)]
    total = member[0].copy()
    for x in member[1:]:  # in channel order, rounding every sum: numpy's outer-loop reduction
        np.add(total, x, out=total)
    return _Blocks(np.sqrt(total, out=total), counts, dim, b)


def _blocks_below_percentile(blocks: _Blocks, q: float) -> np.ndarray:
    """Per block: pruned. The percentile is over every element's block norm (a norm counts once per channel
    of its block); ties between blocks are broken by the position of their first element."""
    norms, counts, b = blocks.norms, blocks.counts, blocks.size
    n = int(norms.size // counts.size * counts.sum())
    k0, k1, gamma = _percentile_index(n, q)
    if counts[-1] == b:  # every norm counted b times: element rank k is norm rank k // b
        mag, ranks = _Magnitudes.of_nonnegative(np.ascontiguousarray(norms)), (k0 // b, k1 // b)
    else:
        mag, ranks = _Magnitudes.of_nonnegative(blocks.expand(norms)), (k0, k1)
    (lo, hi), _ = _select(mag, ranks)
    thr = _interpolate(mag.value(lo), mag.value(hi), gamma)
    pruned = norms < thr
    tied = np.nonzero(norms == thr)
    if tied[0].size <= 1:  # one tied block is pruned whole
        pruned[tied] = True
        return pruned
    first = list(tied)
    first[blocks.dim] = tied[blocks.dim] * b  # the block's first channel
    shape = list(norms.shape)
    shape[blocks.dim] = int(counts.sum())
    order = np.argsort(np.ravel_multi_index(first, shape), kind="stable")
    sizes = counts[tied[blocks.dim][order]]
    need = int(np.floor(q / 100 * (n - 1))) + 1 - blocks.per_channel_count(pruned)
    take = min(int(np.searchsorted(np.cumsum(sizes), need)) + 1, order.size) if need > 0 else 0
    pruned[tuple(t[order[:take]] for t in tied)] = True
    return pruned


# --- n:m -----------------------------------------------------------------------------------------------------

_PAIRWISE_M = 16  # up to this m, ranks from m·(m − 1)/2 comparisons beat an argsort of the groups


def _n_m(keys: np.ndarray, n_m: tuple[int, int], dim: int) -> np.ndarray:
    """The n smallest magnitudes (keys) of every m consecutive elements along `dim` (zero-padded at the end),
    equal magnitudes ranked by position (a stable sort)."""
    n, m = (int(x) for x in n_m)
    if not 0 <= n <= m or m < 1:
        raise ValueError(f"n_m {(n, m)} needs 0 <= n <= m and m >= 1")
    if dim not in (0, 1):
        raise ValueError(f"n:m pruning needs dim 0 or 1, not {dim}")
    if not 2 <= keys.ndim <= 5:
        raise ValueError(f"n:m pruning needs a weight of rank 2 to 5, not {keys.ndim}")
    channels = keys.shape[dim]
    if m > channels / 2:
        raise NotApplicable(f"m = {m} is more than half of the {channels} channels on axis {dim}")
    pad = -channels % m
    if pad:
        keys = np.pad(keys, [(0, pad) if a == dim else (0, 0) for a in range(keys.ndim)])
    groups = keys.reshape(keys.shape[:dim] + (keys.shape[dim] // m, m) + keys.shape[dim + 1:])
    hit = _first_in_groups(groups, n, dim + 1)
    return hit.reshape(keys.shape)[(slice(None),) * dim + (slice(0, channels),)]


def _first_in_groups(groups: np.ndarray, n: int, axis: int) -> np.ndarray:
    """Bool of groups' shape: the element is among the n first of its group (along `axis`) in a stable sort."""
    m = groups.shape[axis]
    if m > _PAIRWISE_M:
        order = np.argsort(np.moveaxis(groups, axis, -1), axis=-1, kind="stable")[..., :n]
        hit = np.zeros(order.shape[:-1] + (m,), dtype=bool)
        np.put_along_axis(hit, order, True, axis=-1)
        return np.moveaxis(hit, -1, axis)
    at = [(slice(None),) * axis + (j,) for j in range(m)]
    member = [groups[a] if groups[a].strides[-1] == groups.itemsize else np.ascontiguousarray(groups[a]) for a in at]
    # stable position of member i = #(earlier members <= it) + #(later members < it): one comparison per pair,
    # counted for the later member and (as its complement) against the earlier one
    rank = [np.full(member[0].shape, m - 1 - i, dtype=np.uint8) for i in range(m)]
    for i in range(m):
        for j in range(i + 1, m):
            earlier_le = np.less_equal(member[i], member[j]).view(np.uint8)
            rank[j] += earlier_le
            rank[i] -= earlier_le
    hit = np.empty(groups.shape, dtype=bool)
    for a, r in zip(at, rank):
        np.less(r, n, out=hit[a])
    return hit
