"""Zeroing off a put's reply: in a full pool a Put's next credit takes free pages zeroed
ahead (kvstore/store/zero_ahead.py), not the pages the grant just evicted, so its reply waits
for no zeroing; every credit page still reads zero before the client writes it, and what the
puts wrote reads back. The pages evicted ahead are zeroed on the zeroing threads at once, not
in the integrity thread's next batch (which marks them clean only with its checksums done).
And a call taking dirty pages does not take the ones the thread's batch is zeroing (its reply
would wait for that whole batch). In process: a real Store, memfd pool and Integrity on the
loop (the zeroing threads zero the pages evicted ahead between the puts, as they do while a
client copies into its credit)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from test_integrity_put_path import _all_freed_and_a_batch, _fill, _filled, _stop, _store

from kvstore.store import credit, zero_later
from kvstore.store.integrity import Integrity, IntegrityConfig
from kvstore.store.store import Store
from kvstore.store.types import NamespaceSpec, StoreLimits

PAGES = 4  # a credit (the pool: 48 pages, 16 tokens each; a credit is at most 6)
T = 16


async def _zeroed_ahead(ns: object, timeout: float = 10.0) -> None:
    """Until every free page is zeroed (a real condition, bounded)."""
    end = time.monotonic() + timeout
    while any(p.dirty for p in ns.pages.pages if p.prev is not None):  # type: ignore[attr-defined]
        assert time.monotonic() < end, "the free pages were not zeroed"
        await asyncio.sleep(0.002)


@pytest.mark.parametrize("integrity_task", [True, False], ids=["integrity-running", "integrity-idle"])
async def test_a_credit_in_a_full_pool_takes_pages_zeroed_ahead_not_the_ones_it_evicts(
    integrity_task: bool,
) -> None:
    """With the integrity task idle (never run: no batch of its thread zeroes anything), the
    pages evicted ahead are still zeroed before the next grant: the zeroing threads did it."""
    store, integrity, ns = _store()
    task = asyncio.create_task(
        integrity.run(lambda: store.namespaces) if integrity_task else asyncio.sleep(0)
    )
    try:
        sid = store.open_session("ahead", 600).session_id
        grant = credit.grant(store, store.session(sid), ns, PAGES)
        waited = []
        for i in range(30):  # 120 pages through a 48-page pool: every grant from the 12th on evicts
            for slot in grant.slots:
                assert _filled(ns, slot, 0), f"put {i}: credit slot {slot} not zero before the write"
                _fill(ns, slot, 0xA5)
            tokens = [(i * 1000 + j) % 1024 for j in range(PAGES * T)]
            with zero_later.deferred() as jobs:
                _, _, grant = credit.put(
                    store, sid, "ns", tokens, b"", "", grant.sequence_id, grant.slots, PAGES
                )
            assert grant.sequence_id, f"put {i}: no next credit"
            waited.append(sum(len(pages) for _, _, pages in jobs))
            await zero_later.settle(jobs)
            await _zeroed_ahead(ns)  # (the client's copy into the credit, in real time)
        assert ns.evictions >= 60, "the pool was full: the later grants evicted"
        assert waited[15:] == [0] * 15, f"a credit waited for the zeroing of pages it evicted: {waited}"
        assert ns.guard.stats()["replies_waited_zeroing"] == sum(1 for w in waited if w), "counted per reply"
        assert len(ns.pages.free) >= PAGES, "a credit's worth of free pages is kept zeroed ahead"
        assert ns.guard.stats()["pages_zeroed_inline"] == 0
        assert ns.guard.stats()["pages_zeroed"] >= 60, "the pages evicted ahead were zeroed off the loop"
        if not integrity_task:
            assert integrity.jobs == 0, "the integrity thread ran a batch: not what zeroed them"
        for page in ns.pages.pages:  # every sealed page holds what its put wrote
            if page.block_hash is not None and page.state.name == "SEALED":
                assert _filled(ns, page.slot, 0xA5)
    finally:
        await _stop(task, integrity, store)


async def test_a_call_takes_dirty_pages_the_threads_batch_is_not_zeroing() -> None:
    """The integrity thread zeroes the newest freed pages first and a call takes the oldest
    (the free list's order): a call no longer takes pages of the thread's batch and waits for
    that whole batch (up to 32 MiB) at the thread's low priority; it zeroes its own pages."""
    store = Store(StoreLimits(), shm_prefix=f"kvtest-za-{uuid.uuid4().hex[:12]}-")
    integrity = Integrity(IntegrityConfig(scrub_bytes_per_s=0, zero_after_s=0), lambda: store.sessions)
    store.attach = integrity.attach
    store.create_namespace(NamespaceSpec("ns", 8, 2, 1024, "float16", 16, 96))  # 96 pages of 1 MiB
    ns = store.namespaces["ns"]
    task = asyncio.create_task(integrity.run(lambda: store.namespaces))
    try:
        batch = await _all_freed_and_a_batch(integrity, ns)
        assert 0 < len(batch.pages) < 96  # (a job zeroes 32 MiB: 32 of them)
        with zero_later.deferred() as jobs:
            taken = ns.reserve_many(2, 16)
        assert not [p.slot for p in taken if p.zeroing is batch], "took pages of the thread's batch"
        assert not any(job is batch for _, job, _ in jobs), "the reply would wait for the thread's batch"
        assert jobs, "the pages taken were dirty: zeroed off the loop, and the reply waits for them"
        await zero_later.settle(jobs)
        assert ns.guard.stats()["replies_waited_zeroing"] == 1, "one reply waited (once, whatever its jobs)"
        assert all(not p.dirty and _filled(ns, p.slot, 0) for p in taken)
    finally:
        await _stop(task, integrity, store)
