"""The `mlqpipe` command: argument parsing and exit codes only; the work is imported lazily.

Exit status: 0 success, 1 a check or gate found errors / a build failed, 2 bad input (unreadable model,
invalid recipe, impossible settings), printed as one clear message without a traceback.
"""

from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2
EXIT_BROKEN_PIPE = 128 + 13  # what a process killed by SIGPIPE reports


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlqpipe",
        description="Declarative, cached, reproducible weight quantization for Core ML neural-network models.",
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("-v", "--verbose", action="count", default=0, help="say more (repeat for more)")
    # -v is accepted after the subcommand too (`mlqpipe plan R -v`); SUPPRESS keeps the top-level count
    # when the subcommand does not repeat it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="say more (repeat for more)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name, **kwargs):
        return sub.add_parser(name, parents=[common], **kwargs)

    s = add("validate", help="check recipes: schema, files, rules, custom code; all problems at once")
    s.add_argument("recipes", nargs="+", metavar="RECIPE")
    _root_option(s)
    s.set_defaults(run=lambda a: _commands().validate(a.recipes, a.verbose, a.allow_outside_root))

    s = add("plan", help="show what a recipe will do to every weight, and the sizes before/after")
    s.add_argument("recipe", metavar="RECIPE")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    _root_option(s)
    s.set_defaults(run=lambda a: _commands().plan(a.recipe, a.json, a.verbose, a.allow_outside_root))

    s = add("quantize", help="run recipes directly (no doit, no cache) and write their outputs")
    s.add_argument("recipes", nargs="+", metavar="RECIPE")
    _custom_code_options(s)
    _root_option(s)
    s.set_defaults(run=lambda a: _commands().quantize(a.recipes, _custom_policy(a), a.verbose, a.allow_outside_root))

    s = add("search", help="find per weight group the smallest setting that keeps the gates; write a resolved recipe")
    s.add_argument("recipes", nargs="+", metavar="RECIPE")
    s.add_argument("-j", "--jobs", type=int, default=1, help="parallel trial processes")
    _build_options(s)
    s.set_defaults(run=lambda a: _commands().search(a.recipes, _options(a), a.jobs, a.verbose))

    s = add("build", help="build recipes through doit: cached, incremental, reproducible")
    s.add_argument("recipes", nargs="*", metavar="RECIPE", default=["recipes/*.yaml", "pipelines/**/*.yaml"],
                   help="recipe files or globs (default: recipes/*.yaml and pipelines/**/*.yaml)")
    s.add_argument("-j", "--jobs", type=int, default=1, help="parallel processes")
    s.add_argument("--dry-run", action="store_true", help="list what would be rebuilt and what is stale; build nothing")
    s.add_argument("--force", action="store_true", help="re-run every task (the cache still serves stage results)")
    s.add_argument("--prune", action="store_true", help="remove outputs that no recipe produces any more")
    going = s.add_mutually_exclusive_group()
    going.add_argument("--keep-going", action="store_true", default=None,
                       help="after a failure, build every model that does not depend on it, so one run reports every "
                            "failing model (the default when $CI is set)")
    going.add_argument("--no-keep-going", dest="keep_going", action="store_false", help="stop at the first failure")
    s.add_argument("--shard", metavar="I/N", type=_shard, default=None,
                   help="build only shard I of N (a hash of each output's path decides; shards share the cache and "
                        "write mlqpipe.lock.shard-I-of-N.json, which `mlqpipe lock merge` combines)")
    _build_options(s)
    s.set_defaults(run=_build)

    s = add("lock", help="combine the partial lock files of a sharded build")
    s.add_argument("action", choices=["merge"])
    s.add_argument("partials", nargs="+", metavar="PARTIAL")
    s.add_argument("-o", "--output", default="mlqpipe.lock.json", help="the lock file to write (default mlqpipe.lock.json)")
    s.set_defaults(run=_lock)

    s = add("verify", help="check that outputs and inputs on disk match the lock file")
    s.add_argument("lock", nargs="?", default="mlqpipe.lock.json")
    s.set_defaults(run=_verify)

    s = add("diff", help="compare two lock files (e.g. main and a pull request)")
    s.add_argument("old")
    s.add_argument("new")
    s.set_defaults(run=_diff)

    s = add("cache", help="inspect or maintain the stage cache")
    s.add_argument("action", choices=["stats", "verify", "prune"])
    s.add_argument("--older-than", type=float, default=None, metavar="DAYS",
                   help="prune: remove only unreferenced entries older than DAYS")
    _build_options(s)
    s.set_defaults(run=_cache)

    s = add("report", help="print the quality report of a built output (or of every output of a recipe)")
    s.add_argument("target", metavar="OUTPUT_OR_RECIPE")
    s.add_argument("--json", action="store_true", help="the JSON report instead of Markdown")
    s.set_defaults(run=_report)

    s = add("schema", help="print the recipe JSON Schema (for editors)")
    s.set_defaults(run=_schema)

    s = add("inspect", help="list every weight of a .mlmodel or .mlpackage (layer or op, field, shape, storage)")
    s.add_argument("model", help="path to a .mlmodel file or an .mlpackage directory")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(run=_inspect)

    s = add("check", help="check .mlmodel files and .mlpackage directories against Core ML's loading rules")
    s.add_argument("models", nargs="+", metavar="MODEL", help="paths to .mlmodel files or .mlpackage directories")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(run=_check)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.version:
        from mlqpipe import __version__

        print(f"mlqpipe {__version__}")
        return EXIT_OK
    if not getattr(args, "run", None):
        parser.print_help()
        return EXIT_USAGE
    from mlqpipe.errors import GateFailure, MlqpipeError

    try:
        return args.run(args)
    except BrokenPipeError:  # `mlqpipe ... | head`: the reader left; stop quietly, as other tools do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return EXIT_BROKEN_PIPE
    except MlqpipeError as e:
        if isinstance(e, GateFailure):  # a quality finding, not bad input
            print(f"mlqpipe: {e}", file=sys.stderr)
            return EXIT_FINDINGS
        print(f"mlqpipe: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _root_option(s) -> None:
    s.add_argument("--allow-outside-root", action="store_true",
                   help="let outputs be written outside the project root (the current directory); off for untrusted recipes")


def _custom_code_options(s) -> None:
    s.add_argument("--no-custom-code", action="store_true", help="refuse recipes that name custom Python code")
    s.add_argument("--custom-code-allow", action="append", default=[], metavar="MODULE",
                   help="import custom code only from these modules (repeatable; a package allows its submodules)")


def _custom_policy(args):
    if args.no_custom_code:
        return False
    return tuple(args.custom_code_allow) if args.custom_code_allow else True


def _build_options(s) -> None:
    s.add_argument("--cache", default=None, metavar="DIR", help="cache directory, or a URL (s3://bucket/prefix, gs://, az://: a remote cache behind a local one; "
                   "needs mlqpipe[remote]) (default: $MLQPIPE_CACHE or .mlqpipe-cache)")
    s.add_argument("--cache-read-only", action="store_true", help="use the cache but never write it (developers on a CI cache)")
    s.add_argument("--salt", default="", help="extra string mixed into every cache key")
    _custom_code_options(s)
    _root_option(s)


def _options(args):
    import os

    from mlqpipe.build.tasks import DEFAULT_CACHE, BuildOptions

    return BuildOptions(cache_dir=args.cache or os.environ.get("MLQPIPE_CACHE") or DEFAULT_CACHE, salt=args.salt,
                        allow_custom=_custom_policy(args), read_only_cache=args.cache_read_only,
                        allow_outside_root=args.allow_outside_root)


def _shard(text: str) -> tuple[int, int]:
    import argparse

    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N (e.g. 2/4)") from None
    if not 1 <= i <= n:
        raise argparse.ArgumentTypeError(f"{text!r}: the shard I must be 1..N")
    return i, n


def _lock(args) -> int:
    import json

    from mlqpipe.build.lock import merge
    from mlqpipe.fileio import atomic_write

    text = merge(args.partials)
    atomic_write(args.output, text.encode())
    print(f"{args.output}: {len(json.loads(text)['outputs'])} outputs from {len(args.partials)} partial lock file(s)")
    return EXIT_OK


def _build(args) -> int:
    from mlqpipe.build.run import build

    import os

    keep_going = args.keep_going if args.keep_going is not None else os.environ.get("CI", "") not in ("", "0", "false")
    from dataclasses import replace

    from mlqpipe.build.cache import check_cache_location
    from mlqpipe.build.lock import shard_lock_file

    options = _options(args)
    check_cache_location(options.cache_dir)  # a URL cache without its extra: one error, exit 2
    if args.shard is not None:
        options = replace(options, shard=args.shard, lock_file=shard_lock_file(args.shard))
    return build(args.recipes, jobs=args.jobs, dry_run=args.dry_run, force=args.force, prune=args.prune,
                 options=options, verbose=args.verbose, keep_going=keep_going)


def _cache(args) -> int:
    import json

    from mlqpipe.build.cache import open_cache

    options = _options(args)
    cache = open_cache(options, prefetch=False)
    if args.action == "stats":
        print(json.dumps(cache.stats(), indent=2))
        return EXIT_OK
    if args.action == "verify":
        bad = cache.verify()
        for line in bad:
            print(f"mlqpipe: cache: {line}", file=sys.stderr)
        print(f"{cache.root}: {'OK' if not bad else f'{len(bad)} bad entries'}")
        return EXIT_FINDINGS if bad else EXIT_OK
    from mlqpipe.build.run import referenced_keys

    removed = cache.prune(referenced_keys(options), args.older_than)
    print(f"{cache.root}: removed {removed} file(s) not referenced by {options.lock_file}")
    return EXIT_OK


def _report(args) -> int:
    from pathlib import Path

    from mlqpipe.errors import MlqpipeError

    target = Path(args.target)
    if target.suffix in (".yaml", ".yml"):
        from mlqpipe.recipe import load_recipe

        recipe = load_recipe(target)
        paths = [recipe.report_paths(job) for job in recipe.models]
    else:
        from mlqpipe.fileio import without_model_suffix

        stem = without_model_suffix(target.name)
        paths = [(target.with_name(f"{stem}.report.json"), target.with_name(f"{stem}.report.md"), None)]
    texts = []
    for json_path, md_path, _ in paths:
        path = json_path if args.json else md_path
        if not path.is_file():
            raise MlqpipeError(f"{path}: no report; build the model first (mlqpipe build / mlqpipe quantize)")
        texts.append(path.read_text(encoding="utf-8"))
    if args.json and target.suffix in (".yaml", ".yml"):  # one JSON document: the list of the recipe's reports
        import json

        texts = [json.dumps([json.loads(t) for t in texts], indent=2) + "\n"]
    sys.stdout.write("".join(texts))
    return EXIT_OK


def _verify(args) -> int:
    from mlqpipe.build.lock import verify
    from mlqpipe.build.tasks import KERNEL_VERSION

    problems, warnings = verify(args.lock, kernel=KERNEL_VERSION)
    for p in problems:
        print(f"mlqpipe: verify: {p}", file=sys.stderr)
    for w in warnings:
        print(f"mlqpipe: verify: warning: {w}", file=sys.stderr)
    print(f"{args.lock}: {'verified' if not problems else f'{len(problems)} problem(s)'}")
    return EXIT_FINDINGS if problems else EXIT_OK


def _diff(args) -> int:
    from mlqpipe.build.lock import diff

    lines = diff(args.old, args.new)
    print("\n".join(lines) if lines else "no differences")
    return EXIT_FINDINGS if lines else EXIT_OK


def _commands():
    from mlqpipe.cli import commands

    return commands


def _schema(args) -> int:
    from mlqpipe.schema import schema_text

    sys.stdout.write(schema_text())
    return EXIT_OK


def _inspect(args) -> int:
    from mlqpipe.cli.show import print_inventory

    return print_inventory(args.model, as_json=args.json)


def _check(args) -> int:
    from mlqpipe.cli.show import print_check

    return print_check(args.models, as_json=args.json, verbose=args.verbose)


