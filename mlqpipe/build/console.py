"""What a build prints while it runs: doit's reporter, made for release builds.

One line per finished task (`.  TASK` ran, `-- TASK` up to date), so CI logs show what was done; on a
terminal, once a build has run for a couple of seconds, a status line says which model, stage or
evaluation is running. A failed task prints the one located line its action wrote (the same text `mlqpipe
quantize` prints), not doit's "Python Task failed: '<function ...>' returned False"; an unexpected error
keeps its traceback, because that is a bug to report. Tasks skipped because a dependency failed are
counted as not run.

`DOIT_CONFIG` (mlqpipe.build) names this reporter, so a user's own dodo.py prints the same.
"""

from __future__ import annotations

import sys

from mlqpipe.terminal import StatusLine
LAST: "BuildReporter | None" = None  # the reporter of the latest run in this process (mlqpipe build reads it)


def describe_task(name: str) -> str:
    """'mlqpipe/recipes/a/../m.mlmodel/2-large' -> 'm.mlmodel: stage 2-large'."""
    if name == "mlqpipe-lock":
        return "lock file"
    parts = name.split("/")
    if len(parts) >= 3 and parts[0] == "mlqpipe":
        model, step = parts[-2], parts[-1]
        return f"{model}: {'evaluation, report and output' if step == 'output' else 'stage ' + step}"
    return name


class BuildReporter:
    desc = "mlqpipe: a line per finished task, progress on a terminal, one located line per failure"

    def __init__(self, outstream, options):
        global LAST
        LAST = self
        self.outstream = outstream
        self.status: dict[str, str] = {}  # task name -> ran | up-to-date | failed | not run
        self.messages: dict[str, list[str]] = {}
        self.runtime_errors: list[str] = []
        self.line = StatusLine()
        self.total = 0

    # --- doit's reporter interface ---------------------------------------------------------------------

    def initialize(self, tasks, selected_tasks):
        self.total = len(tasks)

    def get_status(self, task):
        pass

    def execute_task(self, task):
        self.line.show(f"[{len(self.status) + 1}/{self.total}] {describe_task(task.name)} …")

    def add_success(self, task):
        self.status[task.name] = "ran"
        self._write(f".  {task.title()}\n")
        warnings = [line for a in task.actions for line in (a.err or "").splitlines() if line.startswith("mlqpipe: warning:")]
        if warnings:  # doit swallows a successful task's stderr; warnings about the user's model must show
            self.outstream.flush()
            sys.stderr.write("".join(f"{line}\n" for line in warnings))
            sys.stderr.flush()

    def add_failure(self, task, fail):
        from doit.exceptions import UnmetDependency

        if isinstance(fail, UnmetDependency):
            self.status[task.name] = "not run"
            return
        self.status[task.name] = "failed"
        err = "".join(a.err or "" for a in task.actions)
        lines = err.splitlines()
        first = next((i for i, line in enumerate(lines) if line.startswith("mlqpipe:")), None)
        located = [] if first is None else lines[first:]  # our message and its indented problem lines
        self.messages[task.name] = located
        self.line.clear()
        self.outstream.flush()  # keep task lines and failure lines in order when both go to one log
        if located:
            sys.stderr.write("".join(f"{line}\n" for line in located))
        else:  # not one of ours: a bug, keep everything
            sys.stderr.write(f"mlqpipe: task {task.name} failed unexpectedly:\n{fail.get_msg()}{err}\n")
        sys.stderr.flush()

    def skip_uptodate(self, task):
        self.status[task.name] = "up-to-date"
        self._write(f"-- {task.title()}\n")

    def skip_ignore(self, task):
        self.status[task.name] = "ignored"
        self._write(f"!! {task.title()}\n")

    def cleanup_error(self, exception):
        sys.stderr.write(exception.get_msg())

    def runtime_error(self, msg):
        self.runtime_errors.append(msg)

    def teardown_task(self, task):
        pass

    def complete_run(self):
        self.line.clear()
        for msg in self.runtime_errors:
            sys.stderr.write(f"mlqpipe: error: {msg}\n")

    # --- output -----------------------------------------------------------------------------------------

    def _write(self, text: str) -> None:
        self.line.clear()
        self.outstream.write(text)
