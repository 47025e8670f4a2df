"""A request's page moves batched (kvstore/store/page_runs.py, Namespace.seal_run, the
policies' `*_all` calls) leave everything exactly as the per-page calls in sequence do.

Twins: two policies (or two real Namespaces) take the same random steps, one through the
batched call, one through the per-page calls; after every step their whole state must be
equal (every page, the counters, the index, the policy's fields with each heap as its live
entries) and at the end both must give the same victims in the same order."""

from __future__ import annotations

import os
import random
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore.errors import InvariantBroken
from kvstore.memory.pages import FREE, RESERVED, SEALED, Page
from kvstore.memory.shm_pool import ShmPool
from kvstore.policy import make_policy, policy_names
from kvstore.policy.heap import py_withdraw_all, withdraw_all
from kvstore.store import page_runs
from kvstore.store.namespace import Namespace
from kvstore.store.types import PAGE_ALIGN, NamespaceSpec
from tests.twin_state import pages_state, policy_state

POLICIES = policy_names()
HASHES = 24  # few block hashes: re-sealed hashes hit the policies' ghosts


def _pages_state(pages: list[Page]) -> list:
    return [(p.block_hash, p.last_access, p.policy_state) for p in pages]


# ---------------------------------------------------------------- the policies alone


class PolicyTwin:
    """One policy and its own pages; `batched` says which way the lists are told."""

    def __init__(self, name: str, batched: bool) -> None:
        self.policy = make_policy(name)
        self.batched = batched
        self.pages = [Page(slot) for slot in range(32)]

    def tell(self, call: str, slots: list[int]) -> None:
        pages = [self.pages[s] for s in slots]
        if self.batched:
            getattr(self.policy, f"{call}_all")(pages)
        else:
            for page in pages:
                getattr(self.policy, call)(page)


@pytest.mark.parametrize("name", POLICIES)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rng=st.randoms(use_true_random=False))
def test_each_policys_batched_calls_are_its_per_page_calls_in_sequence(name, rng: random.Random) -> None:
    twins = [PolicyTwin(name, batched) for batched in (True, False)]
    free = list(range(32))
    resident: list[int] = []  # sealed, in the policy
    candidates: set[int] = set()
    clock = 0
    for _ in range(40):
        op = rng.random()
        if op < 0.3 and free:  # seal a run of fresh pages (hashes repeat: ghosts)
            run = [free.pop(rng.randrange(len(free))) for _ in range(rng.randint(1, min(6, len(free))))]
            for t in twins:
                for s in run:
                    clock += 1
                    t.pages[s].block_hash = b"h%d" % rng.randrange(HASHES) if t.batched else None
                    t.pages[s].last_access = clock
            for s in run:  # the same hash and clock on the twin's page
                twins[1].pages[s].block_hash = twins[0].pages[s].block_hash
                twins[1].pages[s].last_access = twins[0].pages[s].last_access
            for t in twins:
                t.tell("on_sealed", run)
            resident += run
        elif op < 0.55 and resident:  # some resident non-candidates become candidates
            run = [s for s in rng.sample(resident, min(len(resident), 5)) if s not in candidates]
            for t in twins:
                t.tell("on_evictable", run)
            candidates.update(run)
        elif op < 0.7 and resident:  # a pin: some resident pages (candidates or not) taken back
            run = rng.sample(resident, min(len(resident), 5))
            for t in twins:
                t.tell("on_unevictable", run)
            candidates.difference_update(run)
        elif op < 0.85 and resident:  # a lookup's hit
            run = rng.sample(resident, min(len(resident), 5))
            clock += 1
            for t in twins:
                for s in run:
                    t.pages[s].last_access = clock
                t.tell("on_access", run)
        elif resident:  # evict: the policy's victim, dropped
            victims = [t.policy.victim() for t in twins]
            assert (victims[0] is None) == (victims[1] is None)
            if victims[0] is not None:
                s = victims[0].slot
                assert victims[1].slot == s
                for t, v in zip(twins, victims, strict=True):
                    t.policy.on_dropped(v)
                    v.block_hash, v.policy_state = None, None
                candidates.discard(s)
                resident.remove(s)
                free.append(s)
        assert policy_state(twins[0].policy) == policy_state(twins[1].policy)
        assert _pages_state(twins[0].pages) == _pages_state(twins[1].pages)
        assert len(twins[0].policy) == len(twins[1].policy)
    order = [[], []]
    for t, out in zip(twins, order, strict=True):
        while (page := t.policy.victim()) is not None:
            out.append(page.slot)
    assert order[0] == order[1]


# ---------------------------------------------------------------- through real Namespaces


def _namespace(policy: str) -> Namespace:
    spec = NamespaceSpec("p", 1, 1, 1, "uint8", 1, 24, policy=policy)
    pool = ShmPool.create(f"kvstest-{os.getpid()}-{uuid.uuid4().hex[:8]}", PAGE_ALIGN)
    return Namespace(spec, pool, make_policy(policy))


def _ns_state(ns: Namespace) -> tuple:
    return pages_state(ns), policy_state(ns.policy)


class NsTwin:
    """A Namespace driven by runs (`batched`) or one page at a time, as the store did."""

    def __init__(self, policy: str, batched: bool) -> None:
        self.ns = _namespace(policy)
        self.batched = batched
        self.held: list[list[Page]] = []  # each holder's chain of sealed pages, root first

    def put(self, chain: list[bytes]) -> bool:
        """A holder's chain: its cached prefix referenced, the rest reserved and sealed under
        it; False (nothing held) when the pool cannot make room."""
        ns = self.ns
        hits = []
        for h in chain:
            page = ns.index.get(h)
            if page is None:
                break
            hits.append(page)
        n = len(chain) - len(hits)
        if self.batched:
            page_runs.ref_all(ns, hits)
        else:
            for page in hits:
                ns.ref(page)
        if n > ns.obtainable():
            if self.batched:
                page_runs.unref_all(ns, hits[::-1])
            else:
                for page in reversed(hits):
                    ns.unref(page)
            return False
        ns.make_room(n, "test")
        new = ns.reserve_many(1, n) if self.batched else [ns.reserve(1) for _ in range(n)]
        for page, h in zip(new, chain[len(hits) :], strict=True):
            page.block_hash = h
        parent = hits[-1] if hits else None
        if self.batched:
            ns.seal_run(new, parent)
        else:
            for page in new:
                ns.seal(page, parent)
                parent = page
        self.held.append(hits + new)
        return True

    def release(self, i: int) -> None:
        pages = self.held.pop(i % len(self.held))
        if self.batched:
            page_runs.let_go(self.ns, pages)
        else:
            for page in reversed(pages):
                self.ns.unref(page)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("seed", [1, 2])
def test_a_namespace_moved_in_runs_is_the_one_moved_a_page_at_a_time(policy, seed) -> None:
    twins = [NsTwin(policy, batched) for batched in (True, False)]
    try:
        rng = random.Random(seed)
        for _ in range(150):
            if rng.random() < 0.6 or not twins[0].held:
                chain = [b"c%d" % rng.randrange(3)]  # prompts share prefixes
                for _ in range(rng.randrange(0, 6)):
                    chain.append(chain[-1] + b".%d" % rng.randrange(2))
                out = [t.put(chain) for t in twins]
                assert out[0] == out[1]
            else:
                i = rng.randrange(8)
                for t in twins:
                    t.release(i)
            assert _ns_state(twins[0].ns) == _ns_state(twins[1].ns)
        victims = []
        for t in twins:
            while t.held:
                t.release(0)
            order = []
            while (page := t.ns.policy.victim()) is not None:
                order.append(page.slot)
                t.ns.drop(page)
            victims.append(order)
        assert victims[0] == victims[1] and victims[0]
    finally:
        for t in twins:
            t.ns.pool.close()


# ---------------------------------------------------------------- the passes in C


def test_the_extension_is_built() -> None:
    assert page_runs.ref_run is not page_runs.py_ref_run  # (else the twins compare Python to itself)
    assert page_runs.unref_run is not page_runs.py_unref_run


def _run_pages(rng: random.Random) -> list[Page]:
    """Pages in every state, refcounts 0-2, some with children (a set, empty or not)."""
    pages = []
    for slot in range(rng.randint(0, 12)):
        page = Page(slot)
        page.state = rng.choice([SEALED] * 6 + [RESERVED, FREE])
        page.refcount = rng.choice([0, 0, 1, 2, -1 if rng.random() < 0.05 else 0])
        page.children = rng.choice([None, set(), {Page(99)}])
        pages.append(page)
    return pages


def _fields(pages: list[Page]) -> list[tuple]:
    return [(p.slot, p.state, p.refcount, p.children) for p in pages]


@pytest.mark.parametrize("seed", range(5))
def test_ref_run_and_unref_run_match_their_references(seed: int) -> None:
    rng = random.Random(seed)
    stops = {"ref": 0, "unref": 0}
    for _ in range(300):
        pages = _run_pages(rng)
        twin = [Page(p.slot) for p in pages]
        for a, b in zip(pages, twin, strict=True):
            b.state, b.refcount, b.children = a.state, a.refcount, a.children
        if rng.random() < 0.5:
            ours, theirs = page_runs.ref_run(pages, SEALED), page_runs.py_ref_run(twin, SEALED)
            slots = ([p.slot for p in ours[0]], ours[1]), ([p.slot for p in theirs[0]], theirs[1])
            stops["ref"] += ours[1] >= 0
        else:
            ours, theirs = page_runs.unref_run(pages, SEALED), page_runs.py_unref_run(twin, SEALED)
            slots = (
                (ours[0], [p.slot for p in ours[1]], ours[2]),
                (theirs[0], [p.slot for p in theirs[1]], theirs[2]),
            )
            stops["unref"] += ours[2] >= 0
        assert slots[0] == slots[1]
        assert _fields(pages) == _fields(twin)
    assert min(stops.values()) > 20  # (the stops at a bad page were compared too)


def test_a_bad_page_in_a_run_raises_after_the_pages_before_it_are_moved() -> None:
    ns = _namespace("lru")
    try:
        pages = [ns.reserve(1) for _ in range(3)]
        for i, page in enumerate(pages):
            page.block_hash = b"r%d" % i
        ns.seal_run(pages[:2], None)  # the third stays reserved
        page_runs.unref_all(ns, [pages[1], pages[0]])  # (the sealer's references)
        assert ns.pages_pinned == 0 and ns.policy.victim() is pages[1]
        with pytest.raises(InvariantBroken, match="not sealed"):
            page_runs.ref_all(ns, pages)
        assert [p.refcount for p in pages] == [1, 1, 0] and ns.pages_pinned == 2
        assert ns.policy.victim() is None  # both held: the policy heard of them
        with pytest.raises(InvariantBroken, match="does not have"):
            page_runs.unref_all(ns, [pages[1], pages[0], pages[0]])
        assert [p.refcount for p in pages] == [0, 0, 0] and ns.pages_pinned == 0
        assert ns.policy.victim() is pages[1]  # the leaf is evictable again
    finally:
        ns.pool.close()


@pytest.mark.parametrize("seed", range(3))
def test_withdraw_all_matches_its_reference(seed: int) -> None:
    assert withdraw_all is not py_withdraw_all  # (else Python against itself)
    rng = random.Random(seed)
    for _ in range(200):
        states = [rng.choice([None, None, 0, 3, "x"]) for _ in range(rng.randint(0, 10))]
        ours, theirs = [Page(i) for i in range(len(states))], [Page(i) for i in range(len(states))]
        for a, b, state in zip(ours, theirs, states, strict=True):
            a.policy_state = b.policy_state = state
        assert withdraw_all(ours) == py_withdraw_all(theirs) == sum(s is not None for s in states)
        assert [p.policy_state for p in ours] == [p.policy_state for p in theirs] == [None] * len(states)


@pytest.mark.parametrize("run", ["ref_run", "unref_run"])
def test_a_pass_that_raises_leaves_every_refcount_as_it_was(run: str) -> None:
    """The C passes undo what they moved when they fail (there, out of memory; here, a
    refcount that is not an int), so a pin is never left half taken."""
    pages = [Page(slot) for slot in range(4)]
    for page in pages:
        page.state, page.refcount = SEALED, 1
    pages[2].refcount = "one"  # type: ignore[assignment]
    with pytest.raises(TypeError):
        getattr(page_runs, run)(pages, SEALED)
    assert [p.refcount for p in pages] == [1, 1, "one", 1]
