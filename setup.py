# The only thing setup.py does: build the C core through cffi (out-of-line API mode).
from setuptools import setup

setup(cffi_modules=["uffd/_build.py:ffibuilder"])
