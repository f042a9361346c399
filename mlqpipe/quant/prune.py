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
    if np.isnan(np.max(w)) if w.size else False:  # max propagates NaN: one pass, no temporary
        raise ValueError("the weight contains NaN; it cannot be pruned")
    if s.mode == "threshold":
        pruned = np.abs(w) <= s.threshold
        if np.count_nonzero(pruned | (w == 0)) / w.size < s.minimum_sparsity:
            return None
    elif s.mode == "magnitude":
        pruned = _magnitude(w, s)
    else:
        raise ValueError(f"prune mode {s.mode!r} is not one of magnitude, threshold")
    mask = ~pruned & (w != 0)
    return SparseResult(mask, w[mask])


def densify(r: SparseResult) -> np.ndarray:
    out = np.zeros(r.mask.shape, dtype=r.nonzero.dtype)
    out[r.mask] = r.nonzero
    return out


def _magnitude(w: np.ndarray, s: PruneSettings) -> np.ndarray:
    if (s.target_sparsity is None) == (s.n_m is None):
        raise ValueError("magnitude pruning needs exactly one of target_sparsity and n_m")
    if s.block_size is not None and s.n_m is not None:
        raise ValueError("block_size and n_m cannot be combined")
    if s.n_m is not None:
        return _n_m(w, s.n_m, 1 if s.dim is None else s.dim)
    t = float(s.target_sparsity)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"target_sparsity {t} is not in [0, 1]")
    if s.block_size is not None:
        dim = 0 if s.dim is None else s.dim
        magnitude, units = _block_norms(w, int(s.block_size), dim)
    else:
        magnitude, units = np.abs(w), None
    q = t * 100  # as coremltools: its special cases compare this product
    if q == 100:
        return np.ones(w.shape, dtype=bool)
    if q == 0:
        return np.zeros(w.shape, dtype=bool)
    return _below_percentile(magnitude, q, units)


def _below_percentile(magnitude: np.ndarray, q: float, units: np.ndarray | None) -> np.ndarray:
    """magnitude <= percentile(q), with ties at the percentile broken by position (see the module doc)."""
    thr = np.percentile(magnitude, q)
    pruned = magnitude < thr
    at = np.flatnonzero(magnitude == thr)  # row-major positions
    ids = at if units is None else units.ravel()[at]
    first_ids, first_pos, sizes = np.unique(ids, return_index=True, return_counts=True)
    if first_ids.size > 1:  # a tie: prune tied units in position order up to the percentile's rank
        order = np.argsort(first_pos, kind="stable")
        need = int(np.floor(q / 100 * (magnitude.size - 1))) + 1 - np.count_nonzero(pruned)
        take = min(int(np.searchsorted(np.cumsum(sizes[order]), need)) + 1, order.size) if need > 0 else 0
        keep_ids = first_ids[order[:take]]
        at = at[np.isin(ids, keep_ids)]
    pruned.ravel()[at] = True
    return pruned


def _channels_last_2d(w: np.ndarray, dim: int, op: str) -> tuple[np.ndarray, list[int]]:
    rank = w.ndim
    if dim not in (0, 1):
        raise ValueError(f"{op} pruning needs dim 0 or 1, not {dim}")
    if not 2 <= rank <= 5:
        raise ValueError(f"{op} pruning needs a weight of rank 2 to 5, not {rank}")
    perm = list(range(2, rank)) + ([1, 0] if dim == 0 else [0, 1])
    return np.transpose(w, perm), perm


def _n_m(w: np.ndarray, n_m: tuple[int, int], dim: int) -> np.ndarray:
    """The n smallest magnitudes of every m consecutive elements along `dim` (zero-padded at the end)."""
    n, m = (int(x) for x in n_m)
    if not 0 <= n <= m or m < 1:
        raise ValueError(f"n_m {(n, m)} needs 0 <= n <= m and m >= 1")
    moved, perm = _channels_last_2d(w, dim, "n:m")
    rows = moved.reshape(-1, moved.shape[-1])
    channels = rows.shape[-1]
    if m > channels / 2:
        raise NotApplicable(f"m = {m} is more than half of the {channels} channels on axis {dim}")
    pad = -channels % m
    groups = np.pad(np.abs(rows), ((0, 0), (0, pad))).reshape(-1, m)
    smallest = np.argsort(groups, axis=-1, kind="stable")[:, :n]
    hit = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(hit, smallest, True, axis=-1)
    hit = hit.reshape(rows.shape[0], channels + pad)[:, :channels].reshape(moved.shape)
    return np.transpose(hit, np.argsort(perm))


def _block_norms(w: np.ndarray, b: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Per element: the L2 norm of its block of b channels on axis dim (computed in the weight's dtype,
    in coremltools' order), and the block's id."""
    if dim not in (0, 1):
        raise ValueError(f"block pruning needs dim 0 or 1, not {dim}")
    if not 2 <= w.ndim <= 5:
        raise ValueError(f"block pruning needs a weight of rank 2 to 5, not {w.ndim}")
    if b < 1:
        raise ValueError(f"block_size {b} must be at least 1")
    channels = w.shape[dim]
    if b > channels / 2:
        raise NotApplicable(f"block_size {b} is more than half of the {channels} channels on axis {dim}")
    swap = [1, 0] + list(range(2, w.ndim))
    mag = np.abs(w)
    moved = np.transpose(mag, swap) if dim == 1 else mag
    pad = -channels % b
    if pad:
        moved = np.pad(moved, [(0, pad)] + [(0, 0)] * (w.ndim - 1))
    blocks = np.ascontiguousarray(moved.reshape((moved.shape[0] // b, b) + moved.shape[1:]))
    norms = np.sqrt(np.sum(blocks * blocks, axis=1, keepdims=True))
    tiled = np.broadcast_to(norms, blocks.shape).reshape(moved.shape)[:channels]
    rest = int(np.prod(moved.shape[1:]))
    ids = (np.arange(channels)[:, None] // b * rest + np.arange(rest)[None, :]).reshape(tiled.shape)
    if dim == 1:
        tiled, ids = np.transpose(tiled, swap), np.transpose(ids, swap)
    return np.ascontiguousarray(tiled), np.ascontiguousarray(ids)
