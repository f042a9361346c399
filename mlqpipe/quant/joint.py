"""Joint compression kernels: a second compression on top of a first, as coremltools 9.0's
`joint_compression=True` computes it (iOS18 chains of constexpr ops; MLPROGRAM.md §7 "Joint compression").

- `quantize_lut`: a palettized weight's LUT linearly quantized per tensor to int8/uint8 (what
  `linear_quantize_weights(joint_compression=True)` does to a `constexpr_lut_to_dense`'s table; other
  granularities are refused there too, since the table's axes are not the weight's).
- `palettize_nonzero`: a pruned weight palettized (`palettize_weights(joint_compression=True)`). coremltools
  palettizes the *dense* weight, pruned zeros included (they pull a LUT entry towards 0), with the
  grouping of the weight's own axes, then keeps the indices at the mask's positions: so the LUT has the
  mask's rank + 2 and the indices are 1-D.
- `quantize_nonzero`: a pruned weight quantized: the dense weight (zeros included) quantized with the
  weight's granularity, codes kept at the mask's positions, scale/offset on the mask's shape. A pruned
  and palettized weight gets its LUT quantized instead (per tensor only).

`dense` decodes any result, nested ones included, exactly as the constexpr chain it is written as does.
Errors are ValueError without the weight's name (the caller adds it), as in the other kernels.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from mlqpipe.quant.affine import AffineSettings, dequantize, linear_quantize
from mlqpipe.quant.palette import PaletteSettings, depalettize, palettize
from mlqpipe.quant.results import AffineResult, PaletteResult, SparseResult

LUT_DTYPES = ("int8", "uint8")  # what constexpr_lut_to_dense's lut can hold besides floats


def quantize_lut(r: PaletteResult, dtype: str = "int8", mode: str = "linear_symmetric") -> PaletteResult:
    """The same palettized weight with its LUT quantized per tensor (one scale for the whole table)."""
    if dtype not in LUT_DTYPES:
        raise ValueError(f"a LUT can be quantized to {' or '.join(LUT_DTYPES)}, not {dtype}")
    if isinstance(r.lut, AffineResult):
        raise ValueError("the LUT is already quantized")
    table = linear_quantize(np.asarray(r.lut), AffineSettings(mode=mode, dtype=dtype, granularity="per_tensor"))
    return replace(r, lut=table)


def palettize_nonzero(r: SparseResult, s: PaletteSettings) -> SparseResult:
    """A pruned weight with its kept values palettized: the dense weight's LUT, the kept positions' indices."""
    if not isinstance(r.nonzero, np.ndarray):
        raise ValueError(f"the pruned weight's values are already {_kind(r.nonzero)}")
    if s.cluster_dim > 1:
        raise ValueError("vector palettization (cluster_dim > 1) of a pruned weight is not supported")
    if s.enable_per_channel_scale:
        raise ValueError("a pruned weight cannot be palettized with a per-channel scale (coremltools 9.0 fails on it too)")
    mask = np.asarray(r.mask, bool)
    p = palettize(_densify(mask, r.nonzero), s)
    return SparseResult(mask, PaletteResult(p.lut, np.ascontiguousarray(p.indices[mask]), p.nbits, None))


def quantize_nonzero(r: SparseResult, s: AffineSettings) -> SparseResult:
    """A pruned weight with its kept values quantized (or, when they are palettized, its LUT per tensor)."""
    if isinstance(r.nonzero, PaletteResult):
        if s.granularity != "per_tensor":
            raise ValueError("a palettized weight's LUT is quantized per tensor only (granularity per_tensor)")
        return replace(r, nonzero=quantize_lut(r.nonzero, s.dtype, s.mode))
    if not isinstance(r.nonzero, np.ndarray):
        raise ValueError(f"the pruned weight's values are already {_kind(r.nonzero)}")
    mask = np.asarray(r.mask, bool)
    q = linear_quantize(_densify(mask, r.nonzero), s)
    return SparseResult(mask, AffineResult(np.ascontiguousarray(q.data[mask]), q.scale, q.zero_point, q.dtype))


def dense(r) -> np.ndarray:
    """The weight a (possibly nested) ML-program result decodes to, in its float dtype."""
    if isinstance(r, np.ndarray):
        return r
    if isinstance(r, AffineResult):
        return dequantize(r)
    if isinstance(r, PaletteResult):
        return depalettize(replace(r, lut=dense(r.lut)) if isinstance(r.lut, AffineResult) else r)
    if isinstance(r, SparseResult):
        mask = np.asarray(r.mask, bool)
        if isinstance(r.nonzero, np.ndarray):
            return _densify(mask, r.nonzero)
        if isinstance(r.nonzero, PaletteResult):  # every position looks up its group's table; zeros elsewhere
            full = dense(replace(r.nonzero, indices=_densify(mask, r.nonzero.indices)))
        else:
            full = dense(replace(r.nonzero, data=_densify(mask, r.nonzero.data)))
        return np.where(mask, full, np.zeros((), full.dtype))
    raise TypeError(f"not an ML-program result: {type(r).__name__}")


def _densify(mask: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = np.zeros(mask.shape, dtype=np.asarray(values).dtype)
    out[mask] = np.asarray(values).reshape(-1)
    return out


def _kind(nonzero) -> str:
    return "palettized" if isinstance(nonzero, PaletteResult) else "quantized"
