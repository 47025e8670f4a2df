"""What the integrity thread and the zeroing threads run (kvstore/store/integrity.py,
zero_later.py): a batch of pages, the job over their bytes, the job's future on the loop, the
integrity thread's priority."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import os
import threading
from typing import TYPE_CHECKING, Any

from kvstore.memory.page_zero import zero
from kvstore.memory.pages import Page
from kvstore.store.page_sums import checksum

if TYPE_CHECKING:
    from kvstore.store.namespace import Namespace


# The integrity thread's nice, above the daemon's: its work can wait (checksums, the scrubber,
# zeroing ahead), the calls' threads and the clients' copies on the same cores cannot.
BACKGROUND_NICE = 10


def background() -> None:
    """On the integrity thread: lower its own priority (Linux: a thread's nice is its own)."""
    with contextlib.suppress(OSError, AttributeError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICE))


class Batch:
    """Pages one job checksums or zeroes; `future` is the job's once submitted."""

    __slots__ = ("future", "pages")

    def __init__(self) -> None:
        self.pages: list[Page] = []
        self.future: cf.Future[Any] | None = None


def work(
    sums: list[memoryview], zeros: list[memoryview], scrubs: list[memoryview]
) -> tuple[list[int], list[int]]:
    """On the integrity thread or a zeroing thread (xxhash and `zero` release the GIL)."""
    try:
        for v in zeros:
            zero(v)
        return [checksum(v) for v in sums], [checksum(v) for v in scrubs]
    finally:
        for v in (*sums, *zeros, *scrubs):
            v.release()  # (a view left alive would keep the pool's mapping from closing)


def tracked(ns: Namespace, future: cf.Future[Any]) -> asyncio.Future[Any]:
    """`future` on the loop, in `ns.private_reads` until done (DeleteNamespace waits for it)."""
    waited = asyncio.wrap_future(future)
    ns.private_reads.add(waited)  # type: ignore[arg-type]
    waited.add_done_callback(ns.private_reads.discard)  # type: ignore[arg-type]
    return waited
