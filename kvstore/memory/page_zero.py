"""Zeroing freed host-pool pages (docs/security.md, "Zero on free"): every zeroing of pool
bytes goes through `zero` (the integrity thread's batches, the zeroing threads' share of a
reply's pages, the loop's inline fallback: kvstore/store/integrity.py, integrity_jobs.py).

It is kvstore/_ntzero.c where built: streaming stores, which write whole cache lines without
reading them first and leave the client's copy its cache (~3x numpy's fill on a 737,280 B
page here), with the GIL released. Without the extension, numpy's fill(0) (glibc memset,
the GIL released too): the same bytes, slower.
"""

from __future__ import annotations

import numpy as np

try:
    from kvstore._ntzero import ways
    from kvstore._ntzero import zero as _native_zero
except ImportError:  # (not built: `make native`)
    _native_zero = None
    ways = None


def zero_numpy(view: memoryview) -> None:
    """Every byte of `view` (writable, contiguous) set to 0, with numpy."""
    np.frombuffer(view, dtype=np.uint8).fill(0)


zero = _native_zero if _native_zero is not None else zero_numpy
# How `zero` writes (Stats/logs do not carry it; benchmarks and tests print it).
HOW = ways()[-1] if ways is not None else "numpy"
