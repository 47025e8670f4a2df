"""A put into a credit in one pass (kvstore/store/put_fused.py) leaves the store exactly as
the stepwise append, commit and release do: twin stores take the same random puts (prompts
sharing prefixes, cached prefixes skipped, credits of every size), lookups with pins and
evictions, one through each path, and after every step every page (state, references,
hash, parent, children, recency, policy state), the free list's order, the index, the
counters, the MRC's sample and each put's result must be equal; at the end both evict
everything in the same order."""

from __future__ import annotations

import random
import uuid

import pytest

from kvstore.errors import FailedPrecondition, ResourceExhausted
from kvstore.store import credit, put_fused
from kvstore.store.store import Store
from kvstore.store.types import NamespaceSpec, StoreLimits
from tests.twin_state import pages_state, policy_state

T = 2
VOCAB = 3  # prefixes collide: cached pages, shared parents, evictions of shared pages
PAGES = 40


def _store(policy: str) -> Store:
    store = Store(StoreLimits(max_request_tokens=64), f"kvt-{uuid.uuid4().hex[:8]}-")
    spec = NamespaceSpec(
        "t", num_layers=1, num_kv_heads=1, head_dim=8, dtype="float16", page_tokens=T,
        num_pages=PAGES, vocab_size=VOCAB, policy=policy,
    )  # fmt: skip
    store.create_namespace(spec)
    return store


def _state(store: Store) -> tuple:
    ns = store.namespace("t")
    counters = (ns.sequences, ns.hit_tokens, ns.miss_tokens, ns.deduplicated_pages, len(ns.ghost))
    s = ns.mrc.sampler
    mrc = (s.accesses, list(s._log), s._seen_at())
    return pages_state(ns), counters, mrc, policy_state(ns.policy)


class Twin:
    """One store's client: a session, its credit, its pins."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.sid = store.open_session("twin", 600).session_id
        self.credit = credit.Credit()
        self.pins: list[int] = []

    def put(self, tokens: list[int], skip: int, pages: int) -> tuple:
        s, sid = self.store, self.sid
        ns = s.namespace("t")
        if not self.credit.sequence_id:
            self.credit = credit.grant(s, s.session(sid), ns, pages)
            if not self.credit.sequence_id:
                return ("no credit",)
        need = -(-len(tokens) // T) - skip
        if need > len(self.credit.slots):
            return ("credit too small",)
        try:
            a, c, self.credit = credit.put(
                s, sid, "t", tokens, b"", "", self.credit.sequence_id, self.credit.slots[:need], pages, skip
            )
        except (FailedPrecondition, ResourceExhausted) as e:
            return (type(e).__name__, str(e))
        return (a.num_tokens, a.cached_tokens, a.dropped, c.sealed_pages, c.deduplicated_pages,
                [(m.index, m.slot) for m in c.moved], self.credit.sequence_id, self.credit.slots)  # fmt: skip

    def lookup(self, tokens: list[int]) -> tuple:
        r = self.store.lookup(self.sid, "t", tokens, b"", True)
        if r.pin_id:
            self.pins.append(r.pin_id)
        return (r.hit_tokens, r.slots)

    def release_pin(self, i: int) -> None:
        if self.pins:
            self.store.release_pin(self.sid, self.pins.pop(i % len(self.pins)))


@pytest.mark.parametrize("policy", ["horizon", "lru", "arc", "s3fifo", "lfu"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_fused_put_leaves_the_store_as_the_stepwise_one(policy, seed, monkeypatch) -> None:
    fused_store, stepwise_store = _store(policy), _store(policy)
    try:
        stepwise_ns = stepwise_store.namespace("t")
        applies = put_fused.applies
        taken = []

        def route(seq):  # the twin's puts go the stepwise way
            ok = seq.ns is not stepwise_ns and applies(seq)
            taken.append(ok)
            return ok

        monkeypatch.setattr(put_fused, "applies", route)
        twins = [[Twin(fused_store), Twin(stepwise_store)] for _ in range(2)]
        rng = random.Random(seed)
        prompts: list[list[int]] = [[]]
        for _ in range(300):
            op = rng.random()
            pair = twins[rng.randrange(2)]
            if op < 0.6:
                base = rng.choice(prompts)[: rng.randrange(0, 12)]
                tokens = base + [rng.randrange(VOCAB) for _ in range(rng.randrange(0 if base else 1, 9))]
                prompts.append(tokens)
                skip = rng.randrange(0, len(base) // T + 1) if rng.random() < 0.5 else 0
                pages = rng.choice([1, 2, 4, 8])
                out = [t.put(tokens, skip, pages) for t in pair]
            elif op < 0.8:
                tokens = rng.choice(prompts)
                out = [t.lookup(tokens) for t in pair]
            elif op < 0.95:
                i = rng.randrange(8)
                out = [t.release_pin(i) for t in pair]
            else:
                nbytes = rng.randrange(1, 8) * fused_store.namespace("t").spec.page_bytes
                out = [s.evict_bytes("t", nbytes).pages_evicted for s in (fused_store, stepwise_store)]
            assert out[0] == out[1]
            assert _state(fused_store) == _state(stepwise_store)
        assert any(taken) and not all(taken)  # both paths ran
        victims = []
        for s in (fused_store, stepwise_store):
            ns = s.namespace("t")
            order = []
            while (page := ns.policy.victim()) is not None:
                order.append(page.slot)
                ns.drop(page)
            victims.append(order)
        assert victims[0] == victims[1]
    finally:
        fused_store.close()
        stepwise_store.close()
