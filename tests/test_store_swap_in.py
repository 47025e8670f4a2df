"""SwapIn under pool pressure, in this process over real tiers (tests/store_helpers.py).
It succeeds with every byte back, or fails with ResourceExhausted leaving the sequence
swapped out and the books balanced: a later SwapIn with room succeeds, and Release frees
exactly what the sequence holds."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from store_helpers import T, books, make_store, readers_held, same_bytes, to_device, until, write

from kvstore.errors import ResourceExhausted
from kvstore.store import waits


def test_swap_in_keeps_its_resident_pages_while_making_room(tmp_path: Path) -> None:
    """The sequence's sealed pages are still in the pool, unpinned and the least recently
    used, when SwapIn makes room for its private pages: it must not evict them (the walk
    that follows would find them gone with no room left to bring them back)."""
    store, ns, sid = make_store(tmp_path, host=True, disk=False)
    try:
        a = list(range(1000, 1000 + 6 * T))
        seq = write(store, sid, a, commit=4 * T)  # pages 0-3 sealed; 4, 5 the sequence's own
        pin = store.lookup(sid, "t", a[: 4 * T], b"", True).pin_id  # keep 0-3 in the pool
        assert store.preempt(sid, seq, "swap_out") == (6, 2)
        store.release_pin(sid, pin)
        b = list(range(5000, 5000 + 12 * T))
        store.release_sequence(sid, write(store, sid, b))  # the other 12 pages: newer, unpinned
        assert len(ns.pages.free) == 0 and ns.pages_pinned == 0

        view = asyncio.run(waits.swap_in(store, sid, seq))
        assert [p.index for p in view.pages] == [0, 1, 2, 3, 4, 5]
        assert same_bytes(ns, a, [p.slot for p in view.pages]) == [True] * 6
        assert store.stats("t")[0].evictions == 2  # two of b's pages made the room
        before = books(store, ns)
        r = store.release_sequence(sid, seq)
        assert (r.pages_freed, r.pages_unpinned) == (2, 4)
        after = books(store, ns)
        assert after["free"] == before["free"] + 2 and after["refs"] == {}
    finally:
        store.close()


async def test_swap_in_of_a_static_budget_holds_its_spare_pages_from_the_start(tmp_path: Path) -> None:
    """A static-budget sequence gets its spare pages back with its pages: taken when SwapIn
    makes room, not after it has waited for the disk, when another sequence may have taken
    them (the reserve failed half-way, and a later Release freed pages twice)."""
    store, ns, sid = make_store(tmp_path, host=False, disk=True)
    try:
        a = list(range(300, 300 + 4 * T))
        seq = write(store, sid, a, max_tokens=8 * T)  # 4 pages sealed, 4 spare
        assert store.preempt(sid, seq, "swap_out") == (4, 8)
        await to_device(store, tmp_path)
        with readers_held(store):
            task = asyncio.create_task(waits.swap_in(store, sid, seq))
            await until(lambda: store.tiers.promoting, "the swap-in's promotions to start")
            # Another engine's sequence takes every page still free meanwhile.
            other = store.open_session("other", 60).session_id
            store.allocate(other, "t", len(ns.pages.free) * T, b"")
            with pytest.raises(ResourceExhausted):
                store.allocate(other, "t", T, b"")
        view = await task
        assert same_bytes(ns, a, [p.slot for p in view.pages]) == [True] * 4
        session = store.sessions[sid]
        assert len(session.sequences[seq].spare) == 4
        books(store, ns)
        r = store.release_sequence(sid, seq)
        assert (r.pages_freed, r.pages_unpinned) == (4, 4)
        store.close_session(other)
        assert books(store, ns)["free"] == 16 - 4  # its 4 pages stay cached, unpinned
    finally:
        store.close()


def test_swap_in_without_room_fails_and_changes_nothing(tmp_path: Path) -> None:
    store, ns, sid = make_store(tmp_path, host=True, disk=False)
    try:
        a = list(range(40, 40 + 3 * T + 1))
        seq = write(store, sid, a, commit=2 * T)  # 2 sealed, 1 full unsealed, 1 partial
        pin = store.lookup(sid, "t", a[:T], b"", True).pin_id  # page 0 stays resident
        store.preempt(sid, seq, "swap_out")
        hog = store.allocate(sid, "t", len(ns.pages.free) * T, b"")[0]  # every free page
        before = books(store, ns)
        with pytest.raises(ResourceExhausted, match="swap_in of sequence"):
            asyncio.run(waits.swap_in(store, sid, seq))
        assert books(store, ns) == before
        s = store.sessions[sid].sequences[seq]
        assert s.swapped is not None and s.swap_in is None
        assert store.tiers.swapped_pages == 4

        store.release_sequence(sid, hog)
        view = asyncio.run(waits.swap_in(store, sid, seq))
        assert same_bytes(ns, a, [p.slot for p in view.pages]) == [True] * 4
        assert store.tiers.swapped_pages == 0
        store.release_pin(sid, pin)
        r = store.release_sequence(sid, seq)
        assert (r.pages_freed, r.pages_unpinned) == (2, 2)
        assert books(store, ns) == {"free": 14, "reserved": 0, "refs": {}, "pins": 0}
    finally:
        store.close()


async def test_private_pages_come_back_from_disk_off_the_loop(tmp_path: Path) -> None:
    """A swapped sequence's own (unsealed) pages on disk are read back on the disk tier's
    reader threads: the loop runs other requests meanwhile."""
    store, ns, sid = make_store(tmp_path, host=False, disk=True)
    try:
        a = list(range(70, 70 + 2 * T + 2))
        seq = write(store, sid, a, commit=0)  # nothing sealed: 3 private pages
        store.preempt(sid, seq, "swap_out")
        await to_device(store, tmp_path)
        with readers_held(store):
            task = asyncio.create_task(waits.swap_in(store, sid, seq))
            await until(lambda: store.sessions[sid].sequences[seq].swap_in is not None, "the swap-in")
            assert store.heartbeat(sid) > 0  # the loop serves on while the reads wait
            assert not task.done()
        view = await task
        assert same_bytes(ns, a, [p.slot for p in view.pages]) == [True] * 3
        assert store.release_sequence(sid, seq).pages_freed == 3
        books(store, ns)
    finally:
        store.close()


async def test_release_during_a_swap_in_frees_each_page_once(tmp_path: Path) -> None:
    """Release while the pages come back: the ticket gives back what it holds (a private
    page's slot once its read is over), the sequence's own lists are empty, and the SwapIn
    answers FAILED_PRECONDITION: no page is freed or unreferenced twice."""
    from kvstore.errors import FailedPrecondition

    store, ns, sid = make_store(tmp_path, host=False, disk=True)
    try:
        a = list(range(3000, 3000 + 3 * T + 1))
        seq = write(store, sid, a, commit=2 * T, max_tokens=5 * T)  # 2 sealed, 2 private, 1 spare
        store.preempt(sid, seq, "swap_out")
        await to_device(store, tmp_path)
        with readers_held(store):
            task = asyncio.create_task(waits.swap_in(store, sid, seq))
            await until(lambda: store.sessions[sid].sequences[seq].swap_in is not None, "the swap-in")
            r = store.release_sequence(sid, seq)
            assert (r.pages_freed, r.pages_unpinned) == (0, 0)  # it held nothing of its own yet
            assert ns.pages_reserved == 2 + 2  # promotions, and private reads still in flight
        with pytest.raises(FailedPrecondition, match="released while it was being swapped in"):
            await task
        await until(lambda: not store.tiers.promoting and ns.pages_reserved == 0, "the reads")
        assert books(store, ns) == {"free": 16 - 2, "reserved": 0, "refs": {}, "pins": 0}
        assert store.tiers.swapped_pages == 0
    finally:
        store.close()
