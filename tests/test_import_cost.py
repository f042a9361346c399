"""`import mlqpipe` and the CLI's start-up must not load heavy modules (numpy, sklearn, jsonschema, doit)."""

import subprocess
import sys

HEAVY = ["numpy", "sklearn", "jsonschema", "doit", "google.protobuf", "yaml"]


def _loaded(code: str) -> set:
    out = subprocess.run([sys.executable, "-c", code + "; import sys; print(' '.join(sys.modules))"], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_mlqpipe_is_light():
    mods = _loaded("import mlqpipe")
    assert not [m for m in HEAVY if m in mods]


def test_cli_help_is_light():
    mods = _loaded("import mlqpipe.cli.commandline as c; c._parser().format_help()")
    assert not [m for m in HEAVY if m in mods]


def test_lazy_attribute_loads_on_demand():
    mods = _loaded("import mlqpipe; mlqpipe.quantize_weights")
    assert "numpy" in mods and "sklearn" not in mods and "jsonschema" not in mods
