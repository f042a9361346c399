"""The layer contract: which parts of mlqpipe may import which (lazy imports inside functions included), and
no import cycle anywhere. Data flows one way: recipe -> validated recipe -> plan -> kernels -> outputs,
cache, report; a new import that breaks this fails here, naming the module and the import."""

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "mlqpipe"

# part -> the parts it may import (a part: a top-level module or subpackage of mlqpipe)
ALLOWED = {
    "errors": set(),
    "fileio": set(),
    "artifacts": {"errors", "fileio"},  # files and directory trees: digests, atomic directory writes
    "schema": set(),
    "terminal": set(),
    "quant": {"errors"},
    "formats": {"errors", "fileio", "artifacts", "quant"},
    "recipe": {"errors", "fileio", "artifacts", "schema", "formats"},  # formats: coremltools selector layer types (NN only)
    "quality": {"errors", "fileio", "artifacts", "terminal", "formats"},
    "engine": {"errors", "fileio", "artifacts", "quant", "formats", "recipe", "quality"},
    "optimize": {"errors", "fileio", "artifacts", "quant", "formats", "engine"},  # coremltools.optimize.coreml's API for ML programs
    "search": {"errors", "fileio", "artifacts", "terminal", "formats", "recipe", "engine", "quality", "build", "mlqpipe"},
    "build": {"errors", "fileio", "artifacts", "terminal", "formats", "recipe", "engine", "quality", "mlqpipe"},
    "cli": {"errors", "fileio", "artifacts", "terminal", "schema", "formats", "recipe", "engine", "quality", "build", "search", "mlqpipe"},
    "mlqpipe": set(),  # __init__: the public names are loaded lazily, by name
}

# inside the neural-network format, one way: messages -> structure -> weights/inventory -> check/version
# -> I/O and checked save -> fold
NN_ORDER = ["proto", "layers", "structure", "packing", "weights", "writers", "inventory", "version", "check",
            "model", "fold", "format"]


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _imports(path: Path, module: str):
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("mlqpipe"):
                yield node.lineno, target, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mlqpipe"):
                    yield node.lineno, alias.name, []


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "mlqpipe"


def _graph():
    known = {m for m, _ in _modules()}
    edges = {}
    for module, path in _modules():
        for line, target, names in _imports(path, module):
            # `from mlqpipe.x import y` may name a submodule y
            targets = [f"{target}.{n}" for n in names if f"{target}.{n}" in known] or [target]
            for t in targets:
                edges.setdefault(module, []).append((line, t, path))
    return edges


def test_every_part_is_listed():
    parts = {_part(m) for m, _ in _modules()}
    assert parts <= set(ALLOWED), f"new parts without a rule here: {parts - set(ALLOWED)}"


def test_parts_import_only_what_they_may():
    bad = []
    for module, imports in _graph().items():
        src = _part(module)
        for line, target, path in imports:
            dst = _part(target)
            if dst != src and dst not in ALLOWED[src]:
                bad.append(f"{path.relative_to(REPO)}:{line}: {module} imports {target} ({src} may not import {dst})")
    assert not bad, "\n".join(bad)


def test_neural_network_format_runs_one_way():
    bad = []
    prefix = "mlqpipe.formats.nn."
    for module, imports in _graph().items():
        if not module.startswith(prefix):
            continue
        src = module[len(prefix):]
        for line, target, path in imports:
            if target.startswith(prefix) and target[len(prefix):] in NN_ORDER:
                dst = target[len(prefix):]
                if src in NN_ORDER and NN_ORDER.index(dst) >= NN_ORDER.index(src):
                    bad.append(f"{path.relative_to(REPO)}:{line}: {src} imports {dst}, which comes after it")
    assert not bad, "\n".join(bad)


# modules that work on any format: they reach a format only through formats.base and formats.registry.
# (engine/compat.py and engine/ct_selectors.py are coremltools' neural-network API; quality/evaluate is the
# neural-network evaluator; cli/show.py moves to the protocol with the ML-program format.)
FORMAT_NEUTRAL = ["mlqpipe.engine.select", "mlqpipe.engine.plan", "mlqpipe.engine.execute", "mlqpipe.engine.modes",
                  "mlqpipe.quality.report", "mlqpipe.quality.gates", "mlqpipe.build.tasks", "mlqpipe.build.run",
                  "mlqpipe.build.cache", "mlqpipe.build.lock"]


def test_format_neutral_modules_use_the_seam_only():
    graph = _graph()
    assert set(FORMAT_NEUTRAL) <= set(graph) | {m for m, _ in _modules()}
    bad = [f"{path.relative_to(REPO)}:{line}: {module} imports {target}"
           for module in FORMAT_NEUTRAL for line, target, path in graph.get(module, ())
           if target.startswith("mlqpipe.formats.") and target not in ("mlqpipe.formats.base", "mlqpipe.formats.registry")]
    assert not bad, "use formats.base / formats.registry (the ModelFormat protocol):\n" + "\n".join(bad)


def test_no_import_cycle():
    graph = {m: {t for _, t, _ in imports if t != m} for m, imports in _graph().items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue  # a package and its own modules (its __init__ re-exports)
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_public_import_paths_stay():
    import mlqpipe
    import mlqpipe.build
    from mlqpipe.cli import main

    for name in ("quantize_weights", "QuantizedLayerSelector", "AdvancedQuantizedLayerSelector", "MatrixMultiplyLayerSelector",
                 "load_model", "CoreMLModel", "inventory", "WeightRecord", "MlqpipeError", "ModelError", "CheckError",
                 "RecipeError"):
        assert getattr(mlqpipe, name) is not None, name
    assert callable(mlqpipe.build.tasks_from_recipes) and mlqpipe.build.DOIT_CONFIG["backend"] == "sqlite3"
    assert callable(main)
    assert mlqpipe.inventory(str(REPO / "pipelines" / "demo" / "digits_mlp.mlmodel"))  # a path, as before
