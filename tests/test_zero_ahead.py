"""Zero ahead (kvstore/store/zero_ahead.py): in a full pool a Put's next credit takes free
pages the integrity thread zeroed ahead, not the pages the grant just evicted, so its reply
waits for no zeroing; every credit page still reads zero before the client writes it, and
what the puts wrote reads back. In process: a real Store, memfd pool and Integrity running
on the loop (its thread zeroes the pages evicted ahead between the puts, as it does while a
client copies into its credit)."""

from __future__ import annotations

import asyncio
import time

from test_integrity_put_path import _fill, _filled, _store

from kvstore.store import credit, zero_later

PAGES = 4  # a credit (the pool: 48 pages, 16 tokens each; a credit is at most 6)
T = 16


async def _zeroed_ahead(ns: object, timeout: float = 10.0) -> None:
    """Until the integrity thread has zeroed every free page (a real condition, bounded)."""
    end = time.monotonic() + timeout
    while any(p.dirty for p in ns.pages.pages if p.prev is not None):  # type: ignore[attr-defined]
        assert time.monotonic() < end, "the integrity thread did not zero the free pages"
        await asyncio.sleep(0.002)


async def test_a_credit_in_a_full_pool_takes_pages_zeroed_ahead_not_the_ones_it_evicts() -> None:
    store, integrity, ns = _store()
    task = asyncio.create_task(integrity.run(lambda: store.namespaces))
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
        assert len(ns.pages.free) >= PAGES, "a credit's worth of free pages is kept zeroed ahead"
        assert ns.guard.stats()["pages_zeroed_inline"] == 0
        for page in ns.pages.pages:  # every sealed page holds what its put wrote
            if page.block_hash is not None and page.state.name == "SEALED":
                assert _filled(ns, page.slot, 0xA5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        integrity.close()
        store.close()
