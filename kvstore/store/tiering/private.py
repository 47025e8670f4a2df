"""A swapped-out sequence's private pages below the pool (kvstore/store/preempt.py): its
unsealed pages, saved under keys of their own, and read back at swap-in: from the host tier
on the loop (a memcpy), from disk on the disk tier's reader threads, so a swap-in never
blocks the loop on the device. A read touches only the tiers and the bytes of a RESERVED
pool page that nobody else can see until the read is over."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvstore.memory.pages import Page
from kvstore.store.tiering.tiers import SWAP_SUFFIX, WRITE_WAIT_S, Tiers
from kvstore.tiers import CorruptPage, DiskTier, HostTier, PageKey, PageRecord, make_meta

if TYPE_CHECKING:
    from kvstore.store.namespace import Namespace

log = logging.getLogger(__name__)


def save(tiers: Tiers, ns: Namespace, page: Page) -> PageKey:
    """Copy an unsealed page of a sequence being swapped out below the pool, under a key of
    its own. ValueError when no tier can take it (the caller answers ResourceExhausted)."""
    meta = make_meta(
        ns.name + SWAP_SUFFIX, os.urandom(16), b"", ns.spec.page_tokens, ns.spec.page_bytes, ns.geometry
    )
    view = ns.page_out(page.slot)
    if tiers.host is not None and tiers.make_host_room(ns.spec.page_bytes, ns):
        tiers.host.put(PageRecord.build(meta, view))
    elif tiers.disk is not None:
        tiers.put_disk([PageRecord.build(meta, bytes(view))], strict=True)
    else:
        raise ValueError("no tier below the pool has room")
    return meta.key


def load(tiers: Tiers, ns: Namespace, key: PageKey, page: Page) -> bool | asyncio.Future[bool]:
    """Copy a swapped page back into `page`, verified: whether it could be (it may be gone
    or corrupt), or a future of that while a reader thread reads it from disk."""
    return read_private(tiers.host, tiers.disk, tiers.queued.get(key), key, ns.page_in(page.slot))


def discard(tiers: Tiers, key: PageKey) -> None:
    if tiers.host is not None and tiers.host.remove(key):
        return
    if tiers.disk is not None:
        tiers.disk.remove_async((key,))


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
