"""The store and its tiers in this process: a real `HostTier` and a real LMDB `DiskTier` (read
ahead off, so dropping the OS page cache really sends a promotion to the reader threads).
What a demotion of a page promoted from disk does depends on where its bytes came from:

- through the page cache (read on the loop): nothing is copied, its bytes are in DRAM there;
- from the device (a reader thread): it is copied into the host tier, under the checksum its
  bytes verified against when they came up, so bytes scribbled over it in the pool fail at
  its next promotion and are never served.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from pathlib import Path

import pytest

from kvstore.store.store import Store
from kvstore.store.tiering.flush import flush_to_disk
from kvstore.store.tiering.tiers import Tiers
from kvstore.store.types import NamespaceSpec, StoreLimits
from kvstore.tiers import DiskTier, HostTier

SPEC = NamespaceSpec(
    "t", num_layers=2, num_kv_heads=2, head_dim=256, dtype="float16", page_tokens=4, num_pages=16
)
PB = SPEC.page_bytes  # 16 KiB: a payload covers whole OS pages of the LMDB file
T = SPEC.page_tokens


def content(tokens: list[int], index: int) -> bytes:
    return hashlib.shake_128(repr(tokens[: (index + 1) * T]).encode()).digest(PB)


async def _settled(store: Store, r):
    waiting = [p.wait() for p in r.promotions if p.ok is None]
    if waiting:
        await asyncio.gather(*waiting)
    return store.settle_lookup(r) if r.promotions else r


async def scenario(tmp: Path, drop_page_cache: bool) -> dict:
    disk = DiskTier.open(tmp / "disk", 16 << 20, readahead=False)
    tiers = Tiers(HostTier(4 * PB), disk)
    store = Store(StoreLimits(), f"kvt-{uuid.uuid4().hex[:8]}-", tiers=tiers)
    try:
        store.create_namespace(SPEC)
        ns = store.namespace("t")
        sid = store.open_session("test", 60).session_id

        def write(tokens: list[int]) -> None:
            seq, _ = store.allocate(sid, "t", 0, b"")
            for ref in store.append(sid, seq, tokens).pages:
                ns.page_view(ref.slot)[:] = content(tokens, ref.index)
            store.commit(sid, seq, len(tokens))
            store.release_sequence(sid, seq)

        async def read(tokens: list[int]) -> tuple[int, list[bool]]:
            r = await _settled(store, store.lookup(sid, "t", tokens, b"", True))
            same = [bytes(ns.page_view(s)) == content(tokens, i) for i, s in enumerate(r.slots)]
            store.release_pin(sid, r.pin_id)
            return r.hit_tokens // T, same

        a, b = [list(range(100 * s, 100 * s + 4 * T)) for s in (1, 2)]
        write(a)
        store.evict_all("t")  # a -> host
        write(b)
        store.evict_all("t")  # b -> host, pushing a to disk
        await flush_to_disk(tiers, [ns])
        assert len(tiers.host) == 4 and len(disk) == 8
        if drop_page_cache:
            fd = os.open(tmp / "disk" / "data.mdb", os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        inline = tiers.counters["promoted_disk_inline"]
        r = await _settled(store, store.lookup(sid, "t", a, b"", True))  # a: promoted from disk
        assert r.hit_tokens == 4 * T and tiers.counters["promoted_disk"] == 4
        out = {"read_on_the_loop": tiers.counters["promoted_disk_inline"] - inline}
        ns.page_view(r.slots[1])[:] = b"\x07" * PB  # scribble over a sealed page in the pool
        store.release_pin(sid, r.pin_id)
        before = dict(tiers.counters)
        store.evict_all("t")
        out["copied_to_host"] = tiers.counters["demoted_host"] - before["demoted_host"]
        out["clean"] = tiers.counters["demoted_clean"] - before["demoted_clean"]
        out["first_read"] = await read(a)
        out["corrupt"] = tiers.host.stats()["corrupt"]
        store.evict_all("t")
        out["second_read"] = await read(a)
        return out
    finally:
        store.close()


@pytest.mark.parametrize("drop_page_cache", [False, True], ids=["page-cache", "device"])
def test_demotion_of_a_page_promoted_from_disk(tmp_path: Path, drop_page_cache: bool) -> None:
    got = asyncio.run(scenario(tmp_path, drop_page_cache))
    if not drop_page_cache:
        assert got["read_on_the_loop"] == 4
        assert got["copied_to_host"] == 0 and got["clean"] == 4  # its bytes are in the page cache
        assert got["first_read"] == (4, [True] * 4)  # the scribble was never copied anywhere
        assert got["corrupt"] == 0
    else:
        assert got["read_on_the_loop"] == 0
        assert got["copied_to_host"] == 4 and got["clean"] == 0
        # Copied under the disk record's checksum: page 1 (scribbled) fails; the hit ends there.
        assert got["first_read"] == (1, [True])
        assert got["corrupt"] == 1
    assert got["second_read"] == (4, [True] * 4)  # from disk, as written


@pytest.mark.parametrize("below", ["host", "disk"])
def test_pages_brought_up_at_once_need_no_waiting_and_leak_no_references(tmp_path: Path, below: str) -> None:
    """From the host tier, or from disk through the page cache, a lookup seals the pages in
    place (Tiers.promote_now): nothing in flight, every page ready in the reply; a pin holds
    exactly the pages of its hit and releasing it (or not pinning) leaves none held."""

    async def run() -> None:
        disk = DiskTier.open(tmp_path / "disk", 16 << 20) if below == "disk" else None
        tiers = Tiers(HostTier(8 * PB) if below == "host" else None, disk)
        store = Store(StoreLimits(), f"kvt-{uuid.uuid4().hex[:8]}-", tiers=tiers)
        try:
            store.create_namespace(SPEC)
            ns = store.namespace("t")
            sid = store.open_session("test", 60).session_id
            tokens = list(range(7, 7 + 4 * T))
            seq, _ = store.allocate(sid, "t", 0, b"")
            for ref in store.append(sid, seq, tokens).pages:
                ns.page_view(ref.slot)[:] = content(tokens, ref.index)
            store.commit(sid, seq, len(tokens))
            store.release_sequence(sid, seq)
            store.evict_prefix("t", tokens[: 2 * T], b"")  # pages 1..3 below, page 0 stays
            if disk is not None:
                await flush_to_disk(tiers, [ns])
            assert len(ns.index) == 1 and ns.pages_pinned == 0

            r = store.lookup(sid, "t", tokens, b"", True)
            assert r.promotions == [] and r.ready_pages == 4 and r.hit_tokens == 4 * T
            assert [bytes(ns.page_view(s)) == content(tokens, i) for i, s in enumerate(r.slots)] == [True] * 4
            assert ns.pages_pinned == 4 and all(p.refcount == 1 for p in ns.index._pages.values())
            store.release_pin(sid, r.pin_id)
            assert ns.pages_pinned == 0 and len(ns.index) == 4

            store.evict_prefix("t", tokens[: 2 * T], b"")
            r = store.lookup(sid, "t", tokens, b"", False)  # unpinned: nothing stays held
            assert r.hit_tokens == 4 * T and r.promotions == [] and r.pin_id == 0
            assert ns.pages_pinned == 0 and len(ns.index) == 4 and ns.pages_reserved == 0
            counted = tiers.counters["promoted_" + below]
            assert counted == 6 and tiers.counters["promoted_disk_inline"] == (6 if disk else 0)
        finally:
            store.close()

    asyncio.run(run())
