"""The host tier: daemon-owned DRAM slabs, LRU victims, verification on every read."""

from __future__ import annotations

import os

import pytest

from kvstore.tiers import CorruptPage, HostFull, HostTier, PageKey, PageRecord, make_meta

PAGE = 64 << 10


def rec(i: int, size: int = PAGE, ns: str = "ns", parent: bytes = b"") -> PageRecord:
    meta = make_meta(ns, i.to_bytes(16, "little"), parent, 16, size, "geom-a")
    return PageRecord.build(meta, os.urandom(size))


def test_round_trip_is_byte_identical() -> None:
    host = HostTier(1 << 20)
    r = rec(1)
    assert host.put(r)
    assert r.key in host and len(host) == 1
    assert host.get(r.key) == bytes(r.payload)
    out = bytearray(PAGE)
    meta = host.read_into(r.key, out)
    assert meta == r.meta and out == r.payload
    assert host.get(PageKey("ns", bytes(16))) is None
    s = host.stats()
    assert (s["pages"], s["bytes_used"], s["hits"], s["misses"]) == (1, PAGE, 2, 1)


def test_put_copies_the_payload() -> None:
    host = HostTier(1 << 20)
    buf = bytearray(os.urandom(PAGE))
    r = PageRecord.build(make_meta("ns", bytes(16), b"", 16, PAGE, "g"), buf)
    host.put(r)
    expected = bytes(buf)
    buf[:] = bytes(PAGE)  # the caller reuses its buffer (a pool slot) right away
    assert host.get(r.key) == expected


def test_put_of_a_present_key_keeps_the_first_copy() -> None:
    host = HostTier(1 << 20)
    r = rec(1)
    host.put(r)
    assert not host.put(rec(1))
    assert host.get(r.key) == bytes(r.payload)


def test_full_raises_and_victims_are_lru_first() -> None:
    host = HostTier(4 * PAGE, slab_bytes=2 * PAGE)
    rs = [rec(i) for i in range(4)]
    for r in rs:
        host.put(r)
    assert not host.has_room(PAGE)
    with pytest.raises(HostFull, match="host tier full"):
        host.put(rec(9))
    host.get(rs[0].key)  # now most recently used
    assert host.keys() == [rs[1].key, rs[2].key, rs[3].key, rs[0].key]
    assert host.victims(2, PAGE) == [rs[1].key, rs[2].key]
    moved = host.take(rs[1].key)
    assert moved is not None and moved.checksum == rs[1].checksum and bytes(moved.payload) == rs[1].payload
    assert rs[1].key not in host
    host.put(rec(9))
    assert len(host) == 4 and host.stats()["bytes_used"] == 4 * PAGE


def test_empty_slabs_go_back_to_any_size() -> None:
    host = HostTier(4 * PAGE, slab_bytes=2 * PAGE)
    small = [rec(i) for i in range(4)]
    for r in small:
        host.put(r)
    big = rec(100, size=2 * PAGE)
    assert not host.has_room(2 * PAGE)
    # Only same-size pages would free a slot, but there are none of 2*PAGE: oldest overall.
    assert host.victims(2, 2 * PAGE) == [small[0].key, small[1].key]
    host.remove(small[0].key)
    assert not host.has_room(2 * PAGE)  # half a slab free is no room for a bigger page
    host.remove(small[1].key)  # that slab is empty now: unmapped, its bytes free again
    assert host.stats()["slab_bytes"] == 2 * PAGE
    host.put(big)
    assert host.get(big.key) == bytes(big.payload)
    assert host.get(small[3].key) == bytes(small[3].payload)


def test_corrupt_slot_is_reported_dropped_and_counted() -> None:
    host = HostTier(1 << 20)
    r = rec(1)
    host.put(r)
    entry = host._entries[r.key]
    entry.slab.slot(entry.slot)[100] ^= 0xFF  # a flipped bit in DRAM
    out = bytearray(PAGE)
    with pytest.raises(CorruptPage) as err:
        host.read_into(r.key, out)
    assert err.value.key == r.key
    assert r.key not in host and host.stats()["corrupt"] == 1
    assert host.get(r.key) is None


def test_wrong_buffer_size_is_refused() -> None:
    host = HostTier(1 << 20)
    r = rec(1)
    host.put(r)
    with pytest.raises(ValueError, match="bytes"):
        host.read_into(r.key, bytearray(PAGE - 1))


def test_clear_unmaps_everything() -> None:
    host = HostTier(8 * PAGE, slab_bytes=2 * PAGE)
    for i in range(5):
        host.put(rec(i))
    host.clear()
    assert len(host) == 0 and host.stats()["slab_bytes"] == 0 and host.stats()["bytes_used"] == 0


def test_pages_of_another_size_find_room_while_one_size_holds_under_an_eighth_of_the_tier() -> None:
    """A quantized namespace's records come in a few sizes (a first page's sinks, layers over
    the error bound). One size class must not take a whole small tier in one slab: then a
    record of another size found room only by emptying that slab, page after page."""
    host = HostTier(64 * PAGE)  # default slab_bytes (32 MiB) is far larger than the tier
    for i in range(4):
        host.put(rec(i))
    assert host.stats()["slab_bytes"] <= 8 * PAGE  # a slab is at most an eighth of the tier
    odd = rec(100, size=PAGE + 5000)  # rounded up to a 4 KiB slot of its own class
    assert host.has_room(odd.meta.page_bytes)
    host.put(odd)
    assert len(host) == 5 and host.get(odd.key) == bytes(odd.payload)
    assert host.stats()["bytes_used"] == 4 * PAGE + PAGE + 5000
    # Payloads of sizes that round to the same 4 KiB slot share a class.
    near = rec(101, size=PAGE + 4000)
    host.put(near)
    assert host.get(near.key) == bytes(near.payload) and len(host) == 6


def test_a_namespaces_own_victims_and_bytes_for_its_tier_share() -> None:
    """victims_of: one namespace's pages in LRU order, never another's nor its swapped
    sequences' (keyed "<ns>\\x00swap", counted in its owned bytes all the same)."""
    host = HostTier(1 << 20)
    a = [rec(i, ns="a") for i in range(3)]
    b = [rec(10 + i, ns="b") for i in range(3)]
    swap = rec(20, ns="a\x00swap")
    for r in (b[0], a[0], b[1], a[1], swap, b[2], a[2]):
        host.put(r)
    host.get(a[0].key)  # most recently used of a's
    assert host.victims_of("a", 8) == [a[1].key, a[2].key, a[0].key]
    assert host.victims_of("b", 2) == [b[0].key, b[1].key]
    assert (host.owned_bytes("a"), host.owned_bytes("b")) == (4 * PAGE, 3 * PAGE)
    host.remove(a[1].key)
    host.take(swap.key)
    assert host.victims_of("a", 8) == [a[2].key, a[0].key] and host.owned_bytes("a") == 2 * PAGE
    for r in a:
        host.remove(r.key)
    assert host.victims_of("a", 8) == [] and host.owned_bytes("a") == 0
    assert host.owned_bytes("b") == 3 * PAGE
