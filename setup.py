"""The project is configured in pyproject.toml; this adds what it cannot declare yet (outside
setuptools' experimental table): the C loops of kvstore/hashing.py. `pip install -e .` builds
them; `make native` rebuilds them in place. kvstore/hashing.py falls back to Python without."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("kvstore._chainhash", ["kvstore/_chainhash.c"])])
