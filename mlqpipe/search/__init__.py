"""Accuracy-aware search: per weight group, the smallest candidate setting that keeps the gates (`mlqpipe search`,
or `tasks_from_search` in a dodo.py)."""


def tasks_from_search(*patterns, **kwargs):
    """doit tasks searching these recipes (see mlqpipe/search/tasks.py)."""
    from mlqpipe.search.tasks import tasks_from_search as make

    yield from make(*patterns, **kwargs)
