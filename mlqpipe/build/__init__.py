"""doit integration: recipes compiled into cached, incremental, reproducible build tasks.

In your dodo.py:

    from mlqpipe.build import DOIT_CONFIG, tasks_from_recipes

    def task_quantize():
        yield from tasks_from_recipes("recipes/*.yaml")
"""

from mlqpipe.build.console import BuildReporter
from mlqpipe.build.tasks import BuildOptions, tasks_from_recipes

# doit state in a tool-specific sqlite3 file (the default dbm backend is one-process-only and can corrupt),
# in the project root (doit opens it before any task code runs); mlqpipe's reporter: one located line per
# failure instead of doit's tracebacks
DOIT_CONFIG = {"dep_file": ".mlqpipe-doit.sqlite3", "backend": "sqlite3", "verbosity": 0, "reporter": BuildReporter}

__all__ = ["tasks_from_recipes", "BuildOptions", "DOIT_CONFIG"]
