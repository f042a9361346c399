"""The installed package works, not just the checkout.

CI installs editable, and an editable install finds every module in the tree: a wheel without
mlqpipe/evaluate/ passed every test. So here the sdist and the wheel are built from a copy of the working
tree, the wheel built *from the sdist* (what pip does with a source release) is installed into a fresh
environment that sees this interpreter's dependencies but neither the source tree nor the editable install,
and everything runs there in subprocesses, from directories outside the repository, checking that
mlqpipe's modules really come from the installed copy:

- every module of the source tree is in the wheel and the sdist, and imports on its own in a fresh
  interpreter (which also catches import cycles that only break a cold import);
- the console script, `mlqpipe build` of the demo and every example recipe (with evaluation and gates),
  the README demo script, a failing gate, and plain `doit` with the README's dodo.py.

The modules are enumerated from the tree, so a new module or subpackage is covered without editing this file.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, SHARED_MODELS

TIMEOUT = 120
# What a working tree may hold that a checkout would not (used only when git cannot list the files): at the
# top (mlqpipe/build/ is source), and anywhere.
_TOP_JUNK = {".git", ".venv", "venv", "build", "dist", ".hypothesis", ".pytest_cache", ".mlqpipe-cache", ".mlqpipe-state", "mlqpipe.lock.json"}
_JUNK = ("__pycache__", "*.pyc", "*.egg-info", "*.sqlite3")


def _checkout_files() -> list[str]:
    """The files of a fresh clone plus new ones not yet added: git's tracked and untracked-but-not-ignored
    files; outside a git checkout (e.g. an unpacked sdist), the tree without the usual junk."""
    proc = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                          capture_output=True, text=True)
    if proc.returncode == 0:
        return sorted(n for n in proc.stdout.split("\0") if n and (REPO / n).is_file())  # not deleted ones
    files = []
    for folder, dirs, names in os.walk(REPO):
        rel = Path(folder).relative_to(REPO)

        def keep(name: str) -> bool:
            junk = any(fnmatch.fnmatch(name, j) for j in _JUNK) or (rel == Path(".") and name in _TOP_JUNK)
            return not junk and not (Path(folder, name) / "pyvenv.cfg").exists()

        dirs[:] = [d for d in dirs if keep(d)]
        files += [(rel / n).as_posix() for n in names if keep(n)]
    return sorted(files)


FILES = _checkout_files()
SOURCES = [f for f in FILES if f.startswith("mlqpipe/") and f.endswith(".py")]
C_SOURCES = [f for f in FILES if f.startswith("mlqpipe/") and f.endswith(".c")]
HAVE_CC = bool(shutil.which("cc") or shutil.which("gcc"))
# The sdist also carries the C source and what the schema mapping, the demo, the examples and the tests need.
SDIST = SOURCES + C_SOURCES + [f for f in FILES if f.split("/")[0] in ("schemas", "pipelines", "tests", "bench", "constraints")] + [
    "README.md", "pyproject.toml", "setup.py", "MANIFEST.in", ".pre-commit-hooks.yaml"]

# Run by the installed environment's interpreter with module names. For one name: import it. For several:
# load the third-party dependencies once, then import each module in its own fork of this process, which
# has never imported any of mlqpipe: the same cold import of mlqpipe as a fresh interpreter (import cycles
# included), without paying numpy's import 46 times. Either way, prove nothing came from elsewhere.
_IMPORT_CHECK = r"""
import importlib, json, multiprocessing, os, sys, traceback
from pathlib import Path

site_dir, names = Path(sys.argv[1]).resolve(), sys.argv[2:]
others = [p for p in sys.path if Path(p or ".").resolve() != site_dir and (Path(p or ".") / "mlqpipe").exists()]
assert not others, f"mlqpipe is also importable from {others}"
assert not [f for f in sys.meta_path if "editable" in repr(f).lower()], sys.meta_path


def check(name):
    try:
        importlib.import_module(name)
        stray = []
        for n, m in list(sys.modules.items()):
            if n == "mlqpipe" or n.startswith("mlqpipe."):
                where = [m.__file__] if getattr(m, "__file__", None) else list(getattr(m, "__path__", []))
                if not where or not all(Path(w).resolve().is_relative_to(site_dir) for w in where):
                    stray.append(f"{n}: {where}")
        assert not stray, "not from the installed copy: " + ", ".join(stray)
        heavy = [m for m in ("sklearn", "matplotlib") if m in sys.modules]  # not dependencies / imported when used
        assert not heavy, f"importing {name} imports {heavy}"
        return ""
    except BaseException:
        return traceback.format_exc().strip().splitlines()[-1]


if len(names) == 1:
    errors = [check(names[0])]
else:
    os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = "1"  # no threads to fork
    for dep in ("numpy", "yaml", "jsonschema", "google.protobuf.message_factory", "doit"):
        importlib.import_module(dep)
    assert not [n for n in sys.modules if n.split(".")[0] == "mlqpipe"]
    with multiprocessing.get_context("fork").Pool(2 * (os.cpu_count() or 1), maxtasksperchild=1) as pool:
        errors = pool.map(check, names, chunksize=1)
print(json.dumps(dict(zip(names, errors))))
"""


@dataclass(frozen=True)
class Env:
    """A fresh environment with the wheel installed in it."""

    root: Path
    python: Path
    site: Path  # its site-packages, where mlqpipe must come from
    scripts: Path

    def script(self, name: str) -> Path:
        return self.scripts / (f"{name}.exe" if os.name == "nt" else name)

    def run(self, *args, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MLQPIPE_", "VIRTUAL_ENV"))}
        env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
        proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
        if check and proc.returncode != 0:
            pytest.fail(f"{' '.join(map(str, args))} exited {proc.returncode} in {cwd}:\n{proc.stdout}\n{proc.stderr}")
        return proc


def _copy_checkout(dest: Path) -> Path:
    for name in FILES:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dest / name)
    return dest


def _pep517(hook: str, project: Path, out: Path) -> Path:
    """Call setuptools' PEP 517 hook the way `pip wheel --no-build-isolation` does, without pip's overhead."""
    code = f"import setuptools.build_meta as b; print(b.{hook}({str(out)!r}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=TIMEOUT)
    if proc.returncode != 0:
        pytest.fail(f"{hook} failed in {project}:\n{proc.stdout}\n{proc.stderr}")
    return out / proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    """sdist and wheel of a copy of the working tree, and the wheel built from the unpacked sdist."""
    tmp = tmp_path_factory.mktemp("dists")
    out = tmp / "dist"
    (out / "from_sdist").mkdir(parents=True)
    with ThreadPoolExecutor(1) as pool:  # the wheel from the tree meanwhile, in its own copy (both write egg-info)
        wheel = pool.submit(_pep517, "build_wheel", _copy_checkout(tmp / "tree_for_wheel"), out)
        sdist = _pep517("build_sdist", _copy_checkout(tmp / "tree"), out)
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        (unpacked,) = (tmp / "unpacked").iterdir()
        return {"sdist": sdist, "wheel": wheel.result(), "wheel_from_sdist": _pep517("build_wheel", unpacked, out / "from_sdist")}


@pytest.fixture(scope="module")
def env(dists, tmp_path_factory) -> Env:
    """A new virtualenv whose only view of this interpreter's packages is a .pth listing their directories.

    Plain directories in a .pth are added to sys.path, but .pth files inside them are not run, so the
    editable install's finder (a .pth in this venv's site-packages) never loads there."""
    root = tmp_path_factory.mktemp("env") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=TIMEOUT)
    bindir = root / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / ("python.exe" if os.name == "nt" else "python")
    site_dir = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                   capture_output=True, text=True, check=True).stdout.strip())
    deps = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()
            and not (Path(p) / "mlqpipe").exists()]  # this venv's, the user's and the system's, if seen
    (site_dir / "_test_dependencies.pth").write_text("\n".join(deps) + "\n")
    e = Env(root, python, site_dir, bindir)
    # pip runs under the new interpreter so the console script points at it; -I: never look at (or
    # uninstall) the editable mlqpipe that this venv's site-packages also shows
    e.run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", dists["wheel_from_sdist"], cwd=root)
    return e


def _wheel_names(path: Path) -> set[str]:
    return {n for n in zipfile.ZipFile(path).namelist() if ".dist-info/" not in n}


def test_wheel_and_sdist_hold_every_source_file(dists):
    assert "mlqpipe/quality/evaluate/forward.py" in SOURCES  # the enumeration sees the tree
    from_sdist = _wheel_names(dists["wheel_from_sdist"])
    assert from_sdist == _wheel_names(dists["wheel"])  # building via the sdist loses nothing
    assert not [s for s in SOURCES if s not in from_sdist], "missing from the wheel"
    compiled = [n for n in from_sdist if n.startswith("mlqpipe/quant/_kmeans1d.") and n.endswith((".so", ".pyd"))]
    assert C_SOURCES == ["mlqpipe/quant/_kmeans1d.c"] and len(compiled) == (1 if HAVE_CC else 0), compiled
    assert "mlqpipe/schemas/recipe.schema.json" in from_sdist
    assert all(n.startswith("mlqpipe/") for n in from_sdist), sorted(n for n in from_sdist if not n.startswith("mlqpipe/"))
    with tarfile.open(dists["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert not [s for s in SDIST if s not in names], "missing from the sdist"


def test_environment_is_isolated(env):
    """The proof the other tests rely on: the installed copy answers, the checkout and editable install do not."""
    code = ("import mlqpipe, importlib.metadata as md, sys;"
            "print(mlqpipe.__file__); print(md.distribution('mlqpipe').locate_file('mlqpipe'));"
            "print(any('editable' in repr(f).lower() for f in sys.meta_path))")
    file, dist_files, finder = env.run(env.python, "-c", code, cwd=env.root).stdout.split()
    site_dir = env.site.resolve()
    assert Path(file).resolve().is_relative_to(site_dir), file
    assert not Path(file).resolve().is_relative_to(REPO)
    assert Path(dist_files).resolve() == site_dir / "mlqpipe"  # its metadata, not the editable install's
    assert finder == "False"


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler: the wheel has no compiled k-means")
def test_installed_wheel_runs_the_compiled_kmeans(env):
    code = "from mlqpipe.quant.kmeans import compiled; print(compiled().__file__)"
    where = Path(env.run(env.python, "-c", code, cwd=env.root).stdout.strip())
    assert where.resolve().is_relative_to(env.site.resolve()), where


def test_every_module_imports_on_its_own(env):
    modules = [s[:-3].replace("/", ".").removesuffix(".__init__") for s in SOURCES]
    modules = [m for m in modules if not m.endswith("__main__")]  # importing __main__ runs the program
    assert "mlqpipe.quality.evaluate.forward" in modules and "mlqpipe" in modules

    def check(*names: str) -> dict[str, str]:
        proc = env.run(env.python, "-c", _IMPORT_CHECK, env.site, *names, cwd=env.root)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    if hasattr(os, "fork"):
        errors = check(*modules)
    else:  # one fresh interpreter per module
        with ThreadPoolExecutor(2 * (os.cpu_count() or 1)) as pool:
            errors = {k: v for one in pool.map(check, modules) for k, v in one.items()}
    assert sorted(errors) == sorted(modules)
    failed = [f"{m}: {e}" for m, e in errors.items() if e]
    assert not failed, "\n".join(failed)


def test_console_script(env):
    script = env.script("mlqpipe")
    help_text = env.run(script, "--help", cwd=env.root).stdout
    assert "usage" in help_text.lower() and "build" in help_text
    assert env.run(script, "schema", cwd=env.root).stdout.strip() == (REPO / "schemas" / "recipe.schema.json").read_text().strip()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of pipelines/ in a project directory laid out like the checkout, so `../shared/models` resolves."""
    base = tmp_path_factory.mktemp("work")
    root = base / REPO.name
    shutil.copytree(REPO / "pipelines", root / "pipelines", ignore=shutil.ignore_patterns("__pycache__"))
    if SHARED_MODELS.is_dir():
        (base / "shared").mkdir()
        (base / "shared" / "models").symlink_to(SHARED_MODELS, target_is_directory=True)
    return root


def _built_as(root: Path, recipe: str) -> str:
    """The recipe a build records for `recipe`: a search recipe is built as its resolved recipe."""
    from mlqpipe.recipe import load_recipe  # the checkout's loader, only to know which outputs to expect

    loaded = load_recipe(root / recipe, project_root=root)
    if loaded.search is None:
        return recipe
    return (Path(recipe).parent / loaded.resolved_path.name).as_posix()


def _check_built(root: Path, lock: dict, recipe: str) -> None:
    from mlqpipe.recipe import load_recipe  # the checkout's loader, only to know which outputs to expect

    recipe = _built_as(root, recipe)
    loaded = load_recipe(root / recipe, project_root=root)
    assert loaded.models, recipe
    for job in loaded.models:
        out = job.output.resolve().relative_to(root.resolve()).as_posix()
        assert (root / out).stat().st_size > 0, out
        entry = lock["outputs"][out]
        assert entry["recipe"] == recipe
        for report_path in entry["reports"]:
            assert (root / report_path).is_file(), report_path
        (report_json,) = [r for r in entry["reports"] if r.endswith(".json")]
        report = json.loads((root / report_json).read_text())
        assert report["status"] == "passed", (out, report["status"])
        declared = {k for k, v in dataclasses.asdict(job.gates).items() if v is not None}
        assert declared <= {g["gate"] for g in report["gates"]}, (out, report["gates"])  # evaluated, not just declared
        assert all(g["passed"] for g in report["gates"]), (out, report["gates"])
        if job.evaluation is not None:
            assert report["evaluation"]["evaluated"], (out, report["evaluation"])


def test_demo_and_examples_build(env, project, monkeypatch):
    """The README demo script, then `mlqpipe build` of every recipe in pipelines/ (the demo is up to date)."""
    monkeypatch.chdir(project)
    demo = env.run(env.python, project / "pipelines" / "demo" / "run_demo.py", cwd=env.root).stdout
    assert "digits_mlp.mlmodel" in demo and "digits_cnn.mlmodel" in demo, demo
    recipes = sorted(p.relative_to(project).as_posix() for p in (project / "pipelines").rglob("*.yaml"))
    needs_shared = [r for r in recipes if "shared/models" in (project / r).read_text()]
    buildable = [r for r in recipes if SHARED_MODELS.is_dir() or r not in needs_shared]
    env.run(env.script("mlqpipe"), "build", *buildable, cwd=project)
    lock = json.loads((project / "mlqpipe.lock.json").read_text())
    assert {e["recipe"] for e in lock["outputs"].values()} == {_built_as(project, r) for r in buildable}
    for recipe in buildable:
        _check_built(project, lock, recipe)
    again = env.run(env.script("mlqpipe"), "build", *buildable, cwd=project).stdout
    assert "0 built" in again, again
    if len(buildable) < len(recipes):
        pytest.skip(f"../shared/models is absent: not built {sorted(set(recipes) - set(buildable))}")


_RECIPE = """\
version: 1
defaults:
  evaluation: {data: ../models/digits_test.npz, inputs: {image: X}, labels: y}
models:
  - input: ../models/%s
    output: ../build/{stem}.%s.mlmodel
rules:
  everything: {}
stages:
  - {name: fold, mode: fold}
  - {name: q8, mode: linear, nbits: 8, rules: [everything]}
gates: %s
"""


def _readme_dodo() -> str:
    """The dodo.py the README's "Building with doit" section tells users to write, verbatim."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Building with doit"):]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_dodo_with_plain_doit(env, tmp_path):
    (tmp_path / "models").mkdir()
    for name in ("digits_mlp.mlmodel", "digits_cnn.mlmodel", "digits_test.npz"):
        shutil.copy(REPO / "pipelines" / "demo" / name, tmp_path / "models" / name)
    (tmp_path / "recipes").mkdir()
    gates = "{min_snr_db: 20, min_top1_agreement: 0.97, min_accuracy: 0.93, min_compression: 3}"
    (tmp_path / "recipes" / "digits.yaml").write_text(_RECIPE % ("digits_*.mlmodel", "q8", gates))
    dodo = _readme_dodo()
    assert 'tasks_from_recipes("recipes/*.yaml")' in dodo
    (tmp_path / "dodo.py").write_text(dodo)

    env.run(env.python, "-m", "doit", cwd=tmp_path)
    lock = json.loads((tmp_path / "mlqpipe.lock.json").read_text())
    assert sorted(lock["outputs"]) == ["build/digits_cnn.q8.mlmodel", "build/digits_mlp.q8.mlmodel"]
    for out in lock["outputs"]:
        report = json.loads((tmp_path / out).with_suffix(".report.json").read_text())
        assert report["status"] == "passed" and report["evaluation"]["evaluated"]
        assert {g["gate"] for g in report["gates"] if g["passed"]} == {"min_snr_db", "min_top1_agreement", "min_accuracy", "min_compression"}
    assert (tmp_path / ".mlqpipe-doit.sqlite3").is_file()  # the dodo's DOIT_CONFIG took effect
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "build").iterdir()}
    assert "-- " in env.run(env.python, "-m", "doit", cwd=tmp_path).stdout  # up to date
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "build").iterdir()}

    # a failing gate fails the build, writes the report marked failed, and writes no model
    (tmp_path / "gated").mkdir()
    (tmp_path / "gated" / "tiny.yaml").write_text(_RECIPE % ("digits_mlp.mlmodel", "tiny", "{max_size_bytes: 1000}"))
    failed = env.run(env.script("mlqpipe"), "build", "gated/tiny.yaml", cwd=tmp_path, check=False)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "max_size_bytes" in failed.stdout + failed.stderr
    assert not (tmp_path / "build" / "digits_mlp.tiny.mlmodel").exists()
    assert json.loads((tmp_path / "build" / "digits_mlp.tiny.report.json").read_text())["status"] == "failed"
