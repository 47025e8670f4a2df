"""Zero on free under races (kvstore/store/integrity.py): pages freed with distinctive bytes
are taken again at every point of the background zeroing (before its job starts, while the
integrity thread zeroes them, after), and every page handed out reads zero; a page taken for
a promotion or an unzeroed credit (written whole, so not zeroed) is never zeroed under it;
the count of dirty free pages stays exact. A real store, a real memfd pool, the real
integrity thread and task on a running loop."""

from __future__ import annotations

import asyncio
import random
import time
import uuid

import numpy as np

from kvstore.store.integrity import Integrity, IntegrityConfig
from kvstore.store.namespace import Namespace
from kvstore.store.store import Store
from kvstore.store.types import NamespaceSpec, StoreLimits

PAGES = 96
SPEC = NamespaceSpec("ns", 4, 2, 1024, "float16", 16, PAGES)  # 256 KiB pages: the thread takes a while


def guarded(zero_after_s: float) -> tuple[Store, Integrity, Namespace]:
    """A real store with one namespace "ns" whose pool the integrity service guards."""
    store = Store(StoreLimits(), shm_prefix=f"kvtest-zero-{uuid.uuid4().hex[:12]}-")
    integrity = Integrity(
        IntegrityConfig(scrub_bytes_per_s=0, zero_after_s=zero_after_s), lambda: store.sessions
    )
    store.attach = integrity.attach
    store.create_namespace(SPEC)
    return store, integrity, store.namespaces["ns"]


def fill(store: Store, slot: int, value: int) -> None:
    view = store.namespaces["ns"].page_view(slot)
    np.frombuffer(view, dtype=np.uint8).fill(value)
    view.release()  # (a view left alive keeps the pool's mapping from closing)


def is_filled(store: Store, slot: int, value: int) -> bool:
    view = store.namespaces["ns"].page_view(slot)
    arr = np.frombuffer(view, dtype=np.uint8)
    filled = bool((arr == value).all())
    del arr
    view.release()
    return filled


def is_zero(store: Store, slot: int) -> bool:
    view = store.namespaces["ns"].page_view(slot)
    arr = np.frombuffer(view, dtype=np.uint8)
    zero = not arr.any()
    del arr
    view.release()
    return zero


async def test_every_page_taken_reads_zero_while_freed_pages_are_being_zeroed() -> None:
    store, integrity, ns = guarded(0)
    task = asyncio.create_task(integrity.run(lambda: store.namespaces))
    rng = random.Random(0)
    try:
        for round_ in range(40):
            pages = ns.reserve_many(1, len(ns.pages.free))
            for page in pages:
                fill(store, page.slot, 0xA5)
            for page in pages:
                ns.free_reserved(page)
            integrity.kick()
            for _ in range(rng.randrange(12)):  # a job not started yet, under way, or done
                await asyncio.sleep(0)
            # A promotion's page is not zeroed (it writes every byte), but never while the
            # thread may still zero it: what it wrote stays.
            promoted = ns.reserve(3, overwritten=True)
            fill(store, promoted.slot, 0x5A)
            credit = ns.reserve_many(4, rng.randrange(1, 9), overwritten=True)  # (an unzeroed credit)
            for page in credit:
                fill(store, page.slot, 0x77)
            taken = ns.reserve_many(2, rng.randrange(1, len(ns.pages.free) + 1))
            for page in taken:
                assert not page.dirty and page.zeroing is None
                assert is_zero(store, page.slot), (
                    f"round {round_}: slot {page.slot} handed out with old bytes"
                )
            for _ in range(1000):  # until the thread has no batch (each turn lets it finish one)
                if ns.guard.zeroing is None and not ns.pages.freed:
                    break
                await asyncio.sleep(0)
            assert is_filled(store, promoted.slot, 0x5A), f"round {round_}: zeroed under a promotion"
            assert all(is_filled(store, p.slot, 0x77) for p in credit), (
                f"round {round_}: zeroed under a credit"
            )
            assert ns.pages.dirty_free == sum(p.dirty for p in ns.pages.pages if p.prev is not None)
            for page in [*taken, promoted, *credit]:
                ns.free_reserved(page)
        counts = ns.guard.stats()
        assert counts["pages_zeroed"] > 0 and counts["pages_zeroed_inline"] > 0, counts
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        integrity.close()
        store.close()


def test_a_page_retaken_whole_before_zero_after_s_is_never_zeroed_and_others_still_read_zero() -> None:
    """Freed pages wait `zero_after_s` before the thread zeroes them: a put's unzeroed credit
    that takes them meanwhile gets them as they are (its client writes them whole) and nothing
    zeroes them; a taker that does not write them whole still gets zeros (zeroed as taken)."""
    store, integrity, ns = guarded(3600)
    try:
        pages = ns.reserve_many(1, 16)
        for page in pages:
            fill(store, page.slot, 0xA5)
            ns.free_reserved(page)
        assert ns.guard.job(0) is None  # nothing free for an hour: no job, nothing zeroed
        assert ns.pages.dirty_free == 16
        credit = ns.reserve_many(2, 8, overwritten=True)  # the newest freed, dirty
        assert {p.slot for p in credit} <= {p.slot for p in pages}
        assert all(is_filled(store, p.slot, 0xA5) for p in credit)  # as they were: no write spent
        taken = ns.reserve_many(3, len(ns.pages.free))  # the zeroed ones first, then the dirty rest
        assert all(is_zero(store, p.slot) for p in taken)
        counts = ns.guard.stats()
        assert counts["pages_zeroed"] == 0 and counts["pages_zeroed_inline"] == 8, counts
        assert ns.pages.dirty_free == 0
    finally:
        integrity.close()
        store.close()


async def test_the_thread_zeroes_a_freed_page_once_it_has_been_free_for_zero_after_s() -> None:
    store, integrity, ns = guarded(0.2)
    task = asyncio.create_task(integrity.run(lambda: store.namespaces))
    try:
        pages = ns.reserve_many(1, 8)
        for page in pages:
            fill(store, page.slot, 0xA5)
        freed_at = time.monotonic()
        for page in pages:
            ns.free_reserved(page)
        while ns.guard.stats()["pages_zeroed"] < 8:
            assert time.monotonic() - freed_at < 30, "freed pages not zeroed in 30 s"
            await asyncio.sleep(0.01)
        assert time.monotonic() - freed_at >= 0.2  # not before they had been free that long
        assert all(is_zero(store, p.slot) for p in pages)
        assert ns.pages.dirty_free == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        integrity.close()
        store.close()
