"""Whether bytes of a file mapping are in the OS page cache, so reading them cannot block.

The disk tier reads LMDB through its memory map. A record whose pages are resident is a
memcpy away (microseconds), cheaper to copy on the event loop than to hand to a reader
thread (a queue hop, a wake-up and the GIL twice); a record that is not would fault to the
device and must go to a thread. `mincore(2)` answers which, per 4 KiB page, without
touching the bytes. Where it is not available (not Linux, no libc), everything counts as
not resident and reads keep going to the threads.

What it cannot see: LMDB finds the payload's address by walking its B-tree, and that walk
touches a few small branch/leaf pages before we can ask. Those are the hottest pages of the
map (every read and write walks them), so they are resident in practice; the check covers
the payload, which is the bulk of a read.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap

import numpy as np

_PAGE = mmap.PAGESIZE


def _load_mincore():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.mincore
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    fn.restype = ctypes.c_int
    return fn


_mincore = _load_mincore()


def resident(view: memoryview) -> bool:
    """True if every OS page under `view` (a slice of a file mapping) is in the page cache."""
    if _mincore is None or view.nbytes == 0:
        return _mincore is not None
    addr = np.frombuffer(view, np.uint8).ctypes.data
    start = addr - addr % _PAGE
    length = addr + view.nbytes - start
    pages = (length + _PAGE - 1) // _PAGE
    vec = ctypes.create_string_buffer(pages)
    if _mincore(start, length, vec) != 0:
        return False  # (ENOMEM: not mapped; treat as "would block")
    # Bit 0 of each byte: resident; the other bits are reserved (0).
    return vec.raw.count(1) == pages
