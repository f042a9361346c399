"""What each bench section prints when run on its own: its PASS/FAIL lines, and the exit status they give."""

from __future__ import annotations


def _shown(value) -> str:
    return str(round(value, 3)) if isinstance(value, float) else str(value)


def print_targets(targets: list[dict]) -> int:
    """One line per target; 0 when every one passes, else 1 (as bench/run.py exits)."""
    for t in targets:
        print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {_shown(t['value'])} (goal {t['goal']})")
    return 0 if all(t["pass"] for t in targets) else 1
