"""Finding and loading custom code named as `module:attr`.

`validate` and `plan` only look: the module's file is located on the search path with importlib's path
finder (which does not execute anything) and its source is parsed to confirm `attr` is defined at top
level. Importing — running the code — happens only when a build needs the function, and `allow=False`
(the CLI's --no-custom-code) refuses it.
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

from mlqpipe.errors import RecipeError


def locate(module: str, search_path) -> importlib.machinery.ModuleSpec | None:
    """Where `module` would be imported from on `search_path`, found without running any code."""
    parts = module.split(".")
    path = [str(p) for p in search_path]
    spec = None
    for i, part in enumerate(parts):
        spec = importlib.machinery.PathFinder.find_spec(part if i == 0 else ".".join(parts[: i + 1]), path)
        if spec is None:
            return None
        path = list(spec.submodule_search_locations or [])
    return spec


def find_code(ref: str, search_path) -> str | None:
    """None when `module:attr` can be found without importing it; else what is wrong."""
    module, _, attr = ref.partition(":")
    spec = locate(module, search_path)
    if spec is None:
        return f"custom code '{ref}': module '{module}' not found"
    origin = spec.origin
    if not origin or not origin.endswith(".py"):
        return None  # a compiled or namespace module: cannot look inside without importing
    try:
        tree = ast.parse(Path(origin).read_text(encoding="utf-8"), origin)
    except (OSError, SyntaxError, ValueError) as e:
        return f"custom code '{ref}': cannot read {origin}: {e}"
    top = attr.split(".")[0]
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.AnnAssign,)) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    if top not in names:
        return f"custom code '{ref}': '{top}' is not defined in {origin}"
    return None


def load_code(ref: str, search_path, *, allow=True):
    """Import `module:attr` from the search path and return the attribute (runs the module's code).

    `allow`: True (any module), False (--no-custom-code), or a collection of module names that may be
    imported (--custom-code-allow; a package name also allows its submodules)."""
    module, _, attr = ref.partition(":")
    if allow is False or allow is None:
        raise RecipeError(f"custom code '{ref}' is disabled (--no-custom-code); this recipe cannot be built here")
    if allow is not True and not any(module == m or module.startswith(m + ".") for m in allow):
        raise RecipeError(f"custom code '{ref}': module '{module}' is not in the allow-list ({', '.join(allow) or 'empty'}); "
                          "add it with --custom-code-allow if you trust it")
    spec = locate(module, search_path)
    if spec is None:
        raise RecipeError(f"custom code '{ref}': module '{module}' not found on {', '.join(map(str, search_path))}")
    loaded = sys.modules.get(module)
    if loaded is not None and spec.origin and getattr(loaded, "__file__", None) != spec.origin:
        del sys.modules[module]  # another recipe's module of the same name (another python_path): not this one
    added = [str(p) for p in search_path if str(p) not in sys.path]
    sys.path[:0] = added
    try:
        mod = importlib.import_module(module)
    except Exception as e:
        raise RecipeError(f"custom code '{ref}': importing '{module}' failed: {type(e).__name__}: {e}") from e
    finally:
        for p in added:
            if p in sys.path:
                sys.path.remove(p)
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RecipeError(f"custom code '{ref}': '{module}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    return obj
