"""The package list and the optional compiled k-means; everything else is in pyproject.toml.

Packages are discovered, so a new subpackage cannot be left out of the wheel (mlqpipe/evaluate once was).
pyproject.toml cannot express this list: `packages.find` only finds directories under mlqpipe/, and the
top-level schemas/ folder ships as the mapped package mlqpipe.schemas (see `package-dir` there).

mlqpipe.quant._kmeans1d is the exact 1-D k-means in C (the numpy code's operations in its order). It is
optional: where no C compiler works, the build goes on without it and mlqpipe uses numpy (the same LUTs,
slower). -ffp-contract=off keeps the compiler from fusing a multiply and an add into one FMA, which rounds
once instead of twice and would change LUTs."""

import sys

from setuptools import Extension, find_packages, setup

_FLAGS = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-fno-fast-math"]

setup(
    packages=[*find_packages(include=["mlqpipe", "mlqpipe.*"]), "mlqpipe.schemas"],
    ext_modules=[Extension("mlqpipe.quant._kmeans1d", ["mlqpipe/quant/_kmeans1d.c"], extra_compile_args=_FLAGS, optional=True)],
)
