"""The integrity work on a put's path (kvstore/store/zero_later.py, integrity.py). A Put whose
next credit takes pages it just evicted (a full pool) zeroes them off the loop and answers
only once they are zero: the loop zeroes nothing inline, the credit's slots read zero from
another reader as soon as the reply is in, and the puts into those credits store the right
bytes; pages freed and taken again while such a job runs are never handed out dirty. The
scrubber does not spend a quiet spell's saved rate in one burst over the puts after it. The
integrity task stops when cancelled, even as a Put wakes it.
The real daemon with its integrity on (one part in process: a real Store and Integrity)."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from functools import partial
from typing import Any

import kvstore_client
import numpy as np
from e2e_helpers import prompt, read_page, wait_until

from kvstore.store import page_sums, zero_later
from kvstore.store.integrity import Integrity, IntegrityConfig
from kvstore.store.store import Store
from kvstore.store.types import NamespaceSpec, StoreLimits

NS = "test"  # tests/daemon.py: 4 tokens a page, 64 pages of 1 KiB: a credit is at most 8
T = 4
PAGES = 8


def test_a_puts_credit_of_evicted_pages_is_zeroed_before_its_reply_not_on_the_loop(
    daemon, monkeypatch
) -> None:
    """A client that asks for zeroed credits (`KVSTORE_UNZEROED_CREDITS=0`)."""
    monkeypatch.setattr(kvstore_client._put, "ASK_UNZEROED", False)
    with kvstore_client.connect(daemon.target, client_name="zero-later") as kv:
        ns = kv.namespace(NS)
        size = ns.pool.page_bytes
        data = np.full(PAGES * size, 0xA5, dtype=np.uint8)
        prompts = [prompt(PAGES * T, seed=100 + i) for i in range(12)]  # 96 pages: the pool fills
        for tokens in prompts:
            kv.put(NS, tokens, data)
            (credit,) = kv._credits._held[NS]  # the credit this put's reply granted
            assert len(credit.slots) == PAGES
            for slot in credit.slots:  # read through the pool's fd, right after the reply
                assert read_page(daemon.target, NS, slot) == bytes(size), f"credit slot {slot} not zero"
        s = kv.stats(NS).namespaces[0]
        assert s.evictions >= 3 * PAGES, "the later credits took pages their put evicted"
        assert s.pages_zeroed_inline == 0, "no page was zeroed on the loop"
        assert s.pages_zeroed >= 3 * PAGES
        out = np.zeros(PAGES * size, dtype=np.uint8)
        assert kv.get(NS, prompts[-1], out).pages == PAGES
        assert (out == 0xA5).all()


def _store() -> tuple[Store, Integrity, Any]:
    """A real Store with a memfd pool of 48 pages of 256 KiB and its Integrity (no scrubber)."""
    store = Store(StoreLimits(), shm_prefix=f"kvtest-zl-{uuid.uuid4().hex[:12]}-")
    integrity = Integrity(IntegrityConfig(scrub_bytes_per_s=0, zero_after_s=0), lambda: store.sessions)
    store.attach = integrity.attach
    store.create_namespace(NamespaceSpec("ns", 4, 2, 1024, "float16", 16, 48))
    return store, integrity, store.namespaces["ns"]


def _fill(ns: Any, slot: int, value: int) -> None:
    v = ns.page_view(slot)
    np.frombuffer(v, dtype=np.uint8).fill(value)
    v.release()  # (a view left alive keeps the pool's mapping from closing)


def _filled(ns: Any, slot: int, value: int) -> bool:
    v = ns.page_view(slot)
    arr = np.frombuffer(v, dtype=np.uint8)
    ok = bool((arr == value).all())
    del arr
    v.release()
    return ok


async def test_pages_freed_and_taken_again_while_zeroed_off_the_loop_are_never_handed_out_dirty() -> None:
    """In process (a real Store, memfd pool and Integrity on a running loop): pages a call
    defers are freed and taken again before their job ends, by a plain take (waits for the
    job), a promotion (waits, then keeps what it writes) and another deferring call."""
    store, integrity, ns = _store()
    fill, filled = partial(_fill, ns), partial(_filled, ns)
    try:
        for round_ in range(6):
            pages = ns.reserve_many(1, len(ns.pages.free))
            for page in pages:
                fill(page.slot, 0xA5)
            for page in pages:
                ns.free_reserved(page)  # dirty, not zeroed yet: nothing ran the integrity task
            with zero_later.deferred() as jobs:
                taken = ns.reserve_many(2, 16)
            assert jobs and all(p.dirty and p.zeroing is not None for p in taken)
            for page in taken:
                ns.free_reserved(page)
            if round_ % 3 == 0:
                again = ns.reserve_many(3, len(ns.pages.free))  # on the loop: waits for the jobs
            elif round_ % 3 == 1:
                again = [ns.reserve(3, overwritten=True) for _ in range(16)]
                for page in again:
                    fill(page.slot, 0x5A)
            else:
                with zero_later.deferred() as more:
                    again = ns.reserve_many(3, len(ns.pages.free))
                await zero_later.settle(more)
            await zero_later.settle(jobs)
            for page in again:
                want = 0x5A if round_ % 3 == 1 else 0
                assert not page.dirty and filled(page.slot, want), (round_, page.slot)
            for page in again:
                ns.free_reserved(page)
        assert ns.guard.stats()["pages_zeroed"] > 0
    finally:
        integrity.close()
        store.close()


async def test_a_put_taking_pages_the_threads_batch_is_zeroing_leaves_the_wait_to_its_reply() -> None:
    """The loop used to wait for the integrity thread's whole batch (up to 32 MiB) when a call
    took one of its pages; within a Put's deferral the reply waits for it instead."""
    store, integrity, ns = _store()
    task = asyncio.create_task(integrity.run(lambda: store.namespaces))
    try:
        batch = await _all_freed_and_a_batch(integrity, ns)
        with zero_later.deferred() as jobs:
            taken = ns.reserve_many(2, len(ns.pages.free))
        held = [p for p in taken if p.zeroing is batch]
        assert held, "the call took pages of the thread's batch without waiting for it on the loop"
        assert any(job is batch for _, job, _ in jobs), "its reply waits for that batch"
        await zero_later.settle(jobs)
        assert all(not p.dirty and _filled(ns, p.slot, 0) for p in taken)
    finally:
        await _stop(task, integrity, store)


async def _all_freed_and_a_batch(integrity: Integrity, ns: Any) -> Any:
    """Fill and free every free page of `ns` (dirty), then run the integrity task (`task`
    running `integrity.run`) until its thread's job holds some of them: that job's batch."""
    pages = ns.reserve_many(1, len(ns.pages.free))
    for page in pages:
        _fill(ns, page.slot, 0xA5)
    for page in pages:
        ns.free_reserved(page)
    for _ in range(1000):  # (each turn runs the task a step)
        if ns.guard.zeroing is not None:
            break
        integrity.kick()  # (a no-op until the task has started)
        await asyncio.sleep(0)
    assert ns.guard.zeroing is not None
    return ns.guard.zeroing


async def _stop(task: asyncio.Task[None], integrity: Integrity, store: Store) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    integrity.close()
    store.close()


def test_the_scrubber_does_not_spend_a_quiet_spells_saved_rate_in_one_burst(daemon_factory) -> None:
    """An idle daemon with nothing sealed saves up to 1 s of scrub rate; the puts after it
    (each waking the integrity task) get the scrubber at most once a tick, two ticks' worth
    at a time: not 1 s of reads at once in their midst."""
    rate = 64 << 10  # 64 pages of 1 KiB a second: two ticks (0.1 s) are 6 pages
    daemon = daemon_factory(server={"scrub_bytes_per_s": rate}).start()
    with kvstore_client.connect(daemon.target, client_name="quiet") as kv:
        ns = kv.namespace(NS)
        data = np.full(4 * ns.pool.page_bytes, 7, dtype=np.uint8)
        time.sleep(1.2)  # (the quiet spell itself: nothing to wait on but time)
        start = time.monotonic()
        for i in range(10):
            kv.put(NS, prompt(4 * T, seed=300 + i), data)  # 40 pages sealed, 10 wake-ups
        while time.monotonic() - start < 10:  # (sealed pages get a checksum: the put's own, or taken)
            s = kv.stats(NS).namespaces[0]
            if s.pages_checksummed + s.pages_sums_given >= 40:
                break
        scrubbed = kv.stats(NS).namespaces[0].pages_scrubbed
        ticks = (time.monotonic() - start) / 0.05
        assert scrubbed <= 6 * (ticks + 2), f"{scrubbed} pages scrubbed in {ticks:.1f} ticks"


def _nice(pid: int, tid: str) -> int:
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        stat = f.read()
    return int(stat.rsplit(")", 1)[1].split()[16])  # (field 19, after the command's parentheses)


def test_the_integrity_thread_runs_below_the_daemons_other_threads(daemon) -> None:
    """Its work can wait; a call's threads and the clients' copies on the same cores cannot."""
    from kvstore.store.integrity_jobs import BACKGROUND_NICE

    with kvstore_client.connect(daemon.target, client_name="nice") as kv:
        ns = kv.namespace(NS)
        kv.put(NS, prompt(2 * T, seed=400), np.ones(2 * ns.pool.page_bytes, dtype=np.uint8))
        wait_until(
            lambda: kv.stats(NS).namespaces[0].pages_checksummed,
            lambda n: n >= 2,
            timeout=10,
            what="checksums",
        )
    assert daemon.proc is not None
    pid = daemon.proc.pid
    main = _nice(pid, str(pid))
    nices = [_nice(pid, tid) for tid in os.listdir(f"/proc/{pid}/task")]
    assert nices.count(min(19, main + BACKGROUND_NICE)) == 1, nices
    assert all(n in (main, min(19, main + BACKGROUND_NICE)) for n in nices), nices


async def test_the_integrity_task_stops_when_cancelled_as_a_put_wakes_it() -> None:
    """Every Put wakes the task (kick); on Python 3.11 asyncio.wait_for swallowed a cancel
    arriving in the same loop step as the wake, so the task ran on and a close awaiting it
    waited out its timeout (a test awaiting it hung)."""
    store, integrity, _ = _store()
    task = asyncio.create_task(integrity.run(lambda: store.namespaces))
    try:
        for _ in range(3):  # (the task creates its wake event and waits on it)
            await asyncio.sleep(0)
        assert integrity._wake is not None and not task.done()
        integrity.kick()
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=2.0)
        assert task in done and task.cancelled(), "the cancelled task ran on"
    finally:
        if not task.done():  # (a second cancel, not racing a wake, stops it)
            task.cancel()
            await asyncio.wait([task], timeout=2.0)
        integrity.close()
        store.close()


async def test_seals_a_few_milliseconds_apart_are_checksummed_in_one_job() -> None:
    """Every Put's seal woke the integrity task at once: one checksum job a Put, each ~70 us
    of the loop's time whatever its size (the wake, the executor's hand-off, its callback).
    Seals within SEAL_WAKE_S of the first now share one job, which still comes by itself (no
    other wake) and checksums every page's own bytes."""
    store, integrity, ns = _store()
    task = asyncio.create_task(integrity.run(lambda: store.namespaces))
    try:
        for _ in range(3):  # (the task creates its wake event and waits on it)
            await asyncio.sleep(0)
        pages = ns.reserve_many(1, 6)
        for i, page in enumerate(pages):
            _fill(ns, page.slot, i + 1)
        before = integrity.jobs
        for page in pages:  # one Put's seal each (Namespace.seal hands its pages to the guard)
            ns.guard.sealed([page], 1)
            for _ in range(20):  # (loop turns: enough for the task to run a job, as it did)
                await asyncio.sleep(0)
        deadline = time.monotonic() + 10
        while not all(type(p.checksum) is int for p in pages) and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        for page in pages:
            view = ns.page_view(page.slot)
            assert page.checksum == page_sums.checksum(view), f"slot {page.slot}"
            view.release()
        # (two if the loop lost the core for longer than SEAL_WAKE_S between two seals)
        assert integrity.jobs - before <= 2, f"{integrity.jobs - before} jobs for {len(pages)} seals"
    finally:
        await _stop(task, integrity, store)
