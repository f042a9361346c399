"""What the interpreter and the op functions share: the refusal types and small argument readers.

An op function raises `Refuse(reason)` for a setting it cannot compute exactly; the interpreter turns it into
`Unsupported("not evaluated: op <name> of type <type> (<reason>)")`, so a caller reports the model as not
evaluated instead of giving a wrong number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


class Unsupported(Exception):
    """The interpreter cannot evaluate this program (an op type, a setting or an input); the message says which."""


class Refuse(Exception):
    """Raised by an op function: the reason this op's setting is not evaluated (the interpreter names the op)."""


@dataclass(frozen=True)
class OpRow:
    """One row of the op table: the function, and the inputs that are tuples of values (concat's `values`)."""

    fn: Callable
    tuples: tuple[str, ...] = ()


def row(fn: Callable, *tuples: str) -> OpRow:
    return OpRow(fn, tuple(tuples))


def scalar(v, what: str = "value"):
    """A python int/float/bool/str of a rank-0 (or one-element) input."""
    if isinstance(v, (str, int, float, bool)):
        return v
    a = np.asarray(v)
    if a.size != 1:
        raise Refuse(f"{what} has {a.size} values where one is expected")
    return a.reshape(-1)[0].item()


def ints(v, what: str = "value") -> list[int]:
    """A list of ints from a rank-0/1 integer input (shapes, axes, pads)."""
    a = np.asarray(v)
    if a.size and a.dtype.kind not in "iub":
        if not np.all(a == np.round(a)):
            raise Refuse(f"{what} holds values that are not whole numbers")
    return [int(x) for x in a.reshape(-1)]


def axis_of(axis, rank: int, what: str = "axis") -> int:
    a = int(scalar(axis, what))
    if not -rank <= a < max(rank, 1):
        raise Refuse(f"{what} {a} is out of range for rank {rank}")
    return a % rank if rank else 0


def axes_of(axes, rank: int, what: str = "axes") -> tuple[int, ...]:
    out = tuple(axis_of(a, rank, what) for a in ints(axes, what))
    if len(set(out)) != len(out):
        raise Refuse(f"{what} {list(out)} repeats an axis")
    return out


def flag(v, default: bool = False) -> bool:
    return default if v is None else bool(scalar(v, "flag"))


def text(v, what: str) -> str:
    s = scalar(v, what)
    if not isinstance(s, str):
        raise Refuse(f"{what} is not a string")
    return s


def floats(x) -> np.ndarray:
    """x as a float array: float16 and integers computed in float32, float64 kept."""
    a = np.asarray(x)
    if a.dtype.kind in "USO":  # a string where a number belongs: not this row's op
        raise Refuse(f"a {a.dtype.kind!r}-typed value where numbers are expected")
    return a if a.dtype in (np.float32, np.float64) else a.astype(np.float32)
