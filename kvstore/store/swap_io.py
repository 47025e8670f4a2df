"""Reading a swapped-out sequence's private pages back (kvstore/store/preempt.py): from the
host tier on the loop (a memcpy), from disk on the disk tier's reader threads, so a swap-in
never blocks the loop on the device. Touches only the tiers and the bytes of a RESERVED pool
page that nobody else can see until the read is over."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from kvstore.tiers import CorruptPage, DiskTier, HostTier, PageKey

log = logging.getLogger(__name__)

WRITE_WAIT_S = 60.0  # a read of a page still queued for disk waits this long for its write


def read_private(
    host: HostTier | None,
    disk: DiskTier | None,
    write: cf.Future[Any] | None,
    key: PageKey,
    view: memoryview,
) -> bool | asyncio.Future[bool]:
    """Copy the record `key` into `view`, verified: whether it could be (False: gone or
    corrupt), or, for a record on disk while a loop runs, a future of that resolved on the
    loop. `write`: the disk write of the record, if it has not committed yet."""
    if host is not None and key in host:
        return _read(host.read_into, key, view)
    if disk is None:
        return False
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no loop (tools, tests of the store alone): read here
        return _read_disk(disk, write, key, view)
    try:
        return loop.run_in_executor(disk.readers, _read_disk, disk, write, key, view)
    except RuntimeError:  # the readers are shut down: the daemon is stopping
        return False


def _read_disk(disk: DiskTier, write: cf.Future[Any] | None, key: PageKey, view: memoryview) -> bool:
    if write is not None:  # swapped in before its write committed: that first
        with contextlib.suppress(Exception):  # (what is on disk then decides)
            write.result(WRITE_WAIT_S)
    return _read(disk.read_into, key, view)


def _read(read_into: Callable[[PageKey, memoryview], Any], key: PageKey, view: memoryview) -> bool:
    try:
        return read_into(key, view) is not None
    except Exception as e:  # corrupt, or the tier failing: the page cannot come back either way
        level = logging.WARNING if isinstance(e, (CorruptPage, ValueError)) else logging.ERROR
        log.log(level, "swapped page %s cannot be read back: %r", key, e)
        return False
