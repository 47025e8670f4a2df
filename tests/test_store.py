"""The Store in-process (no daemon): sessions, sequences, pins, lookup, commit,
eviction and input checks, with exact expectations on the effects (stats
counters, page states, slots, free list)."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import uuid
from pathlib import Path

import pytest

from kvstore.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
)
from kvstore.hashing import block_hashes, namespace_salt
from kvstore.memory.pages import PageState
from kvstore.store.store import Store
from kvstore.store.types import NamespaceSpec, PageRef, StoreLimits

SHM = Path("/dev/shm")
T = 2  # tokens per page in the default namespace
PAGES = 8
TTL = 10.0
LIMITS = StoreLimits(
    max_request_tokens=64,
    max_pool_bytes=1 << 20,
    lease_ttl_default_s=TTL,
    lease_ttl_max_s=60.0,
    max_sessions=4,
    max_extra_keys_bytes=16,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_spec(name: str = "ns", **kw) -> NamespaceSpec:
    fields = dict(
        name=name,
        num_layers=1,
        num_kv_heads=1,
        head_dim=8,
        dtype="float16",
        page_tokens=T,
        num_pages=PAGES,
        vocab_size=100,
    )
    fields.update(kw)
    return NamespaceSpec(**fields)


PAGE_BYTES = make_spec().page_bytes  # 1 layer * (K,V) * 2 tokens * 1 head * 8 dims * 2 bytes = 64


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def prefix() -> str:
    return f"kvtest-store-{uuid.uuid4().hex[:12]}-"


@pytest.fixture
def bare_store(clock, prefix):
    """A store with no namespace; teardown proves no segment is left in /dev/shm."""
    s = Store(LIMITS, shm_prefix=prefix, clock=clock)
    try:
        yield s
    finally:
        try:
            s.close()
        finally:
            for ns in s.namespaces.values():  # even if a broken store failed to close
                ns.pool.close()
    left = sorted(p.name for p in SHM.glob(prefix + "*"))
    assert not left, f"segments left in /dev/shm: {left}"


@pytest.fixture
def store(bare_store):
    """A store with namespace 'ns': 8 pages of 2 tokens, vocab 100."""
    bare_store.create_namespace(make_spec())
    return bare_store


@pytest.fixture
def sid(store) -> int:
    return store.open_session("test", 0).session_id


# ------------------------------------------------------------------ helpers


def stats(store: Store, ns: str = "ns") -> dict:
    return dataclasses.asdict(store.stats(ns)[0])


def hashes(store: Store, tokens: list[int], extra: bytes = b"", ns: str = "ns") -> list[bytes]:
    spec = store.namespaces[ns].spec
    return block_hashes(namespace_salt(spec.name, spec.salt), tokens, spec.page_tokens, extra)


def resident(store: Store, tokens: list[int], extra: bytes = b"", ns: str = "ns") -> int:
    """Leading pages of `tokens` in the index, read without touching recency."""
    n = 0
    for h in hashes(store, tokens, extra, ns):
        if store.namespaces[ns].index.get(h) is None:
            break
        n += 1
    return n


def page(store: Store, slot: int, ns: str = "ns"):
    return store.namespaces[ns].pages.pages[slot]


def free_list_len(store: Store, ns: str = "ns") -> int:
    return len(store.namespaces[ns].pages.free)


def slots_of(store: Store, sid: int, seq: int) -> list[int]:
    return [r.slot for r in store.sequence_view(sid, seq).pages]


def write(store: Store, sid: int, tokens: list[int], extra: bytes = b"", ns: str = "ns") -> list[int]:
    """Append, commit and release: the pages stay sealed and unpinned. Returns their slots."""
    seq, _ = store.allocate(sid, ns, 0, extra)
    store.append(sid, seq, tokens)
    store.commit(sid, seq, len(tokens))
    slots = slots_of(store, sid, seq)
    store.release_sequence(sid, seq)
    return slots


def state_of(store: Store, slot: int) -> PageState:
    return page(store, slot).state


# ------------------------------------------------------------------ namespace and pool


def test_create_namespace_makes_a_private_sealed_memfd(bare_store, prefix):
    info = bare_store.create_namespace(make_spec())
    handle = info.pool.handle
    assert handle.name == f"{prefix}{handle.epoch:016x}.ns"  # a memfd's name, for operators
    assert list(SHM.glob(prefix + "*")) == []  # no file anywhere: only descriptors reach it
    pool = bare_store.namespaces["ns"].pool
    fd = pool.open_fd(False)
    try:
        assert os.readlink(f"/proc/self/fd/{fd}") == f"/memfd:{handle.name} (deleted)"
        assert os.fstat(fd).st_size == PAGES * 4096 == handle.nbytes
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SEAL
    finally:
        os.close(fd)
    assert info.pool.page_bytes == PAGE_BYTES == 64
    assert info.pool.page_stride == 4096
    assert info.pool.page_shape == (1, 2, T, 1, 8)
    assert stats(bare_store) == {
        "name": "ns",
        "policy": "lru",
        "page_bytes": 64,
        "pages_total": PAGES,
        "pages_free": PAGES,
        "pages_reserved": 0,
        "pages_sealed": 0,
        "pages_pinned": 0,
        "sequences": 0,
        "hit_tokens": 0,
        "miss_tokens": 0,
        "lookups": 0,
        "evictions": 0,
        "deduplicated_pages": 0,
        "budget_dropped_pages": 0,
        "pages_quarantined": 0,
        "pages_free_unzeroed": 0,
        "max_session_pages": 0,
        "session_pages_refused": 0,
        "tier_share": 0.0,  # (no share of the tiers, and no tiers: tiering/shares.py)
        "share_evictions": 0,
        "host_bytes": 0,
        "disk_bytes": 0,
        "committed_bytes": 0,
        "hit_bytes": 0,
        "pages_checksummed": 0,
        "pages_scrubbed": 0,
        "pages_corrupt": 0,
        "copies_refused": 0,
        "pages_zeroed": 0,
        "pages_zeroed_inline": 0,
        "pages_unchecked": 0,
        "replies_waited_zeroing": 0,
        "pages_sums_given": 0,
        "extra": {},
    }
    bare_store.close()
    with pytest.raises(OSError, match="closed"):
        pool.open_fd(False)
    bare_store.close()  # idempotent


def test_duplicate_namespace_already_exists_and_keeps_the_first(store, prefix):
    before = stats(store)
    with pytest.raises(AlreadyExists, match="'ns'"):
        store.create_namespace(make_spec(num_pages=4))
    assert stats(store) == before
    assert list(SHM.glob(prefix + "*")) == []


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"name": ""}, "name=''"),
        ({"name": "a b"}, "name='a b'"),
        ({"name": "x" * 65}, "name="),
        ({"num_layers": 0}, "num_layers=0"),
        ({"num_kv_heads": -1}, "num_kv_heads=-1"),
        ({"head_dim": 0}, "head_dim=0"),
        ({"page_tokens": 0}, "page_tokens=0"),
        ({"page_tokens": 70000}, "page_tokens=70000"),
        ({"num_pages": 0}, "num_pages=0"),
        ({"dtype": "float64"}, "dtype='float64'"),
        ({"vocab_size": -1}, "vocab_size=-1"),
        ({"policy": "mru"}, "policy='mru'"),
        ({"num_pages": 1000}, "max_pool_bytes=1048576"),
    ],
)
def test_bad_namespace_spec_names_the_field(bare_store, prefix, kw, needle):
    with pytest.raises(InvalidArgument) as e:
        bare_store.create_namespace(make_spec(**kw))
    assert needle in str(e.value)
    assert bare_store.namespaces == {}
    assert not list(SHM.glob(prefix + "*"))  # nothing was created


def test_unknown_namespace_not_found_names_it(store, sid):
    before = stats(store)
    for call in (
        lambda: store.allocate(sid, "nope", 0, b""),
        lambda: store.lookup(sid, "nope", [1, 2], b"", False),
        lambda: store.evict_all("nope"),
        lambda: store.evict_bytes("nope", 1),
        lambda: store.evict_prefix("nope", [1, 2], b""),
        lambda: store.stats("nope"),
    ):
        with pytest.raises(NotFound, match=r"namespace 'nope' does not exist; known: ns"):
            call()
    assert stats(store) == before
    assert store.session_infos()[0].sequences == 0


# ------------------------------------------------------------------ append, commit, lookup


def test_append_commit_lookup(store, sid):
    seq, reserved = store.allocate(sid, "ns", 0, b"")
    assert reserved == 0
    h = hashes(store, [1, 2, 3, 4, 5, 6])

    r = store.append(sid, seq, [1, 2, 3, 4, 5])
    assert r.num_tokens == 5 and r.cached_tokens == 0
    assert [(p.index, p.cached, p.token_start, p.token_count, p.block_hash) for p in r.pages] == [
        (0, False, 0, 2, h[0]),
        (1, False, 0, 2, h[1]),
        (2, False, 0, 1, b""),  # partial: no hash yet
    ]
    assert [p.slot for p in r.pages] == [0, 1, 2]  # FIFO free list
    assert all(state_of(store, s) is PageState.RESERVED for s in (0, 1, 2))
    s = stats(store)
    assert (s["pages_free"], s["pages_reserved"], s["pages_sealed"], s["sequences"]) == (5, 3, 0, 1)
    assert free_list_len(store) == 5

    # Full but uncommitted pages are invisible.
    assert store.lookup(sid, "ns", [1, 2, 3, 4, 5], b"", False).hit_tokens == 0

    c = store.commit(sid, seq, 5)
    assert (c.sealed_pages, c.deduplicated_pages, c.moved) == (2, 0, [])
    s = stats(store)
    assert (s["pages_free"], s["pages_reserved"], s["pages_sealed"], s["pages_pinned"]) == (5, 1, 2, 2)
    assert state_of(store, 0) is PageState.SEALED and page(store, 0).refcount == 1
    assert state_of(store, 2) is PageState.RESERVED  # the partial page stays writable

    look = store.lookup(sid, "ns", [1, 2, 3, 4, 5], b"", False)
    assert look.hit_tokens == 4 and look.pin_id == 0
    assert (look.slots, look.block_hashes) == ([0, 1], [h[0], h[1]])

    # Filling the partial page gives it its hash, but it stays invisible until committed.
    r = store.append(sid, seq, [6])
    assert r.pages == [PageRef(2, 2, False, 1, 1, h[2])]
    assert store.lookup(sid, "ns", [1, 2, 3, 4, 5, 6], b"", False).hit_tokens == 4
    assert store.commit(sid, seq, 6).sealed_pages == 1
    assert store.lookup(sid, "ns", [1, 2, 3, 4, 5, 6], b"", False).hit_tokens == 6
    assert store.lookup(sid, "ns", [1, 2, 3, 9], b"", False).hit_tokens == 2
    assert store.lookup(sid, "ns", [9, 2, 3, 4], b"", False).hit_tokens == 0
    assert store.lookup(sid, "ns", [1, 2, 3, 4], b"lora", False).hit_tokens == 0  # extra_keys differ

    s = stats(store)
    assert s["lookups"] == 7
    assert s["hit_tokens"] == 0 + 4 + 4 + 6 + 2 + 0 + 0
    assert s["miss_tokens"] == 5 + 1 + 2 + 0 + 2 + 4 + 4
    assert (s["pages_reserved"], s["pages_sealed"], s["pages_pinned"]) == (0, 3, 3)

    view = store.sequence_view(sid, seq)
    assert (view.namespace, view.num_tokens, view.committed_tokens) == ("ns", 6, 6)
    assert [p.cached for p in view.pages] == [True, True, True]


def test_partial_commit_seals_only_full_pages(store, sid):
    seq, _ = store.allocate(sid, "ns", 0, b"")
    store.append(sid, seq, [1, 2, 3, 4, 5, 6])
    assert store.commit(sid, seq, 3).sealed_pages == 1  # page 0 only; page 1 has 1 of 2 written
    assert store.lookup(sid, "ns", [1, 2, 3, 4, 5, 6], b"", False).hit_tokens == 2
    assert store.commit(sid, seq, 2).sealed_pages == 0  # going back is a no-op
    assert store.commit(sid, seq, 6).sealed_pages == 2
    assert store.sequence_view(sid, seq).committed_tokens == 6
    assert store.commit(sid, seq, 6).sealed_pages == 0


def test_commit_accepts_own_written_slots(store, sid):
    seq, _ = store.allocate(sid, "ns", 0, b"")
    r = store.append(sid, seq, [1, 2, 3, 4])
    c = store.commit(sid, seq, 4, [p.slot for p in r.pages])
    assert c.sealed_pages == 2
    # Once sealed, a page is no longer writable: naming it again is refused.
    with pytest.raises(PermissionDenied, match=f"slot {r.pages[0].slot}"):
        store.commit(sid, seq, 4, [r.pages[0].slot])


def test_shared_prefix_reuses_sealed_pages(store, sid):
    a, _ = store.allocate(sid, "ns", 0, b"")
    store.append(sid, a, [1, 2, 3, 4, 5, 6])
    store.commit(sid, a, 6)
    a_slots = slots_of(store, sid, a)
    before = stats(store)

    b, _ = store.allocate(sid, "ns", 0, b"")
    r = store.append(sid, b, [1, 2, 3, 4, 9])
    assert r.cached_tokens == 4
    assert [(p.slot, p.cached) for p in r.pages[:2]] == [(a_slots[0], True), (a_slots[1], True)]
    assert r.pages[2].cached is False and r.pages[2].slot not in a_slots
    after = stats(store)
    assert after["pages_sealed"] == before["pages_sealed"] == 3
    assert after["pages_reserved"] == 1  # only b's partial page
    assert after["pages_free"] == before["pages_free"] - 1
    assert [page(store, s).refcount for s in a_slots] == [2, 2, 1]
    assert store.commit(sid, b, 5).sealed_pages == 0  # nothing of b's own is full yet

    rel = store.release_sequence(sid, a)
    assert (rel.pages_freed, rel.pages_unpinned) == (0, 3)
    assert [page(store, s).refcount for s in a_slots] == [1, 1, 0]
    s = stats(store)
    assert (s["pages_pinned"], s["pages_sealed"], s["sequences"]) == (2, 3, 1)


def test_cache_hit_across_appends(store, sid):
    slots = write(store, sid, [1, 2, 3, 4, 5, 6])
    seq, _ = store.allocate(sid, "ns", 0, b"")
    r1 = store.append(sid, seq, [1, 2])
    r2 = store.append(sid, seq, [3, 4])
    r3 = store.append(sid, seq, [5, 6, 7])
    assert [(p.slot, p.cached) for p in r1.pages + r2.pages] == [(slots[0], True), (slots[1], True)]
    assert [p.cached for p in r3.pages] == [True, False]
    assert (r1.cached_tokens, r2.cached_tokens, r3.cached_tokens) == (2, 2, 2)
    assert stats(store)["pages_sealed"] == 3


def test_extra_keys_separate_caches(store, sid):
    write(store, sid, [1, 2, 3, 4], extra=b"lora:1")
    assert resident(store, [1, 2, 3, 4], b"lora:1") == 2
    seq, _ = store.allocate(sid, "ns", 0, b"lora:2")
    r = store.append(sid, seq, [1, 2, 3, 4])
    assert r.cached_tokens == 0
    assert [p.block_hash for p in r.pages] == hashes(store, [1, 2, 3, 4], b"lora:2")
    assert store.lookup(sid, "ns", [1, 2, 3, 4], b"lora:1", False).hit_tokens == 4
    assert store.lookup(sid, "ns", [1, 2, 3, 4], b"", False).hit_tokens == 0


def test_namespaces_do_not_share_hashes(store, sid):
    store.create_namespace(make_spec("other"))
    write(store, sid, [1, 2, 3, 4])
    assert store.lookup(sid, "other", [1, 2, 3, 4], b"", False).hit_tokens == 0
    assert hashes(store, [1, 2], ns="ns") != hashes(store, [1, 2], ns="other")
    assert stats(store, "other")["lookups"] == 1 and stats(store)["lookups"] == 0


def test_concurrent_same_prefix_dedups_on_commit(store, sid):
    a, _ = store.allocate(sid, "ns", 0, b"")
    b, _ = store.allocate(sid, "ns", 0, b"")
    ra = store.append(sid, a, [1, 2, 3, 4])
    rb = store.append(sid, b, [1, 2, 3, 4, 5, 6])
    assert rb.cached_tokens == 0  # a has not committed: nothing to share yet
    a_slots, b_slots = [p.slot for p in ra.pages], [p.slot for p in rb.pages]
    assert a_slots == [0, 1] and b_slots == [2, 3, 4]
    assert stats(store)["pages_reserved"] == 5

    assert store.commit(sid, a, 4).sealed_pages == 2
    h = hashes(store, [1, 2, 3, 4, 5, 6])
    c = store.commit(sid, b, 6)
    assert (c.sealed_pages, c.deduplicated_pages) == (1, 2)
    assert c.moved == [PageRef(0, 0, True, 0, 2, h[0]), PageRef(1, 1, True, 0, 2, h[1])]

    s = stats(store)
    assert s["deduplicated_pages"] == 2
    assert (s["pages_sealed"], s["pages_reserved"], s["pages_free"]) == (3, 0, 5)
    assert free_list_len(store) == 5
    assert state_of(store, 2) is PageState.FREE and state_of(store, 3) is PageState.FREE
    assert slots_of(store, sid, b) == [0, 1, 4]
    assert [page(store, s).refcount for s in (0, 1, 4)] == [2, 2, 1]
    # b's own third page chains onto a's second.
    assert page(store, 4).parent is page(store, 1)
    assert page(store, 1).children == {page(store, 4)}
    assert store.lookup(sid, "ns", [1, 2, 3, 4, 5, 6], b"", False).hit_tokens == 6

    store.release_sequence(sid, a)
    store.release_sequence(sid, b)
    s = stats(store)
    assert (s["pages_pinned"], s["pages_sealed"], s["pages_free"]) == (0, 3, 5)
    assert store.evict_all("ns").pages_evicted == 3
    assert free_list_len(store) == PAGES


# ------------------------------------------------------------------ pins and sessions


def test_lookup_pin_blocks_eviction_until_released(store, sid):
    ab = write(store, sid, [1, 2, 3, 4])
    (c,) = write(store, sid, [5, 6])
    look = store.lookup(sid, "ns", [1, 2, 3, 4, 9], b"", True)
    assert look.hit_tokens == 4 and look.pin_id != 0
    assert [page(store, s).refcount for s in ab] == [1, 1]
    assert stats(store)["pages_pinned"] == 2
    assert store.session_infos()[0].pins == 1

    ev = store.evict_all("ns")
    assert (ev.pages_evicted, ev.bytes_freed, ev.pages_skipped_pinned) == (1, PAGE_BYTES, 2)
    assert state_of(store, c) is PageState.FREE
    assert resident(store, [1, 2, 3, 4]) == 2

    rel = store.release_pin(sid, look.pin_id)
    assert (rel.pages_freed, rel.pages_unpinned) == (0, 2)
    assert stats(store)["pages_pinned"] == 0
    with pytest.raises(NotFound, match=f"pin_id={look.pin_id} does not exist"):
        store.release_pin(sid, look.pin_id)
    assert store.evict_all("ns").pages_evicted == 2
    assert free_list_len(store) == PAGES


def test_lookup_pin_without_hit_holds_nothing(store, sid):
    look = store.lookup(sid, "ns", [1, 2, 3], b"", True)
    assert (look.hit_tokens, look.pin_id, look.slots) == (0, 0, [])
    assert store.session_infos()[0].pins == 0


def test_anonymous_lookup_cannot_pin(store, sid):
    write(store, sid, [1, 2])
    assert store.lookup(0, "ns", [1, 2], b"", False).hit_tokens == 2
    before = stats(store)
    with pytest.raises(InvalidArgument, match="pin=true needs a session_id"):
        store.lookup(0, "ns", [1, 2], b"", True)
    assert stats(store) == before


def test_two_pins_on_one_page_count_twice(store, sid):
    (slot,) = write(store, sid, [1, 2])
    p1 = store.lookup(sid, "ns", [1, 2], b"", True).pin_id
    p2 = store.lookup(sid, "ns", [1, 2], b"", True).pin_id
    assert p1 != p2 and page(store, slot).refcount == 2
    assert stats(store)["pages_pinned"] == 1
    store.release_pin(sid, p1)
    assert store.evict_all("ns").pages_evicted == 0
    store.release_pin(sid, p2)
    assert store.evict_all("ns").pages_evicted == 1


def hold_everything(store: Store, sid: int) -> None:
    """A session with a committed sequence, an uncommitted one, a preallocation and a pin."""
    write(store, sid, [9, 9])  # sealed, unpinned: must survive the session
    a, _ = store.allocate(sid, "ns", 0, b"")
    store.append(sid, a, [1, 2, 3, 4, 5])
    store.commit(sid, a, 4)  # 2 sealed (pinned by a), 1 reserved
    b, _ = store.allocate(sid, "ns", 0, b"")
    store.append(sid, b, [7, 8])  # 1 reserved
    store.allocate(sid, "ns", 4, b"")  # 2 reserved spare
    store.lookup(sid, "ns", [9, 9], b"", True)  # pins the first page
    s = stats(store)
    assert (s["pages_reserved"], s["pages_sealed"], s["pages_pinned"], s["sequences"]) == (4, 3, 3, 3)


def assert_holds_nothing(store: Store) -> None:
    s = stats(store)
    assert (s["pages_reserved"], s["pages_pinned"], s["sequences"]) == (0, 0, 0)
    assert (s["pages_sealed"], s["pages_free"]) == (3, PAGES - 3)
    assert free_list_len(store) == PAGES - 3
    assert store.table._owner == {}
    assert all(p.refcount == 0 for p in store.namespaces["ns"].pages.pages)
    assert resident(store, [1, 2, 3, 4]) == 2 and resident(store, [9, 9]) == 1


def test_expired_lease_frees_and_unpins_everything(store, clock):
    sid = store.open_session("dies", 0).session_id
    other = store.open_session("lives", 0).session_id
    hold_everything(store, sid)
    clock.advance(TTL / 2)
    store.heartbeat(other)
    clock.advance(TTL / 2)
    assert store.reap_expired() == []  # exactly at the deadline: still alive
    clock.advance(0.001)
    assert store.reap_expired() == [sid]
    assert_holds_nothing(store)
    assert [i.session_id for i in store.session_infos()] == [other]
    with pytest.raises(FailedPrecondition, match=rf"session {sid} has ended \(lease expired\)"):
        store.heartbeat(sid)
    with pytest.raises(FailedPrecondition, match="lease expired"):
        store.allocate(sid, "ns", 0, b"")
    assert store.reap_expired() == []


def test_any_request_renews_the_lease(store, clock, sid):
    for _ in range(5):
        clock.advance(TTL * 0.9)
        store.lookup(sid, "ns", [1], b"", False)
        assert store.reap_expired() == []
    clock.advance(TTL * 1.01)
    assert store.reap_expired() == [sid]


def test_lease_ttl_default_and_cap(store):
    assert store.open_session("a", 0).lease_ttl_s == TTL
    assert store.open_session("b", 2.5).lease_ttl_s == 2.5
    assert store.open_session("c", 1e6).lease_ttl_s == LIMITS.lease_ttl_max_s
    with pytest.raises(InvalidArgument, match="lease_ttl_ms=-1000 is negative"):
        store.open_session("d", -1)
    with pytest.raises(InvalidArgument, match="lease_ttl_ms=400 is too short"):
        store.open_session("e", 0.4)
    assert store.open_session("f", 0.5).lease_ttl_s == 0.5
    assert len(store.sessions) == 4


def test_max_sessions(store):
    for i in range(LIMITS.max_sessions):
        store.open_session(f"c{i}", 0)
    with pytest.raises(ResourceExhausted, match="max_sessions=4"):
        store.open_session("one too many", 0)


def test_stream_keeps_lease_and_last_detach_ends_session(store, clock, sid):
    hold_everything(store, sid)
    store.attach_stream(sid)
    store.attach_stream(sid)
    clock.advance(TTL * 100)
    assert store.reap_expired() == []  # a live stream overrides the lease
    store.detach_stream(sid)
    assert sid in store.sessions
    store.detach_stream(sid)
    assert sid not in store.sessions
    assert_holds_nothing(store)
    with pytest.raises(FailedPrecondition, match=r"ended \(keep-alive stream broke\)"):
        store.heartbeat(sid)
    store.detach_stream(sid)  # a late detach of an ended session is harmless


def test_close_session_releases_and_ends(store, sid):
    hold_everything(store, sid)
    r = store.close_session(sid)
    assert (r.pages_freed, r.pages_unpinned) == (4, 3)
    assert_holds_nothing(store)
    with pytest.raises(FailedPrecondition, match=r"ended \(closed by client\); open a new session"):
        store.close_session(sid)
    with pytest.raises(FailedPrecondition, match="closed by client"):
        store.append(sid, 1, [1])
    with pytest.raises(FailedPrecondition, match="closed by client"):
        store.lookup(sid, "ns", [1, 2], b"", False)


def test_unknown_session_not_found(store):
    for call in (
        lambda: store.heartbeat(12345),
        lambda: store.allocate(12345, "ns", 0, b""),
        lambda: store.append(12345, 1, [1]),
        lambda: store.lookup(12345, "ns", [1], b"", False),
        lambda: store.close_session(12345),
        lambda: store.attach_stream(12345),
    ):
        with pytest.raises(NotFound, match="session_id=12345 does not exist"):
            call()
    assert stats(store)["lookups"] == 0


def test_other_sessions_objects_are_permission_denied(store, sid):
    other = store.open_session("other", 0).session_id
    write(store, sid, [1, 2])
    seq, _ = store.allocate(sid, "ns", 0, b"")
    store.append(sid, seq, [1, 2, 3])
    pin = store.lookup(sid, "ns", [1, 2], b"", True).pin_id
    before, view = stats(store), store.sequence_view(sid, seq)
    for call in (
        lambda: store.append(other, seq, [4]),
        lambda: store.commit(other, seq, 3),
        lambda: store.sequence_view(other, seq),
        lambda: store.release_sequence(other, seq),
    ):
        with pytest.raises(
            PermissionDenied, match=f"sequence_id={seq} belongs to another session, not {other}"
        ):
            call()
    with pytest.raises(PermissionDenied, match=f"pin_id={pin} belongs to another session, not {other}"):
        store.release_pin(other, pin)
    assert stats(store) == before
    assert store.sequence_view(sid, seq) == view
    with pytest.raises(NotFound, match="sequence_id=999999 does not exist"):
        store.append(sid, 999999, [1])


def test_released_sequence_is_not_found(store, sid):
    seq, _ = store.allocate(sid, "ns", 0, b"")
    store.release_sequence(sid, seq)
    with pytest.raises(NotFound, match=f"sequence_id={seq} does not exist in session {sid}"):
        store.append(sid, seq, [1])


def test_own_pin_id_is_not_a_sequence_of_another_session(store, sid):
    """Sequence and pin ids share one space: a session naming its own pin as a
    sequence (or its own sequence as a pin) must be told it does not exist, not
    that it 'belongs to another session'."""
    write(store, sid, [1, 2])
    pin = store.lookup(sid, "ns", [1, 2], b"", True).pin_id
    seq, _ = store.allocate(sid, "ns", 0, b"")
    with pytest.raises(NotFound, match=f"sequence_id={pin} does not exist in session {sid}"):
        store.append(sid, pin, [1])
    with pytest.raises(NotFound, match=f"pin_id={seq} does not exist in session {sid}"):
        store.release_pin(sid, seq)


# ------------------------------------------------------------------ eviction


def build_chains(store: Store, sid: int) -> dict[str, int]:
    """A1-A2-A3, B1-B2 and A1-C2 (sharing A1); B looked up last. Returns slots by name.

    Recency (logical clock): A1..A3 sealed at 1..3, B1/B2 at 4/5, A1 re-touched at 6 by
    C's append, C2 sealed at 7, B1/B2 touched at 8. 6 pages sealed, 2 free."""
    a = write(store, sid, [1, 2, 3, 4, 5, 6])
    b = write(store, sid, [7, 8, 9, 10])
    c = write(store, sid, [1, 2, 11, 12])
    assert c[0] == a[0]
    store.lookup(sid, "ns", [7, 8, 9, 10], b"", False)
    s = stats(store)
    assert (s["pages_sealed"], s["pages_free"], s["pages_pinned"]) == (6, 2, 0)
    return {"A1": a[0], "A2": a[1], "A3": a[2], "B1": b[0], "B2": b[1], "C2": c[1]}


def gone(store: Store, slots: dict[str, int]) -> set[str]:
    return {name for name, slot in slots.items() if state_of(store, slot) is not PageState.SEALED}


def test_eviction_is_leaf_first_lru(store, sid):
    slots = build_chains(store, sid)
    order = []
    for _ in range(6):
        before = gone(store, slots)
        ev = store.evict_bytes("ns", 1)  # one page at a time
        assert (ev.pages_evicted, ev.bytes_freed) == (1, PAGE_BYTES)
        (name,) = gone(store, slots) - before
        order.append(name)
    # A3 (3) is the oldest leaf; then its parent A2 (2); A1 (6) waits for its child C2 (7);
    # B (8) is the most recent, and B1 waits for B2.
    assert order == ["A3", "A2", "C2", "A1", "B2", "B1"]
    assert store.evict_bytes("ns", 1).pages_evicted == 0
    s = stats(store)
    assert (s["evictions"], s["pages_sealed"], s["pages_free"]) == (6, 0, PAGES)


def test_lookup_refreshes_recency(store, sid):
    slots = build_chains(store, sid)
    store.lookup(sid, "ns", [1, 2, 3, 4, 5, 6], b"", False)  # A is now the most recent
    ev = store.evict_bytes("ns", 2 * PAGE_BYTES)
    assert ev.pages_evicted == 2
    assert gone(store, slots) == {"C2", "B2"}


def test_pressure_evicts_leaf_first_lru(store, sid):
    slots = build_chains(store, sid)
    seq, _ = store.allocate(sid, "ns", 0, b"")
    store.append(sid, seq, [50, 51, 52, 53, 54, 55])  # 3 pages, 2 free: evicts 1
    assert gone(store, slots) == {"A3"}
    store.append(sid, seq, [56, 57, 58, 59])  # 2 more
    assert gone(store, slots) == {"A3", "A2", "C2"}
    store.append(sid, seq, [60, 61])
    assert gone(store, slots) == {"A3", "A2", "C2", "A1"}
    s = stats(store)
    assert (s["evictions"], s["pages_reserved"], s["pages_free"]) == (4, 6, 0)
    assert resident(store, [7, 8, 9, 10]) == 2


def test_pinned_page_and_ancestors_survive_pressure(store, sid):
    slots = build_chains(store, sid)
    pin = store.lookup(sid, "ns", [1, 2, 11, 12], b"", True).pin_id
    seq, _ = store.allocate(sid, "ns", 0, b"")
    for i in range(6):  # 2 free + A3, A2, B2, B1 evictable
        store.append(sid, seq, [20 + 2 * i, 21 + 2 * i])
    assert gone(store, slots) == {"A3", "A2", "B2", "B1"}
    before = stats(store)
    with pytest.raises(ResourceExhausted) as e:
        store.append(sid, seq, [40, 41])
    assert "needs 1 free pages but only 0 are free and 0 sealed unpinned" in str(e.value)
    assert "8 total, 2 sealed+pinned, 6 reserved" in str(e.value)
    assert stats(store) == before
    assert resident(store, [1, 2, 11, 12]) == 2
    store.release_pin(sid, pin)
    store.append(sid, seq, [40, 41])  # C2 (the leaf) goes now
    assert gone(store, slots) == {"A3", "A2", "B2", "B1", "C2"}


def test_sequence_holds_its_pages_against_eviction(store, sid):
    seq, _ = store.allocate(sid, "ns", 0, b"")
    store.append(sid, seq, [1, 2, 3, 4])
    store.commit(sid, seq, 4)
    ev = store.evict_all("ns")
    assert (ev.pages_evicted, ev.pages_skipped_pinned) == (0, 2)
    assert resident(store, [1, 2, 3, 4]) == 2


def test_evict_prefix_takes_the_subtree_only_and_skips_pinned(store, sid):
    a = write(store, sid, [1, 2, 3, 4, 5, 6])  # A1 A2 A3
    d = write(store, sid, [1, 2, 3, 4, 7, 8])  # A1 A2 D3
    (b,) = write(store, sid, [9, 9])  # unrelated
    pin = store.lookup(sid, "ns", [1, 2, 3, 4, 5, 6], b"", True).pin_id

    ev = store.evict_prefix("ns", [1, 2, 3, 4, 0], b"")  # subtree of A2: A2, A3, D3
    assert (ev.pages_evicted, ev.bytes_freed, ev.pages_skipped_pinned) == (1, PAGE_BYTES, 2)
    assert state_of(store, d[2]) is PageState.FREE
    assert all(state_of(store, s) is PageState.SEALED for s in [*a, b])

    store.release_pin(sid, pin)
    ev = store.evict_prefix("ns", [1, 2, 3], b"")  # subtree of A1
    assert (ev.pages_evicted, ev.pages_skipped_pinned) == (3, 0)
    assert all(state_of(store, s) is PageState.FREE for s in a)
    assert state_of(store, b) is PageState.SEALED
    s = stats(store)
    assert (s["evictions"], s["pages_sealed"], s["pages_free"]) == (4, 1, PAGES - 1)
    assert free_list_len(store) == PAGES - 1


def test_evict_prefix_not_resident_does_nothing(store, sid):
    write(store, sid, [1, 2, 3, 4])
    before = stats(store)
    assert store.evict_prefix("ns", [1, 2, 3, 4, 5, 6], b"").pages_evicted == 0  # last page absent
    assert store.evict_prefix("ns", [1, 2, 3, 4], b"x").pages_evicted == 0  # other extra_keys
    assert store.evict_prefix("ns", [1], b"").pages_evicted == 0  # no full page
    assert store.evict_prefix("ns", [], b"").pages_evicted == 0
    assert stats(store) == before


def test_evict_bytes(store, sid):
    write(store, sid, [1, 2, 3, 4, 5, 6, 7, 8])
    assert store.evict_bytes("ns", 0).pages_evicted == 0
    ev = store.evict_bytes("ns", 2 * PAGE_BYTES + 1)  # rounds up to whole pages
    assert (ev.pages_evicted, ev.bytes_freed) == (3, 3 * PAGE_BYTES)
    assert resident(store, [1, 2, 3, 4, 5, 6, 7, 8]) == 1
    before = stats(store)
    with pytest.raises(InvalidArgument, match="bytes=-1 is negative"):
        store.evict_bytes("ns", -1)
    with pytest.raises(InvalidArgument, match=f"bytes={PAGES * PAGE_BYTES + 1} is over the limit"):
        store.evict_bytes("ns", PAGES * PAGE_BYTES + 1)
    assert stats(store) == before


# ------------------------------------------------------------------ static preallocation


def test_allocate_reserves_up_front(store, sid):
    seq, reserved = store.allocate(sid, "ns", 5, b"")
    assert reserved == 3  # ceil(5 / 2)
    s = stats(store)
    assert (s["pages_reserved"], s["pages_free"], s["sequences"]) == (3, 5, 1)
    assert free_list_len(store) == 5
    spare = {p.slot for p in store.namespaces["ns"].pages.pages if p.state is PageState.RESERVED}
    assert spare == {0, 1, 2}

    r = store.append(sid, seq, [1, 2, 3])
    assert {p.slot for p in r.pages} <= spare
    r = store.append(sid, seq, [4, 5])
    assert stats(store)["pages_free"] == 5  # every page came from the preallocation
    assert {p.slot for p in store.sequence_view(sid, seq).pages} == spare

    before, view = stats(store), store.sequence_view(sid, seq)
    with pytest.raises(
        OutOfRange, match=r"append of 1 tokens to sequence \d+ \(5 tokens\) exceeds its max_tokens=5"
    ):
        store.append(sid, seq, [6])
    assert stats(store) == before and store.sequence_view(sid, seq) == view


def test_allocate_that_cannot_fit_changes_nothing(store, sid):
    write(store, sid, [1, 2])
    seq, _ = store.allocate(sid, "ns", 0, b"")
    store.append(sid, seq, [3, 4, 5])  # 2 reserved
    before = stats(store)
    with pytest.raises(ResourceExhausted) as e:
        store.allocate(sid, "ns", 15, b"")  # 8 pages; 5 free + 1 evictable
    msg = str(e.value)
    assert "allocate(max_tokens=15) needs 8 free pages but only 5 are free and 1 sealed unpinned" in msg
    assert "(8 total, 0 sealed+pinned, 2 reserved)" in msg
    assert stats(store) == before
    assert store.session_infos()[0].sequences == 1
    assert resident(store, [1, 2]) == 1

    _, reserved = store.allocate(sid, "ns", 12, b"")  # 6 pages: evicts the sealed one
    assert reserved == 6
    s = stats(store)
    assert (s["pages_free"], s["pages_reserved"], s["pages_sealed"], s["evictions"]) == (0, 8, 0, 1)


def test_released_spare_pages_go_back(store, sid):
    write(store, sid, [1, 2])
    seq, _ = store.allocate(sid, "ns", 8, b"")  # 4 spare
    r = store.append(sid, seq, [1, 2, 3])  # a cached page, then 1 spare used
    assert [p.cached for p in r.pages] == [True, False]
    assert stats(store)["pages_reserved"] == 4
    rel = store.release_sequence(sid, seq)
    assert (rel.pages_freed, rel.pages_unpinned) == (4, 1)
    s = stats(store)
    assert (s["pages_reserved"], s["pages_free"], s["pages_sealed"], s["sequences"]) == (0, 7, 1, 0)
    assert free_list_len(store) == 7
    assert sum(p.state is PageState.FREE for p in store.namespaces["ns"].pages.pages) == 7


def test_allocate_zero_pages(store, sid):
    seq, reserved = store.allocate(sid, "ns", 0, b"")
    assert reserved == 0
    assert stats(store)["pages_free"] == PAGES
    store.append(sid, seq, list(range(16)))  # bounded by the pool only
    assert store.sequence_view(sid, seq).num_tokens == 16


# ------------------------------------------------------------------ failures change nothing


def test_append_without_room_changes_nothing(bare_store):
    store = bare_store
    store.create_namespace(make_spec(num_pages=4))
    sid = store.open_session("t", 0).session_id
    cached = write(store, sid, [1, 2, 3, 4])  # A1 A2: sealed, unpinned, A2 evictable
    hog, _ = store.allocate(sid, "ns", 0, b"")
    store.append(sid, hog, [7, 7, 7, 7])  # the other 2 pages, reserved
    seq, _ = store.allocate(sid, "ns", 0, b"")
    before = stats(store)
    assert (before["pages_free"], before["pages_sealed"], before["pages_pinned"]) == (0, 2, 0)
    policy = store.namespaces["ns"].policy
    assert len(policy) == 1

    # A1 and A2 are hits, held while room is made, so nothing is evictable for the third page.
    with pytest.raises(ResourceExhausted) as e:
        store.append(sid, seq, [1, 2, 3, 4, 5, 6])
    assert f"append of 6 tokens to sequence {seq} needs 1 free pages but only 0 are free" in str(e.value)
    assert stats(store) == before
    assert [page(store, s).refcount for s in cached] == [0, 0]
    assert len(policy) == 1  # A2 is a candidate again
    view = store.sequence_view(sid, seq)
    assert (view.num_tokens, view.committed_tokens, view.pages) == (0, 0, [])

    # The cached pages still hit, and the sequence still works for what fits.
    assert store.lookup(sid, "ns", [1, 2, 3, 4], b"", False).hit_tokens == 4
    r = store.append(sid, seq, [1, 2, 3, 4])
    assert r.cached_tokens == 4 and [p.slot for p in r.pages] == cached
    # Evicting for room later still takes the leaf first: A2 is held now, so nothing goes.
    assert store.evict_all("ns").pages_evicted == 0


# ------------------------------------------------------------------ bad input


@pytest.fixture
def busy(store, sid):
    """A session holding a sequence of 3 tokens (2 reserved pages) and one sealed page."""
    write(store, sid, [9, 9])
    seq, _ = store.allocate(sid, "ns", 0, b"")
    store.append(sid, seq, [1, 2, 3])
    return store, sid, seq


BAD_INPUT = [
    (
        "append negative id",
        lambda s, sid, q: s.append(sid, q, [1, -5]),
        InvalidArgument,
        ["token_ids[1]=-5", "must be >= 0", "vocab_size=100"],
    ),
    (
        "append id past vocab",
        lambda s, sid, q: s.append(sid, q, [7, 100, 200]),
        InvalidArgument,
        ["token_ids[1]=100", "vocab_size=100", "2 bad ids"],
    ),
    (
        "append too many ids",
        lambda s, sid, q: s.append(sid, q, [1] * 65),
        ResourceExhausted,
        ["token_ids has 65 ids", "max_request_tokens=64"],
    ),
    (
        "lookup id past vocab",
        lambda s, sid, q: s.lookup(sid, "ns", [9, 9, 100], b"", True),
        InvalidArgument,
        ["token_ids[2]=100", "vocab_size=100"],
    ),
    (
        "lookup too many ids",
        lambda s, sid, q: s.lookup(sid, "ns", [9] * 65, b"", False),
        ResourceExhausted,
        ["65 ids", "max_request_tokens=64"],
    ),
    (
        "lookup extra_keys too long",
        lambda s, sid, q: s.lookup(sid, "ns", [9, 9], b"x" * 17, False),
        InvalidArgument,
        ["extra_keys has 17 bytes", "max_extra_keys_bytes=16"],
    ),
    (
        "allocate extra_keys too long",
        lambda s, sid, q: s.allocate(sid, "ns", 0, b"x" * 17),
        InvalidArgument,
        ["extra_keys has 17 bytes", "max_extra_keys_bytes=16"],
    ),
    (
        "allocate negative max_tokens",
        lambda s, sid, q: s.allocate(sid, "ns", -1, b""),
        InvalidArgument,
        ["max_tokens=-1 is negative"],
    ),
    (
        "allocate max_tokens over limit",
        lambda s, sid, q: s.allocate(sid, "ns", 65, b""),
        ResourceExhausted,
        ["max_tokens=65", "max_request_tokens=64"],
    ),
    (
        "evict_prefix bad id",
        lambda s, sid, q: s.evict_prefix("ns", [9, -1], b""),
        InvalidArgument,
        ["prefix.token_ids[1]=-1"],
    ),
    (
        "commit past appended",
        lambda s, sid, q: s.commit(sid, q, 4),
        OutOfRange,
        ["num_tokens=4 must be in [0, 3]"],
    ),
    ("commit negative", lambda s, sid, q: s.commit(sid, q, -1), OutOfRange, ["num_tokens=-1"]),
    (
        "commit free slot",
        lambda s, sid, q: s.commit(sid, q, 2, [7]),
        PermissionDenied,
        ["slot 7", "not a writable page of sequence", "pool has 8 pages"],
    ),
    ("commit slot past pool", lambda s, sid, q: s.commit(sid, q, 2, [1, 99]), PermissionDenied, ["slot 99"]),
    ("commit negative slot", lambda s, sid, q: s.commit(sid, q, 2, [-1]), PermissionDenied, ["slot -1"]),
    ("commit sealed slot", lambda s, sid, q: s.commit(sid, q, 2, [0]), PermissionDenied, ["slot 0"]),
    ("unknown namespace", lambda s, sid, q: s.allocate(sid, "llama", 0, b""), NotFound, ["'llama'"]),
]


@pytest.mark.parametrize(("what", "call", "error", "needles"), BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_refused_and_changes_nothing(busy, what, call, error, needles):
    store, sid, seq = busy
    before, view = stats(store), store.sequence_view(sid, seq)
    slots_before = [(p.state, p.refcount, p.owner) for p in store.namespaces["ns"].pages.pages]
    with pytest.raises(error) as e:
        call(store, sid, seq)
    for needle in needles:
        assert needle in str(e.value), f"{needle!r} not in {str(e.value)!r}"
    assert stats(store) == before
    assert store.sequence_view(sid, seq) == view
    assert [(p.state, p.refcount, p.owner) for p in store.namespaces["ns"].pages.pages] == slots_before
    assert store.session_infos()[0].sequences == 1 and store.session_infos()[0].pins == 0


def test_commit_of_another_sequences_slot_is_denied(store, sid):
    a, _ = store.allocate(sid, "ns", 0, b"")
    b, _ = store.allocate(sid, "ns", 0, b"")
    ra = store.append(sid, a, [1, 2])
    store.append(sid, b, [1, 2])
    with pytest.raises(
        PermissionDenied, match=f"slot {ra.pages[0].slot}, which is not a writable page of sequence {b}"
    ):
        store.commit(sid, b, 2, [ra.pages[0].slot])
    assert stats(store)["pages_sealed"] == 0
