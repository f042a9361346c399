"""Error types. Each carries one message that names the file, line or layer and says what to do."""

from __future__ import annotations


class MlqpipeError(Exception):
    """Base class: a problem the user can fix; the CLI prints it without a traceback (exit status 2)."""


class ModelError(MlqpipeError, ValueError):
    """A model file or spec that cannot be read, quantized or written as asked."""


class CheckError(ModelError):
    """A model that breaks Core ML's loading rules; `findings` lists every broken rule."""

    def __init__(self, message: str, findings=()):
        super().__init__(message)
        self.findings = list(findings)


class GateFailure(MlqpipeError):
    """A quality gate failed (a finding, exit status 1 — not bad input); `report` is the failed report."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


class RecipeError(MlqpipeError, ValueError):
    """An invalid recipe; `problems` lists every located problem."""

    def __init__(self, message: str, problems=()):
        super().__init__(message)
        self.problems = list(problems)
