"""doit integration: recipes compiled into cached, incremental, reproducible build tasks.

In your dodo.py:

    from mlqpipe.build import DOIT_CONFIG, tasks_from_recipes

    def task_quantize():
        yield from tasks_from_recipes("recipes/*.yaml")
"""

__all__ = ["tasks_from_recipes", "BuildOptions", "DOIT_CONFIG"]


def __getattr__(name):
    """Loaded on first use: the cache's prefetch process imports mlqpipe.build.cache, not the task compiler."""
    if name == "DOIT_CONFIG":
        # doit state in a tool-specific sqlite3 file (the default dbm backend is one-process-only and can
        # corrupt), in the project root (doit opens it before any task code runs); mlqpipe's reporter: one
        # located line per failure instead of doit's tracebacks
        from mlqpipe.build.console import BuildReporter

        return {"dep_file": ".mlqpipe-doit.sqlite3", "backend": "sqlite3", "verbosity": 0, "reporter": BuildReporter}
    if name in ("tasks_from_recipes", "BuildOptions"):
        from mlqpipe.build import tasks

        return getattr(tasks, name)
    raise AttributeError(f"module 'mlqpipe.build' has no attribute {name!r}")
