"""Admin.Flush: every sealed page (pool and host tier) not yet on disk, written and fsynced.

Streamed, so a flush of a large pool neither stalls the loop nor queues a copy of the whole
pool: pages are copied on the loop (a sealed page's slot may be freed once the loop moves
on) in chunks of `CHUNK_PAGES`, each chunk only while the disk write queue is under its bound
(`disk_queue_bytes`); otherwise the flush waits, off the loop, for the writer to drain it.
Other RPCs are served between chunks. A page evicted meanwhile was demoted like any other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING

from kvstore.errors import FailedPrecondition, InvariantBroken
from kvstore.tiers import CorruptPage, PageKey, PageRecord

if TYPE_CHECKING:
    from kvstore.store.namespace import Namespace
    from kvstore.store.tiering.tiers import Tiers

CHUNK_PAGES = 32  # pages copied per turn of the loop


async def flush_to_disk(tiers: Tiers, namespaces: list[Namespace]) -> int:
    """Queue every sealed page not on disk and wait for the writer's commit + fsync. Returns
    how many pages this flush queued; raises the tier's typed errors (DiskUnavailable,
    DiskWriteError, DiskFull) when it cannot acknowledge them."""
    disk = tiers.disk
    if disk is None:
        raise FailedPrecondition("the daemon has no disk tier (server.disk_tier_dir): nothing to flush to")
    disk.flushing += 1
    try:
        await tiers.quant.settled()  # (pages demoted a moment ago: their records placed first)
        queued = 0
        for n, item in enumerate(_records(tiers, namespaces), 1):
            if isinstance(item, PageRecord):
                record = item
            else:  # a quantized namespace's page: its record made on the quantizer's threads
                record = await tiers.quant.make(*item)
                if record.key in disk or record.key in tiers.queued:
                    continue  # (written meanwhile)
            while not disk.has_queue_room(record.meta.page_bytes):
                await asyncio.wrap_future(disk.barrier())
            tiers.put_disk([record], strict=True)
            queued += 1
            if n % CHUNK_PAGES == 0:
                await asyncio.sleep(0)  # let other RPCs in
        await asyncio.wrap_future(disk.flush_async())
        return queued
    finally:
        disk.flushing -= 1


def _records(
    tiers: Tiers, namespaces: list[Namespace]
) -> Iterator[PageRecord | tuple[Namespace, PageKey, bytes, bytes]]:
    """The records to write, each made (copied) when the consumer asks for it: between two
    asks the loop may have run, so each page is looked up again by its hash. A quantized
    namespace's page comes as (namespace, key, parent hash, a copy of its bytes), for the
    consumer to have its record made off the loop."""
    disk = tiers.disk
    if disk is None:
        raise InvariantBroken("flushing to a disk tier that does not exist")
    for ns in namespaces:
        for block_hash in [p.block_hash for p in ns.sealed_pages() if p.block_hash]:
            page = ns.index.get(block_hash)
            key = PageKey(ns.name, block_hash)
            if page is None or key in disk or key in tiers.queued:
                continue
            if ns.spec.tier_quantized:
                original = tiers.original(ns, page)
                if original is not None:  # (None: dequantized bytes, never quantized again)
                    yield (ns, key, *original)
                continue
            record = tiers.record(ns, page, copy=True)
            if record is not None:
                yield record
    host = tiers.host
    if host is not None:
        for key in host.keys():  # noqa: SIM118 (a HostTier, not a dict: keys() is a snapshot)
            if key in host and key not in disk and key not in tiers.queued:
                try:
                    record = host.record(key)
                except CorruptPage:
                    continue
                if record is not None:
                    yield record
