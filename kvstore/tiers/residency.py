"""Reading LMDB's map on the event loop only when it cannot block: `PageCacheCopier` (below)
copies a record from the OS page cache or refuses; `resident` asks `mincore(2)`.

The disk tier reads LMDB through its memory map. A record whose pages are resident is a
memcpy away (microseconds), cheaper to copy on the event loop than to hand to a reader
thread (a queue hop, a wake-up and the GIL twice); a record that is not would fault to the
device and must go to a thread. `mincore(2)` answers which, per 4 KiB page, without
touching the bytes. Where it is not available (not Linux, no libc), everything counts as
not resident and reads keep going to the threads.

What neither can see: LMDB finds the payload's address by walking its B-tree, and that walk
touches a few small branch/leaf pages before we can ask; those are the hottest pages of the
map, resident in practice. It also reads the header of the payload's first overflow page
inside `get()`: for a record that is not cached, that one 4 KiB page comes from the device
on the loop, and with read-ahead on, its neighbours with it (docs/tiers.md, "Promotion").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

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


class PageCacheCopier:
    """Copy a slice of an LMDB map into a buffer only if it is all in the OS page cache:
    `copy(src, dst)` -> True (copied), False (not cached; `dst` may hold part of it).

    One `preadv2(RWF_NOWAIT)` on the data file at the slice's file offset: the kernel copies
    from the page cache or refuses, with no `mincore` before a memcpy. That is half the
    cost alone (2 vs 4 us for 32 KiB here) and, under load, much less than `mincore`, which
    takes the process's memory-map lock that every thread's allocations contend for (18 us a
    call in the daemon under the tiers' load benchmark).

    The file offset is the slice's address less the map's base address; LMDB does not tell
    it, so the first copy finds it from the overflow page header just before the payload
    (its page number) and checks it: the bytes read at that offset must equal the slice.
    If they do not, or `RWF_NOWAIT` is not supported, it falls back to `resident` + memcpy
    for good. (For a page that is not cached, the kernel starts its readahead and refuses the
    read unless that I/O is already complete when it looks, as on a virtual disk backed by the
    host's page cache: either way the loop does not wait for the device.) A wrong offset can
    therefore never hand back other bytes (and the caller verifies a checksum over what it
    copied anyway)."""

    def __init__(self, path: str, page_size: int) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._psize = page_size
        self._base: int | None = None
        self._nowait = getattr(os, "RWF_NOWAIT", None) is not None and hasattr(os, "preadv")

    @property
    def direct(self) -> bool:
        """True once copies go through `preadv2(RWF_NOWAIT)` (the base address is known)."""
        return self._nowait and self._base is not None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def offset_of(self, src: memoryview) -> int | None:
        """The file offset of a slice of the map, once copies go by offsets (`direct`)."""
        if not self.direct:
            return None
        return np.frombuffer(src, np.uint8).ctypes.data - self._base  # type: ignore[operator]

    def copy_at(self, offset: int, dst: memoryview) -> bool:
        """Copy `dst.nbytes` from the data file at `offset` if all of it is in the page cache
        (one `preadv2(RWF_NOWAIT)`); False if not, or if the file is shorter. Nothing here says
        what is at that offset now: the caller checks the bytes (a checksum)."""
        try:
            n = os.preadv(self._fd, [dst], offset, os.RWF_NOWAIT)
        except (OSError, OverflowError):
            return False
        return n == dst.nbytes

    def copy(self, src: memoryview, dst: memoryview) -> bool:
        if not self._nowait:
            return self._copy_checked(src, dst)
        addr = np.frombuffer(src, np.uint8).ctypes.data
        base = self._base
        if base is None:
            if src.nbytes <= self._psize // 2:  # (in a leaf page, not an overflow page)
                return self._copy_checked(src, dst)
            return self._find_base(addr, src, dst)
        try:
            n = os.preadv(self._fd, [dst], addr - base, os.RWF_NOWAIT)
        except BlockingIOError:
            return False
        except (OSError, OverflowError):  # (EOPNOTSUPP on a file system without it)
            self._nowait = False
            return self._copy_checked(src, dst)
        return n == dst.nbytes

    @staticmethod
    def _copy_checked(src: memoryview, dst: memoryview) -> bool:
        if not resident(src):
            return False
        dst[:] = src
        return True

    def _find_base(self, addr: int, src: memoryview, dst: memoryview) -> bool:
        if not self._copy_checked(src, dst):
            return False  # (find it with a cached one)
        # LMDB's page header (16 bytes) ends where an overflow value (one larger than half a
        # page) begins; it starts with the page number (u64). LMDB touched that page to find
        # the value, so reading it cannot block. Values in leaf pages (smaller ones) have no
        # header of their own, but once the base is known their offset is found the same way.
        pgno = int.from_bytes(ctypes.string_at(addr - 16, 8), "little")
        base = addr - (pgno * self._psize + 16)
        check = bytearray(dst.nbytes)
        try:
            n = os.preadv(self._fd, [check], addr - base, os.RWF_NOWAIT)
        except (OSError, OverflowError):
            n = -1
        if n == dst.nbytes and check == dst:
            self._base = base
        else:
            self._nowait = False
        return True


def copy_off_the_gil(dst: memoryview, src: memoryview) -> None:
    """Copy with the GIL released (numpy drops it for copies this size). A memoryview copy
    holds it, and a reader thread that never lets go of the GIL outside LMDB calls starves
    the writer thread: with a few readers busy, every GIL hand-off went to another reader and
    writes stalled for good (tests/test_tiers_disk.py::test_readers_during_eviction_...)."""
    np.copyto(np.frombuffer(dst, np.uint8), np.frombuffer(src, np.uint8))
