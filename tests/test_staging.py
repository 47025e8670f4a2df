"""The staging arena of device pools (kvstore/memory/staging.py) in its batch forms, through
the fake device: its copies complete only at the wait, like a GPU's, and a buffer read
before the wait holds garbage, so a batch that hands out bytes too early fails here."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvstore.memory.cuda_pool import merged_runs
from kvstore.memory.fake_device import FakeDevicePool
from kvstore.memory.shm_pool import ShmPool
from kvstore.memory.staging import StaleIterator

PAGE = 1000  # (not a power of two: slots and ring offsets must not assume one)


@pytest.fixture
def make_pool() -> Iterator:
    pools: list[FakeDevicePool] = []

    def make(num_pages: int, staging_bytes: int) -> FakeDevicePool:
        pool = FakeDevicePool.create_for("kvtest-staging", "ns", "fake:a", PAGE, num_pages, staging_bytes)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


def page_bytes(i: int, salt: int = 0) -> bytes:
    return bytes((i * 7 + salt + k) % 251 for k in range(PAGE))


def fill(pool: FakeDevicePool, pages: range, salt: int = 0) -> None:
    for i in pages:
        pool.copy_in(i * PAGE, PAGE)[:] = page_bytes(i, salt)
    pool.landed_many([i * PAGE for i in pages])


def read_all(pool: FakeDevicePool, pages: range | list[int]) -> list[bytes]:
    return [bytes(v) for v in pool.copy_out_many([i * PAGE for i in pages], PAGE)]


def test_many_pages_go_out_and_back_through_an_arena_smaller_than_the_batch(make_pool) -> None:
    # 16 KiB: a ring of two 2 KiB halves (2 pages a chunk), 12 slots for 40 pages staged
    pool = make_pool(40, 16 << 10)
    fill(pool, range(40))
    assert pool.staged == 0 and pool.staged_unpinned == 28 and pool.free_slots == 12
    assert read_all(pool, range(40)) == [page_bytes(i) for i in range(40)]
    assert read_all(pool, [39, 0, 17, 18]) == [page_bytes(i) for i in (39, 0, 17, 18)]
    fill(pool, range(40), salt=1)  # slots reused after the landing waited
    assert read_all(pool, range(40)) == [page_bytes(i, 1) for i in range(40)]


def test_a_page_larger_than_half_the_ring_is_copied_alone(make_pool) -> None:
    pool = make_pool(6, 4096)  # a 512-byte half: no page fits
    fill(pool, range(6))
    assert read_all(pool, range(6)) == [page_bytes(i) for i in range(6)]
    assert pool.copy_out(PAGE, PAGE) == page_bytes(1)


def test_a_staged_page_reads_as_its_staged_bytes_until_it_lands(make_pool) -> None:
    pool = make_pool(8, 16 << 10)
    fill(pool, range(8))
    pool.copy_in(3 * PAGE, PAGE)[:] = page_bytes(3, salt=5)
    assert read_all(pool, range(8)) == [page_bytes(i, 5 if i == 3 else 0) for i in range(8)]
    assert pool.copy_out(3 * PAGE, PAGE) == page_bytes(3, 5)
    pool.landed_many([3 * PAGE, 4 * PAGE])  # (4 has nothing staged: nothing to push)
    assert pool.staged == 0 and read_all(pool, [3, 4]) == [page_bytes(3, 5), page_bytes(4)]


def test_a_dropped_page_frees_its_slot_and_never_reaches_the_device(make_pool) -> None:
    pool = make_pool(4, 8192)  # 6 slots
    fill(pool, range(4))
    slots = pool.free_slots
    pool.copy_in(0, PAGE)[:] = b"\x01" * PAGE
    assert pool.free_slots == slots - 1
    pool.dropped(0)
    assert pool.free_slots == slots and pool.staged == 0
    pool.copy_in(PAGE, PAGE)[:] = b"\x02" * PAGE  # (the slot page 0 had)
    pool.landed(PAGE)
    assert read_all(pool, [0, 1]) == [page_bytes(0), b"\x02" * PAGE]


def test_an_iterator_is_refused_once_a_later_copy_reused_its_buffers(make_pool) -> None:
    pool = make_pool(20, 16 << 10)
    fill(pool, range(20))
    it = pool.copy_out_many([i * PAGE for i in range(20)], PAGE)
    assert bytes(next(it)) == page_bytes(0)
    assert pool.copy_out(5 * PAGE, PAGE) == page_bytes(5)
    with pytest.raises(StaleIterator):
        next(it)
    assert read_all(pool, range(20)) == [page_bytes(i) for i in range(20)]  # a new one is fine


def test_shared_memory_pools_copy_out_many_in_place() -> None:
    pool = ShmPool.create_for("kvtest-staging", "ns", 4 * PAGE)
    try:
        pool.mapping[PAGE : 2 * PAGE] = page_bytes(1)
        views = list(pool.copy_out_many([PAGE, 0], PAGE))
        assert bytes(views[0]) == page_bytes(1) and bytes(views[1]) == bytes(PAGE)
        pool.landed_many([0, PAGE])  # (nothing staged: a no-op)
        del views
    finally:
        pool.close()


def test_copies_next_to_each_other_in_both_places_merge() -> None:
    copies = [(100, 0, 10), (110, 10, 10), (120, 30, 10), (0, 40, 5), (5, 45, 5)]
    assert list(merged_runs(copies)) == [(100, 0, 20), (120, 30, 10), (0, 40, 10)]
    assert list(merged_runs([])) == []
    pages = [(i * 10, 1000 + i * 10, 10) for i in range(7)]  # one run, cut at 30 bytes
    assert list(merged_runs(pages, max_run=30)) == [(0, 1000, 30), (30, 1030, 30), (60, 1060, 10)]


def test_the_fake_device_hands_out_no_bytes_before_the_wait(make_pool) -> None:
    """The guard the other tests rely on: a copy out only started reads as garbage."""
    pool = make_pool(2, 16 << 10)
    fill(pool, range(2))
    view = pool._ring[:PAGE]
    pool._to_host_async([(0, view)])
    assert bytes(view) != page_bytes(0)
    pool._wait()
    assert bytes(view) == page_bytes(0)
