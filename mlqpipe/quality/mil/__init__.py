"""A numpy interpreter for ML programs (MIL): `run(model, inputs, function=None)` evaluates one function of
an MLProgram on a batch of samples; `OPS` (table.py) lists the op types it evaluates; anything else raises
`Unsupported("not evaluated: op <name> of type <type>")`, never a wrong number."""

from mlqpipe.quality.mil.base import OpRow, Unsupported
from mlqpipe.quality.mil.interpreter import Interpreter, run
from mlqpipe.quality.mil.table import OPS

__all__ = ["OPS", "Interpreter", "OpRow", "Unsupported", "run"]
