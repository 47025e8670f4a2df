"""Big host copies, with streaming stores, split over a few threads (docs/api.md, "Copy
threads" and "Streaming stores").

Each copy goes through _ntcopy.c where it is built (streaming stores from STREAM_MIN bytes, the
GIL released), else numpy (which releases the GIL too). One thread storing with streaming
stores moved cold pages at 15-17 GB/s on the project's 2-vCPU VM, two at 19-22 GB/s for
47 MB copies (64 pages of 737,280 B) when the machine was quiet; from a source the size of
the `peers` benchmark's (755 MB, so read from memory) one thread moved 8.3 GB/s and two 13.1
for 12 MB copies (16 pages), and a put or get of 16 pages went 25-40% faster split, one of
one page (720 KiB) slower (BENCHMARKS.md, peers). So only a copy of at least
`MIN_SPLIT_BYTES` is cut into column bands (every row's band j in band j: equal shares whatever
the page count), taken by the caller's thread and the pool's as each is free. A copy returns
only once every band has landed, and raises the first band's error after all of them are done.

Threads: `set_copy_threads(n)`, else `$KVSTORE_COPY_THREADS`, else DEFAULT_THREADS; never
more than the CPUs this process may run on; 1 turns the split off.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib
import itertools
import os
import threading
from typing import Any

import numpy as np

try:  # streaming stores for big copies (_ntcopy.c); numpy's copy where it is not built
    # (by name: tools reading imports as text, the structure hook's cycle check among them,
    # cannot see a compiled submodule and would count this as an import of the package)
    _nt = importlib.import_module("kvstore_client._ntcopy")
    nt_copy, nt_copy_sum = _nt.copy, _nt.copy_sum
except ImportError:
    nt_copy = nt_copy_sum = None

ENV = "KVSTORE_COPY_THREADS"
DEFAULT_THREADS = 4  # (more rarely helps: a few threads already fill the memory channels)
# Below this a copy stays on the caller's thread: handing a band to another costs ~20-60 us
# (wake-up, a future, the GIL), which a 720 KiB page's copy (~85 us) did not win back; a 12 MB
# one (16 pages) did, and more (BENCHMARKS.md, peers, "Split from 4 MiB").
MIN_SPLIT_BYTES = 4 << 20
# From this size a copy (all its runs together) is stored with streaming stores (_ntcopy.c).
# Cold, they won at every size measured (64 KiB up); but when both buffers are in the cache
# (a 256-512 KiB copy repeated) memcpy moved 30-40 GB/s to their 10, so copies of less than
# half a typical L2 stay memcpy (a 720 KiB KV page streams).
STREAM_MIN = 512 << 10
# Bands a copy is cut into per thread: the caller takes over a helper's share when the helper
# is slow to start; narrower bands than this add a numpy call each for little.
BANDS_PER_THREAD = 2

_lock = threading.Lock()
_threads: int | None = None  # the setting in force (None: not read yet)
_pool: cf.ThreadPoolExecutor | None = None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # (not on Linux)
        return os.cpu_count() or 1


def _from_env() -> int:
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return DEFAULT_THREADS
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"${ENV}={raw!r}: give a whole number of threads (1 = no split)") from None
    if n < 1:
        raise ValueError(f"${ENV}={raw!r}: give at least 1 (1 = no split)")
    return n


def set_copy_threads(n: int | None) -> int:
    """Threads a big page copy is split over (1: none; None: `$KVSTORE_COPY_THREADS` or the
    default again); returns the number in force: `n` capped at this process's CPUs."""
    global _threads, _pool
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"copy threads={n!r}: give a whole number >= 1 (1 = no split)")
    with _lock:
        _threads = min(n if n is not None else _from_env(), _cores())
        # (the old pool is dropped, not shut down: a copy under way may still hand it bands;
        # its threads end once it is collected)
        _pool = None
    return _threads


def copy_threads() -> int:
    """The setting in force (reads the environment the first time)."""
    return _threads if _threads is not None else set_copy_threads(None)


def _executor(workers: int) -> cf.ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = cf.ThreadPoolExecutor(workers, thread_name_prefix="kvstore-copy")
        return _pool


def _forget_pool() -> None:
    global _pool
    _pool = None  # (a forked child has none of the parent's threads: it makes its own)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _copy_all(pairs: list[tuple[Any, Any]], stream: bool, sums: list[np.ndarray] | None = None) -> bool:
    """Copy each pair; with `sums` (one uint64 array a pair, a row each), also each row's
    XXH3-64 taken as it is copied (_ntcopy.copy_sum). Whether every pair's sums were taken."""
    summed = sums is not None and nt_copy_sum is not None
    for k, (dst, src) in enumerate(pairs):
        if summed and nt_copy_sum(dst, src, sums[k]):  # type: ignore[index]
            continue
        summed = False  # (declined: this pair and the rest are copied without them)
        # (_ntcopy declines what is not rows of bytes of one shape, or overlaps: numpy copies
        # those, or raises why it cannot)
        if nt_copy is None or not nt_copy(dst, src, stream=stream):
            np.copyto(dst, src)
    return summed


class _Bands:
    """A copy's bands, taken one at a time by whichever thread is free: the caller and the
    pool's threads. A thread the OS does not run soon (busy cores) takes none, and the caller
    copies them all rather than wait for it."""

    def __init__(
        self,
        bands: list[list[tuple[Any, Any]]],
        stream: bool,
        sums: list[list[np.ndarray]] | None = None,
    ) -> None:
        self.bands = bands
        self.stream = stream
        self.sums = sums  # (a band's: one array a pair of it) None: no sums wanted
        self.summed = sums is not None  # until a band could not take them
        self.next = 0
        self.lock = threading.Lock()
        self.error: BaseException | None = None

    def run(self) -> None:
        while True:
            with self.lock:
                i = self.next
                self.next += 1
            if i >= len(self.bands):
                return
            try:
                summed = _copy_all(self.bands[i], self.stream, self.sums[i] if self.sums else None)
                if not summed:
                    self.summed = False  # (a plain store: any thread may make it, none resets it)
            except BaseException as e:  # (the other bands still land; the first error is raised)
                with self.lock:
                    self.error = self.error or e


def copy_pairs(pairs: list[tuple[np.ndarray, np.ndarray]], sums: np.ndarray | None = None) -> bool:
    """`dst[...] = src` for each (dst, src) pair of 2-D uint8 arrays of equal shapes, split
    over the copy threads when they hold MIN_SPLIT_BYTES or more: BANDS_PER_THREAD column
    bands a thread, every row's band j in band j. Returns once every band has landed (or
    failed: then raises the first error).

    With `sums` (a uint64 array, one entry a row of all the pairs, in order) each row (a whole
    page) is also hashed as it is copied, XXH3-64 into its entry (_ntcopy.copy_sum); the
    bands are then runs of whole rows. Returns whether every entry was filled (False: where
    copy_sum could not, the rows were copied without it, and `sums` means nothing)."""
    threads = copy_threads()
    total = sum(d.size for d, _ in pairs)
    # (decided for the whole copy, not per run or band: it is the copy's size that says
    # whether its bytes can stay in the cache)
    stream = total >= STREAM_MIN
    per_pair = None
    if sums is not None:
        if nt_copy_sum is None:
            sums = None
        else:
            edges = itertools.accumulate((d.shape[0] for d, _ in pairs), initial=0)
            per_pair = [sums[a:b] for a, b in itertools.pairwise(edges)]
    if threads < 2 or total < MIN_SPLIT_BYTES:
        return _copy_all(pairs, stream, per_pair)
    n = threads * BANDS_PER_THREAD
    bands: list[list[tuple[Any, Any]]] = [[] for _ in range(n)]
    band_sums: list[list[np.ndarray]] | None = None
    if per_pair is None:
        for dst, src in pairs:
            width = dst.shape[1]
            step = -(-width // n)
            for j, a in enumerate(range(0, width, step)):
                bands[j].append((dst[:, a : a + step], src[:, a : a + step]))
    else:  # whole rows: a row's hash is taken in one pass, by one thread
        band_sums = [[] for _ in range(n)]
        for (dst, src), out in zip(pairs, per_pair, strict=True):
            step = -(-dst.shape[0] // n)
            for j, a in enumerate(range(0, dst.shape[0], step)):
                bands[j].append((dst[a : a + step], src[a : a + step]))
                band_sums[j].append(out[a : a + step])
    keep = [j for j, b in enumerate(bands) if b]
    work = _Bands([bands[j] for j in keep], stream, [band_sums[j] for j in keep] if band_sums else None)
    pool = _executor(threads - 1)
    helpers = [pool.submit(work.run) for _ in range(threads - 1)]
    work.run()
    for f in helpers:  # one not started yet takes nothing: it need not run at all
        if not f.cancel():
            f.result()  # (started: it is copying a band, or has found none left)
    if work.error is not None:
        raise work.error
    return work.summed
