"""Located problems: every recipe error names file:line:col, the path in the document, and a hint."""

from __future__ import annotations

from dataclasses import dataclass

from mlqpipe.errors import RecipeError


@dataclass(frozen=True)
class Problem:
    file: str
    line: int  # 1-based; 0 when unknown
    col: int  # 1-based; 0 when unknown
    path: str  # dotted path in the document, e.g. stages[1].nbits
    message: str
    hint: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.col}" if self.line else self.file
        text = f"{where}: {self.path or '<document>'}: {self.message}"
        return f"{text} (hint: {self.hint})" if self.hint else text


def dotted(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def raise_problems(problems: list[Problem]) -> None:
    if problems:
        problems = sorted(set(problems), key=lambda p: (p.file, p.line, p.col, p.path, p.message))
        n = len(problems)
        raise RecipeError(f"{n} problem{'s' if n > 1 else ''} in recipe:\n" + "\n".join(f"  {p}" for p in problems), problems)
