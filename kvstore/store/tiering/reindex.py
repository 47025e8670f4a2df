"""The disk tier's re-index at start, as the store sees it (kvstore/daemon.py runs it on a
thread while the daemon serves): every record found becomes findable, its parent -> child
pair feeds prefetch's successor map, and records of swapped sequences (dead with the daemon
that swapped them) are handed back for deletion. `Tiers.close` waits for it to stop."""

from __future__ import annotations

from collections.abc import Callable

from kvstore.errors import InvariantBroken
from kvstore.store.tiering.tiers import SWAP_SUFFIX, Tiers
from kvstore.tiers import PageKey


def reindex_disk(
    tiers: Tiers,
    on_progress: Callable[[int, int, float], None],
    post: Callable[[list[tuple[str, bytes, bytes]]], None],
) -> tuple[int, list[PageKey]]:
    """Run on a thread at start: rebuild the disk tier's index and hand (namespace, parent,
    child) pairs to `post` (which hops to the loop) in chunks. Returns (pages found, keys of
    swapped sequences' records, to delete)."""
    if tiers.disk is None:
        raise InvariantBroken("re-indexing a disk tier that does not exist")
    found = 0
    stale: list[PageKey] = []
    pairs: list[tuple[str, bytes, bytes]] = []
    tiers.reindex_idle.clear()
    try:
        found = _reindex(tiers, on_progress, post, stale, pairs)
    finally:
        tiers.reindex_idle.set()
    return found, stale


def _reindex(
    tiers: Tiers,
    on_progress: Callable[[int, int, float], None],
    post: Callable[[list[tuple[str, bytes, bytes]]], None],
    stale: list[PageKey],
    pairs: list[tuple[str, bytes, bytes]],
) -> int:
    if tiers.disk is None:
        raise InvariantBroken("re-indexing a disk tier that does not exist")
    found = 0
    state = tiers.reindex_state
    if tiers.closing:  # (checked after the idle event was cleared: close() waits for us)
        return 0
    scan = tiers.disk.reindex(on_progress)
    for meta in scan:
        if tiers.closing:  # the daemon is stopping: let close() have LMDB
            scan.close()
            break
        if meta.namespace.endswith(SWAP_SUFFIX):
            stale.append(meta.key)
            continue
        found += 1
        state.bytes_done += meta.page_bytes
        if meta.parent_hash:
            pairs.append((meta.namespace, meta.parent_hash, meta.block_hash))
        if len(pairs) >= 4096:
            post(pairs)
            pairs = []
    if pairs:
        post(pairs)
    return found
