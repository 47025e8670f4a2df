"""The project is configured in pyproject.toml; this adds what it cannot declare yet (outside
setuptools' experimental table): the C loops of kvstore/hashing.py and of kvstore/quant.
`pip install -e .` builds them; `make native` rebuilds them in place. Both fall back to Python
(numpy) without them."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("kvstore._chainhash", ["kvstore/_chainhash.c"]),
        # -ffp-contract=off: no fused multiply-add, so the results equal numpy's bit for bit;
        # -Wno-psabi: its 32-byte vectors never cross a non-inline call (GCC warns anyway).
        Extension(
            "kvstore._quant",
            ["kvstore/_quant.c"],
            extra_compile_args=["-O3", "-ffp-contract=off", "-Wno-psabi"],
        ),
    ]
)
