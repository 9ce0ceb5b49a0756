"""Builds the one compiled module, the boosting trees' leaf-mask walk (`_treekernel`).

Everything else about the package is in pyproject.toml.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("churn_batch._treekernel", ["churn_batch/_treekernel.pyx"])],
        language_level=3,
    )
)
