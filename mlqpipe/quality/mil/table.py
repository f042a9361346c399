"""The op table: every MIL op type the interpreter evaluates, one row each (the function computing it, and
which of its inputs are tuples of values). `const`, the `constexpr_*` ops, `cond` and `while_loop` are run by
the interpreter itself (they read weights or run blocks). Any other op type is "not evaluated".
"""

from __future__ import annotations

from mlqpipe.quality.mil.base import OpRow
from mlqpipe.quality.mil.ops_attention import OPS as ATTENTION
from mlqpipe.quality.mil.ops_classify import OPS as CLASSIFY
from mlqpipe.quality.mil.ops_math import OPS as MATH
from mlqpipe.quality.mil.ops_nn import OPS as NN
from mlqpipe.quality.mil.ops_recurrent import OPS as RECURRENT
from mlqpipe.quality.mil.ops_resize import OPS as RESIZE
from mlqpipe.quality.mil.ops_scatter import OPS as SCATTER
from mlqpipe.quality.mil.ops_shape import OPS as SHAPE


def _merged(*tables: dict) -> dict[str, OpRow]:
    out: dict[str, OpRow] = {}
    for t in tables:
        twice = set(out) & set(t)
        assert not twice, f"op types in two tables: {twice}"
        out.update(t)
    return out


OPS: dict[str, OpRow] = _merged(MATH, SHAPE, NN, RECURRENT, RESIZE, SCATTER, ATTENTION, CLASSIFY)
BUILT_IN = ("const", "constexpr_*", "cond", "while_loop")  # run by the interpreter, not by a row
