"""Where the recipe JSON Schema lives: inside the installed package, or the checkout's schemas/ folder."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

SCHEMA_NAME = "recipe.schema.json"


def schema_text() -> str:
    try:
        return resources.files("mlqpipe.schemas").joinpath(SCHEMA_NAME).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        return (Path(__file__).resolve().parents[1] / "schemas" / SCHEMA_NAME).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def recipe_schema() -> dict:
    return json.loads(schema_text())
