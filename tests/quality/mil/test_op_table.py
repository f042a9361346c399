"""README's op table says exactly what the interpreter evaluates: the backticked names in its "MIL op types"
column (between the markers `<!-- mil-ops:start -->` and `<!-- mil-ops:end -->`) are the keys of OPS plus
the op types the interpreter runs itself (const, the constexpr forms, cond, while_loop)."""

from __future__ import annotations

import re
from pathlib import Path

from mlqpipe.formats.mlprogram import constexpr
from mlqpipe.quality.mil import OPS

README = Path(__file__).resolve().parents[3] / "README.md"
START, END = "<!-- mil-ops:start -->", "<!-- mil-ops:end -->"
BUILT_IN = {"const", "cond", "while_loop"} | {op_type for op_type, _ in constexpr.OPS}


def table_op_types(text: str) -> set[str]:
    """The backticked names of the "MIL op types" column of the section's table."""
    assert text.count(START) == 1 and text.count(END) == 1, f"README.md needs one {START} ... {END} section"
    section = text.split(START, 1)[1].split(END, 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines() if line.lstrip().startswith("|")]
    assert rows and "MIL op types" in rows[0], f"README.md's {START} section has no table with a 'MIL op types' column"
    column = rows[0].index("MIL op types")
    return {name for r in rows[2:] for name in re.findall(r"`([^`]+)`", r[column])}


def test_readme_lists_exactly_the_evaluated_op_types():
    listed = table_op_types(README.read_text(encoding="utf-8"))
    expected = set(OPS) | BUILT_IN
    assert not expected - listed, f"op types README.md does not list: {sorted(expected - listed)}"
    assert not listed - expected, f"op types README.md lists but the interpreter does not evaluate: {sorted(listed - expected)}"


def test_the_parser_reads_the_op_column_only():
    text = f"x\n{START}\n| family | MIL op types | tested against |\n|---|---|---|\n| a | `relu`, `gelu` | `mode` torch |\n{END}\n"
    assert table_op_types(text) == {"relu", "gelu"}
