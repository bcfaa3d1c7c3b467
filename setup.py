"""The one C extension; everything else about the package is in pyproject.toml."""

from setuptools import Extension, setup

# The aggregator's check of pushed figures in C (loadagg/server/validation.py says why). A build without a C
# compiler installs without it (optional): the same checks then run in Python, slower.
setup(ext_modules=[Extension("loadagg.server._figures", ["loadagg/server/_figures.c"], optional=True)])
