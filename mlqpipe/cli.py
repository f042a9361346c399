"""The `mlqpipe` command: argument parsing and exit codes only; the work is imported lazily.

Exit status: 0 success, 1 a check or gate found errors / a build failed, 2 bad input (unreadable model,
invalid recipe, impossible settings), printed as one clear message without a traceback.
"""

from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlqpipe",
        description="Declarative, cached, reproducible weight quantization for Core ML neural-network models.",
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("-v", "--verbose", action="count", default=0, help="say more (repeat for more)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("validate", help="check recipes: schema, files, rules, custom code; all problems at once")
    s.add_argument("recipes", nargs="+", metavar="RECIPE")
    s.set_defaults(run=lambda a: _commands().validate(a.recipes, a.verbose))

    s = sub.add_parser("plan", help="show what a recipe will do to every weight, and the sizes before/after")
    s.add_argument("recipe", metavar="RECIPE")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(run=lambda a: _commands().plan(a.recipe, a.json, a.verbose))

    s = sub.add_parser("quantize", help="run recipes directly (no doit, no cache) and write their outputs")
    s.add_argument("recipes", nargs="+", metavar="RECIPE")
    s.add_argument("--no-custom-code", action="store_true", help="refuse recipes that name custom Python code")
    s.set_defaults(run=lambda a: _commands().quantize(a.recipes, not a.no_custom_code, a.verbose))

    s = sub.add_parser("schema", help="print the recipe JSON Schema (for editors)")
    s.set_defaults(run=_schema)

    s = sub.add_parser("inspect", help="list every weight blob of a .mlmodel (layer, field, shape, storage)")
    s.add_argument("model", help="path to a .mlmodel")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(run=_inspect)

    s = sub.add_parser("check", help="check .mlmodel files against Core ML's loading rules")
    s.add_argument("models", nargs="+", metavar="MODEL", help="paths to .mlmodel files")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(run=_check)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(f"mlqpipe {__version__}")
        return EXIT_OK
    if not getattr(args, "run", None):
        parser.print_help()
        return EXIT_USAGE
    from .errors import MlqpipeError

    try:
        return args.run(args)
    except MlqpipeError as e:
        print(f"mlqpipe: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _commands():
    from . import commands

    return commands


def _schema(args) -> int:
    from .schema import schema_text

    sys.stdout.write(schema_text())
    return EXIT_OK


def _inspect(args) -> int:
    from .show import print_inventory

    return print_inventory(args.model, as_json=args.json)


def _check(args) -> int:
    from .show import print_check

    return print_check(args.models, as_json=args.json, verbose=args.verbose)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
