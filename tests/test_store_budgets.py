"""Per-sequence cache budgets (sliding window with sinks, importance) and the model
fingerprint check, on the Store in-process, with exact expectations: which page
indices are held and dropped, what is sealed and visible to lookups, counters."""

from __future__ import annotations

import dataclasses
import math
import random
import uuid
from pathlib import Path

import pytest

from kvstore.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from kvstore.memory.pages import PageState
from kvstore.store.store import Store
from kvstore.store.types import NamespaceSpec, SequenceOptions, StoreLimits

SHM = Path("/dev/shm")
T = 2  # tokens per page
PAGES = 32
LIMITS = StoreLimits(max_request_tokens=256, max_pool_bytes=1 << 22, max_sessions=8)


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


def window(sink_tokens: int, window_tokens: int) -> SequenceOptions:
    return SequenceOptions("sliding_window", sink_tokens=sink_tokens, window_tokens=window_tokens)


def importance(budget_pages: int, sink_tokens: int) -> SequenceOptions:
    return SequenceOptions("importance", sink_tokens=sink_tokens, budget_pages=budget_pages)


@pytest.fixture
def store():
    prefix = f"kvtest-budget-{uuid.uuid4().hex[:12]}-"
    s = Store(LIMITS, shm_prefix=prefix)
    s.create_namespace(make_spec())
    try:
        yield s
    finally:
        s.close()
    assert not list(SHM.glob(prefix + "*"))


@pytest.fixture
def sid(store) -> int:
    return store.open_session("test", 0).session_id


def stats(store: Store) -> dict:
    return dataclasses.asdict(store.stats("ns")[0])


def held(store: Store, sid: int, seq: int) -> list[int]:
    return [r.index for r in store.sequence_view(sid, seq).pages]


def toks(n: int, start: int = 0) -> list[int]:
    return [(start + i) % 97 + 1 for i in range(n)]


# ------------------------------------------------------------------ sliding window


def test_window_prefill_keeps_sinks_and_last_window(store, sid):
    seq, reserved = store.allocate(sid, "ns", 0, b"", window(sink_tokens=2, window_tokens=4))
    assert reserved == 0
    r = store.append(sid, seq, toks(12))  # pages 0..5; window = tokens [8, 12) = pages 4, 5
    assert r.dropped == [1, 2, 3]
    assert [p.index for p in r.pages] == [0, 4, 5]
    assert [p.private for p in r.pages] == [False, True, True]
    assert len(r.pages[0].block_hash) == 16  # the sink page is exact: hashed, shareable
    assert [p.block_hash for p in r.pages[1:]] == [b"", b""]  # post-drop pages: no hash
    s = stats(store)
    assert (s["pages_reserved"], s["pages_free"], s["budget_dropped_pages"]) == (3, PAGES - 3, 3)
    view = store.sequence_view(sid, seq)
    assert [p.index for p in view.pages] == [0, 4, 5] and view.dropped == [1, 2, 3]
    assert view.options == window(2, 4)


def test_window_slides_one_token_at_a_time_within_budget(store, sid):
    S, W = 3, 5  # sinks: pages [0, 2); window of 5 tokens spans at most 3 pages of 2
    budget = math.ceil(S / T) + math.ceil((W - 1) / T) + 1
    seq, _ = store.allocate(sid, "ns", 0, b"", window(S, W))
    dropped: list[int] = []
    for n in range(1, 60):
        r = store.append(sid, seq, toks(1, n))
        dropped += r.dropped
        npages = -(-n // T)
        lo = max(0, n - W) // T
        expect = sorted(set(range(min(2, npages))) | set(range(lo, npages)))
        assert held(store, sid, seq) == expect, n
        assert len(expect) <= budget
        assert stats(store)["pages_reserved"] == len(expect)
        assert sorted(set(range(npages)) - set(expect)) == dropped  # each index dropped once
    assert store.release_sequence(sid, seq).pages_freed == len(expect)
    assert stats(store)["pages_free"] == PAGES


def test_window_commit_seals_only_pages_before_the_cut(store, sid):
    seq, _ = store.allocate(sid, "ns", 0, b"", window(2, 4))
    tokens = toks(12)
    store.append(sid, seq, tokens)
    r = store.commit(sid, seq, 12)
    assert (r.sealed_pages, r.deduplicated_pages) == (1, 0)  # page 0 only; 4 and 5 are private
    s = stats(store)
    assert (s["pages_sealed"], s["pages_reserved"]) == (1, 2)
    other = store.open_session("other", 0).session_id
    assert store.lookup(other, "ns", tokens, b"", False).hit_tokens == 2


def test_dropped_sealed_pages_still_hit_for_other_lookups(store, sid):
    seq, _ = store.allocate(sid, "ns", 0, b"", window(2, 4))
    tokens = toks(8)
    store.append(sid, seq, tokens[:6])  # N=6: window [2, 6) = pages 1, 2: nothing dropped
    assert store.commit(sid, seq, 6).sealed_pages == 3
    slot1 = store.sequence_view(sid, seq).pages[1].slot
    r = store.append(sid, seq, tokens[6:])  # N=8: window [4, 8) = pages 2, 3: page 1 dropped
    assert r.dropped == [1]
    assert [(p.index, p.private) for p in r.pages] == [(3, True)]
    p1 = store.namespaces["ns"].pages.pages[slot1]
    assert p1.state is PageState.SEALED and p1.refcount == 0  # unpinned, still cached
    assert store.commit(sid, seq, 8).sealed_pages == 0  # page 3 is private
    other = store.open_session("other", 0).session_id
    hit = store.lookup(other, "ns", tokens, b"", False)
    # Pages 0..2 were sealed before the drop: exact, still shared. Page 3 never visible.
    assert hit.hit_tokens == 6 and hit.slots[1] == slot1
    s = stats(store)
    assert (s["pages_sealed"], s["pages_pinned"], s["pages_reserved"]) == (3, 2, 1)


def test_post_drop_pages_never_visible_nor_deduplicated(store, sid):
    tokens = toks(12)
    a, _ = store.allocate(sid, "ns", 0, b"", window(0, 2))
    store.append(sid, a, tokens)  # keeps only page 5; 0..4 dropped, page 5 private
    store.commit(sid, a, 12)
    assert stats(store)["pages_sealed"] == 0
    other = store.open_session("other", 0).session_id
    b, _ = store.allocate(other, "ns", 0, b"")
    rb = store.append(other, b, tokens)
    assert rb.cached_tokens == 0 and all(not p.cached and not p.private for p in rb.pages)
    cb = store.commit(other, b, 12)
    assert (cb.sealed_pages, cb.deduplicated_pages) == (6, 0)  # B's own exact pages
    (a_page,) = store.sequence_view(sid, a).pages
    assert a_page.private and not a_page.cached and a_page.block_hash == b""
    assert stats(store)["deduplicated_pages"] == 0


def test_drops_give_room_under_pool_pressure(store, sid):
    seq, _ = store.allocate(sid, "ns", 0, b"", window(0, 2))  # holds at most 2 pages
    store.append(sid, seq, toks(3))  # pages 0, 1 (N=3: window [1, 3) = pages 0, 1)
    _, reserved = store.allocate(sid, "ns", 2 * (PAGES - 2), b"")
    assert reserved == PAGES - 2 and stats(store)["pages_free"] == 0
    # N=5: window [3, 5) = pages 1, 2. Page 2 needs a free page, which dropping page 0 gives.
    r = store.append(sid, seq, toks(2, 3))
    assert r.dropped == [0] and [p.index for p in r.pages] == [1, 2]
    assert stats(store)["pages_free"] == 0


# ------------------------------------------------------------------ importance


def test_importance_drops_least_important_non_sink_non_last(store, sid):
    seq, _ = store.allocate(sid, "ns", 0, b"", importance(budget_pages=4, sink_tokens=2))
    assert store.append(sid, seq, toks(8)).dropped == []  # 4 pages: at budget
    assert store.report_importance(sid, seq, [0.0, 0.1, 0.5, 0.2]) == 4
    r = store.append(sid, seq, toks(2, 8))  # page 4 would make 5: drop the least important
    assert r.dropped == [1]
    assert held(store, sid, seq) == [0, 2, 3, 4]
    store.report_importance(sid, seq, [0.0, 123.0, 0.3, 0.05, 0.7])  # index 1's score ignored
    assert store.append(sid, seq, toks(2, 10)).dropped == [3]
    # Page 5 was never scored: it ranks highest, so page 2 (0.3) goes before 4 (0.7) and 5.
    assert store.append(sid, seq, toks(2, 12)).dropped == [2]
    assert held(store, sid, seq) == [0, 4, 5, 6]
    assert stats(store)["budget_dropped_pages"] == 3


def test_importance_unscored_and_ties_go_oldest_first(store, sid):
    seq, _ = store.allocate(sid, "ns", 0, b"", importance(budget_pages=4, sink_tokens=2))
    r = store.append(sid, seq, toks(20))  # 10 pages, none scored: keep sink, newest 3
    assert r.dropped == [1, 2, 3, 4, 5, 6]
    assert [p.index for p in r.pages] == [0, 7, 8, 9]
    store.report_importance(sid, seq, [1.0] * 10)  # all tied
    assert store.append(sid, seq, toks(1, 20)).dropped == [7]


def test_importance_budget_never_exceeded_and_order_respected(store, sid):
    rng = random.Random(4)
    B, S = 5, 3  # 2 sink pages
    seq, _ = store.allocate(sid, "ns", 0, b"", importance(B, S))
    n = 0
    for step in range(80):
        k = rng.randint(1, 3)
        before = held(store, sid, seq)
        scores = [rng.random() for _ in range(-(-n // T))]
        if scores:
            store.report_importance(sid, seq, scores)
        r = store.append(sid, seq, toks(k, n))
        n += k
        now = held(store, sid, seq)
        npages = -(-n // T)
        assert len(now) <= B, step
        assert now[: min(2, npages)] == list(range(min(2, npages))) and now[-1] == npages - 1
        # Every dropped old page scored no higher than every kept old non-sink, non-last page.
        old_dropped = [i for i in r.dropped if i in before]
        kept_old = [i for i in before if i in now and 2 <= i < npages - 1]
        for d in old_dropped:
            assert all(scores[d] <= scores[k_] for k_ in kept_old), (step, d)
        assert stats(store)["pages_reserved"] == len(now)


# ------------------------------------------------------------------ bad options


@pytest.mark.parametrize(
    ("max_tokens", "options", "needle"),
    [
        (0, window(2, 0), "options.window_tokens=0 must be > 0"),
        (0, window(-1, 4), "options.sink_tokens=-1 is negative"),
        (0, window(2, -4), "options.window_tokens=-4 is negative"),
        (0, importance(-3, 0), "options.budget_pages=-3 is negative"),
        (0, importance(2, 4), "options.budget_pages=2 is smaller than the sink pages + 1 = 3"),
        (0, importance(0, 0), "options.budget_pages=0 is smaller than the sink pages + 1 = 1"),
        (0, SequenceOptions("static"), "options.mode=static needs max_tokens > 0"),
        (8, window(2, 4), "max_tokens=8 with options.mode=sliding_window"),
        (0, SequenceOptions("importance", window_tokens=4, budget_pages=3), "options.window_tokens=4 has no"),
        (0, SequenceOptions("lru"), "options.mode='lru' is unknown"),
    ],
)
def test_bad_options_rejected_naming_the_field(store, sid, max_tokens, options, needle):
    with pytest.raises(InvalidArgument, match=needle.replace("+", r"\+")):
        store.allocate(sid, "ns", max_tokens, b"", options)
    s = stats(store)
    assert (s["sequences"], s["pages_free"]) == (0, PAGES)


def test_static_mode_is_max_tokens_preallocation(store, sid):
    _, reserved = store.allocate(sid, "ns", 5, b"", SequenceOptions("static"))
    assert reserved == 3 and stats(store)["pages_reserved"] == 3


def test_report_importance_checks(store, sid):
    plain, _ = store.allocate(sid, "ns", 0, b"")
    store.append(sid, plain, toks(4))
    with pytest.raises(
        FailedPrecondition, match=r"only taken by sequences allocated with options\.mode=importance"
    ):
        store.report_importance(sid, plain, [1.0, 2.0])
    seq, _ = store.allocate(sid, "ns", 0, b"", importance(3, 0))
    store.append(sid, seq, toks(5))  # 3 pages
    with pytest.raises(InvalidArgument, match=r"scores has 2 values but sequence \d+ has 3 pages"):
        store.report_importance(sid, seq, [1.0, 2.0])
    with pytest.raises(InvalidArgument, match=r"scores\[1\]=nan is not a finite number"):
        store.report_importance(sid, seq, [1.0, math.nan, 0.0])


# ------------------------------------------------------------------ model fingerprint


@pytest.fixture
def fp_store(store):
    store.create_namespace(make_spec("fp", model_fingerprint="smollm2-135m:abc"))
    return store


def test_fingerprint_mismatch_refused_and_nothing_changes(fp_store, sid):
    msg = (
        "namespace 'fp' holds KV of model smollm2-135m:abc, this request is for model llama-8b:def; "
        "use a namespace made for this model"
    )
    before = dataclasses.asdict(fp_store.stats("fp")[0])
    with pytest.raises(FailedPrecondition) as e:
        fp_store.allocate(sid, "fp", 4, b"", None, "llama-8b:def")
    assert str(e.value) == msg
    with pytest.raises(FailedPrecondition) as e:
        fp_store.lookup(sid, "fp", toks(4), b"", True, "llama-8b:def")
    assert str(e.value) == msg
    assert dataclasses.asdict(fp_store.stats("fp")[0]) == before
    assert not fp_store.sessions[sid].sequences and not fp_store.sessions[sid].pins


def test_fingerprint_match_or_empty_accepted(fp_store, sid):
    for fp in ("smollm2-135m:abc", ""):
        fp_store.allocate(sid, "fp", 0, b"", None, fp)
        fp_store.lookup(sid, "fp", toks(4), b"", False, fp)
    # A namespace without a fingerprint accepts any model (it is not bound on first use).
    fp_store.allocate(sid, "ns", 0, b"", None, "anything")
    fp_store.lookup(sid, "ns", toks(4), b"", False, "anything")
    assert fp_store.namespaces["ns"].spec.model_fingerprint == ""


def test_a_dropped_page_under_a_held_page_is_counted_as_held_not_as_obtainable():
    """A window drops page 0 while the sequence keeps pages 1-2, which extend it in the tree:
    eviction (leaves first) cannot take page 0 until they go. Evict reports it as skipped, and
    an allocation that only page 0 could satisfy is refused without evicting anything."""
    spec = make_spec(num_pages=5)
    s = Store(LIMITS, shm_prefix=f"kvtest-budget-{uuid.uuid4().hex[:12]}-")
    try:
        s.create_namespace(spec)
        sid = s.open_session("t", 0.0).session_id
        seq, _ = s.allocate(sid, "ns", 0, b"", window(0, 5))
        s.append(sid, seq, [1] * 6)
        s.commit(sid, seq, 6, [])
        assert s.append(sid, seq, [1]).dropped == [0]  # pages 1, 2 sealed and held; 3 reserved
        ns = s.namespaces["ns"]
        assert ns.obtainable() == 1  # the one free page, not page 0
        with pytest.raises(ResourceExhausted):
            s.allocate(sid, "ns", 2 * T, b"")
        assert ns.evictions == 0
        r = s.evict_all("ns")
        assert (r.pages_evicted, r.pages_skipped_pinned) == (0, 3)
        s.release_sequence(sid, seq)  # now page 0 and its subtree can go
        assert ns.obtainable() == 5
        assert s.evict_all("ns").pages_evicted == 3
    finally:
        s.close()
