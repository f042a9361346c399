"""Oracle tests: mlqpipe's coremltools-compatible API against coremltools 9.0 itself.

The modules here are plain pytest modules (no __init__.py); their model builders and helpers are in
oracle_models.py, imported as `tests.oracle.oracle_models` (the project root is on pytest's pythonpath).
Keep the test module basenames unique across tests/: under pytest's default import mode two test
modules with the same basename in different folders cannot both be collected.
"""

from __future__ import annotations

import pytest

from tests.metrics import snr_db


@pytest.fixture
def snr():
    return snr_db
