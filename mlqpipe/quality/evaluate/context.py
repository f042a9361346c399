"""The contract between the network runner and the layer tables of the evaluator.

Tensors: every blob is a float32 (or integer-valued float32) numpy array whose axis 0 is the *sample* axis:
the evaluator runs a batch of N samples through every layer at once.
- Classic networks (arrayInputShapeMapping RANK5, Core ML's [Seq, Batch, C, H, W]): blobs are
  (N, S, C, H, W); Core ML's Batch axis is the sample axis.
- ND networks (EXACT_ARRAY_MAPPING, spec >= 4): a blob Core ML sees with shape [d0, ..., dk] is
  (N, d0, ..., dk). `Ctx.axis` maps a Core ML axis (negative or not) to the numpy axis.
Classic layers address "C, H, W" as the last three axes (axis -3, -2, -1), which is right in both layouts.

A layer function is `fn(ctx, ins) -> array | list[array]`: `ins` holds the layer's input blobs in order
(None for an optional input that is absent); it returns one array per output. Anything it cannot compute
exactly raises `ctx.unsupported(...)`: the model is then "not evaluated", never given a wrong number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


class Unsupported(Exception):
    """The evaluator cannot run this layer (type or setting); the message names it."""


@dataclass
class Ctx:
    layer: Any  # the NeuralNetworkLayer message
    params: Any  # the layer's parameter message, parsed (see messages.py)
    weights: dict = field(default_factory=dict)  # slot path ("weights", "weightParams.inputGateBiasVector", ...) -> float32 values
    nd: bool = False  # the network runs in ND mode
    run_network: Callable | None = None  # run_network(sub_network, feeds, net_path) -> blobs, for branch / loop bodies
    scope: dict = field(default_factory=dict)  # every blob of the enclosing network so far (control flow reads them)
    net_path: str = ""  # "" or "loop_1.bodyNetwork/" inside sub-networks

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def kind(self) -> str:
        return self.layer.WhichOneof("layer")

    def unsupported(self, what: str) -> Unsupported:
        return Unsupported(f"layer '{self.layer.name}' ({self.kind}): {what} is not implemented by mlqpipe's evaluator")

    def axis(self, axis: int, x: np.ndarray) -> int:
        """The numpy axis of Core ML axis `axis` (negative counts from the end) of blob `x`."""
        rank = x.ndim - 1  # without the sample axis
        a = int(axis)
        if not -rank <= a < rank:
            raise Unsupported(f"layer '{self.layer.name}' ({self.kind}): axis {a} out of range for a rank-{rank} input")
        return a + x.ndim if a < 0 else a + 1

    def weight(self, slot: str) -> np.ndarray:
        try:
            return self.weights[slot]
        except KeyError:
            raise Unsupported(f"layer '{self.layer.name}' ({self.kind}): weight {slot} is missing") from None


LayerFn = Callable[[Ctx, list], "np.ndarray | list[np.ndarray]"]


def core_shape(x: np.ndarray) -> tuple[int, ...]:
    """The shape Core ML sees: without the sample axis."""
    return tuple(x.shape[1:])


def with_samples(x: np.ndarray, n: int) -> np.ndarray:
    """A per-model constant (no sample axis) as a blob of n samples (a broadcast view: no copy)."""
    x = np.asarray(x, dtype=np.float32)
    return np.broadcast_to(x, (n, *x.shape))
