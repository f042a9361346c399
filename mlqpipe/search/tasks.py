"""The search as doit tasks, for a user's dodo.py: one task per search recipe, whose targets are the resolved
recipe and its report. It re-runs when the recipe files, an input model or the data change; its trials are
cached entries of the stage cache either way, so a re-run measures only what changed.

    from doit import create_after
    from mlqpipe.build import DOIT_CONFIG, tasks_from_recipes
    from mlqpipe.search import tasks_from_search

    def task_search():
        yield from tasks_from_search("recipes/*.yaml")

    @create_after(executed="search")  # the resolved recipes exist once the search tasks ran
    def task_quantize():  # a search recipe builds its resolved recipe; doit runs late tasks as subtasks only
        yield from tasks_from_recipes("recipes/*.yaml", subtasks_of="quantize")
"""

from __future__ import annotations

from mlqpipe.build.tasks import BuildOptions, input_files


def tasks_from_search(*patterns, options: BuildOptions | None = None, jobs: int = 1, **kwargs):
    import glob as _glob

    from doit.tools import config_changed

    from mlqpipe import __version__
    from mlqpipe.errors import RecipeError
    from mlqpipe.recipe import load_recipe
    from mlqpipe.search.run import SEARCH_VERSION

    options = options or BuildOptions(**kwargs)
    paths = []
    for pattern in patterns:
        paths += sorted(_glob.glob(str(pattern), recursive=True)) if _glob.has_magic(str(pattern)) else [str(pattern)]
    for path in paths:
        try:
            recipe = load_recipe(path, allow_outside_root=options.allow_outside_root)
        except RecipeError as e:
            yield {"name": str(path), "actions": [(_fail, [str(e)])], "verbosity": 2}
            continue
        if recipe.search is None:
            continue  # nothing to search: its build tasks come from tasks_from_recipes
        deps = [str(f) for f in recipe.files]
        for job in recipe.models:
            deps += input_files(job.input)[0]
            for cfg in (job.evaluation, recipe.search.evaluation):
                if cfg is not None and cfg.data is not None:
                    deps.append(str(cfg.data))
        out = recipe.resolved_path
        base = out.with_suffix("")
        yield {
            "name": str(path),
            "actions": [(search_action, [str(path), options.as_args(), jobs])],
            "file_dep": sorted(set(deps)),
            "targets": [str(out), f"{base}.search.json", f"{base}.search.md"],
            "uptodate": [config_changed({"mlqpipe": __version__, "search": SEARCH_VERSION, "salt": options.salt})],
            "clean": True,
            "doc": f"search {path} -> {out.name}",
        }


def search_action(recipe_path: str, options_dict: dict, jobs: int) -> bool:
    """A doit action (plain arguments: picklable): search one recipe, write its resolved recipe and report."""
    import sys

    from mlqpipe.errors import MlqpipeError
    from mlqpipe.recipe import load_recipe
    from mlqpipe.search.resolve import write_report, write_resolved
    from mlqpipe.search.run import search_recipe

    options = BuildOptions(**options_dict)
    try:
        recipe = load_recipe(recipe_path, allow_outside_root=options.allow_outside_root)
        results = search_recipe(recipe, options, jobs=jobs)
        write_resolved(recipe, results)
        write_report(recipe, results)
    except MlqpipeError as e:
        print(f"mlqpipe: error: {e}", file=sys.stderr)
        return False
    return True


def _fail(message: str) -> bool:
    import sys

    print(f"mlqpipe: error: {message}", file=sys.stderr)
    return False
