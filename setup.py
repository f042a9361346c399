"""Only the package list lives here; everything else is in pyproject.toml.

Packages are discovered, so a new subpackage cannot be left out of the wheel (mlqpipe/evaluate once was).
pyproject.toml cannot express this list: `packages.find` only finds directories under mlqpipe/, and the
top-level schemas/ folder ships as the mapped package mlqpipe.schemas (see `package-dir` there)."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["mlqpipe", "mlqpipe.*"]), "mlqpipe.schemas"])
