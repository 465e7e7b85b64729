"""Build script: the pure-Python package (configured in pyproject.toml)."""
from setuptools import setup

setup()
