"""Eviction policies through a real Namespace (page table, prefix index, pins, leaf-first):
the exact eviction order of each policy on small hand-made sequences, and a randomized
check that every policy only proposes pages the store offered and has not taken back."""

from __future__ import annotations

import contextlib
import os
import random
import uuid
from collections.abc import Iterator

import pytest

from kvstore.errors import ResourceExhausted
from kvstore.memory.pages import Page
from kvstore.memory.shm_pool import ShmPool
from kvstore.policy import make_policy, policy_names
from kvstore.store.namespace import Namespace
from kvstore.store.types import PAGE_ALIGN, NamespaceSpec


class NS:
    """A real Namespace driven the way the store drives it, blocks named by strings."""

    def __init__(self, policy: str, pages: int) -> None:
        spec = NamespaceSpec("p", 1, 1, 1, "uint8", 1, pages, policy=policy)
        self.pool = ShmPool.create(f"kvstest-{os.getpid()}-{uuid.uuid4().hex[:8]}", PAGE_ALIGN)
        self.ns = Namespace(spec, self.pool, make_policy(policy))
        self.policy = self.ns.policy
        self.page: dict[str, Page] = {}

    def request(self, *names: str) -> int:
        """One request over a chain of blocks (root first): hits up to the first miss are
        pinned and touched, missing blocks are made room for and sealed, all unpinned at the
        end. Returns the number of hits."""
        ns = self.ns
        held = []
        for name in names:
            page = ns.index.get(name.encode())
            if page is None:
                break
            held.append(page)
        hits = len(held)
        for page in held:
            ns.ref(page)
        if held:
            ns.touch(held)
        try:
            ns.make_room(len(names) - hits, "test")
        except ResourceExhausted:
            for page in held:
                ns.unref(page)
            raise
        for name in names[hits:]:
            page = ns.reserve(1)
            page.block_hash = name.encode()
            ns.seal(page, held[-1] if held else None)
            self.page[name] = page
            held.append(page)
        for page in reversed(held):
            ns.unref(page)
        return hits

    def evict(self, n: int) -> list[str]:
        out = []
        for _ in range(n):
            victim = self.policy.victim()
            assert victim is not None, f"no victim after {out}"
            out.append(victim.block_hash.decode())
            self.ns.drop(victim)
        return out

    def resident(self) -> set[str]:
        return {p.block_hash.decode() for p in self.ns.pages.pages if p.block_hash is not None}


@pytest.fixture
def make() -> Iterator:
    made: list[NS] = []

    def factory(policy: str, pages: int = 8) -> NS:
        ns = NS(policy, pages)
        made.append(ns)
        return ns

    yield factory
    for ns in made:
        ns.pool.close()


def test_every_policy_is_registered():
    assert set(policy_names()) >= {"lru", "lfu", "arc", "s3fifo", "horizon"}


@pytest.mark.parametrize("policy", ["lru", "lfu", "arc", "s3fifo", "horizon"])
def test_leaves_first_and_pinned_pages_never_go(make, policy):
    c = make(policy)
    c.request("a", "b", "c")  # one chain a <- b <- c
    c.request("x")
    pin = c.page["x"]
    c.ns.ref(pin)
    assert c.evict(3) == ["c", "b", "a"]  # the chain from its leaf; x is pinned
    assert c.policy.victim() is None and len(c.policy) == 0
    c.ns.unref(pin)
    assert c.evict(1) == ["x"]


def test_lru_order(make):
    c = make("lru")
    for name in "ABC":
        c.request(name)
    c.request("A")  # A is now the most recent
    assert c.evict(3) == ["B", "C", "A"]


def test_lfu_with_aging_order(make):
    c = make("lfu")
    for name in "ABC":
        c.request(name)
    c.request("A")
    c.request("A")
    c.request("C")  # K: A = 0 + 3, B = 0 + 1, C = 0 + 2
    assert c.evict(1) == ["B"]  # the age L becomes 1
    c.request("D")  # K = L + 1 = 2: ties with C, which is older
    assert c.evict(3) == ["C", "D", "A"]
    assert c.policy.age == 3


def test_arc_order_and_ghost_adaptation(make):
    c = make("arc")
    for name in "ABC":
        c.request(name)  # T1 = A B C
    c.request("A")  # A moves to T2
    assert c.policy.p == 0
    assert c.evict(1) == ["B"]  # |T1| = 2 > p: T1's LRU; B into ghost B1
    c.request("B")  # a B1 hit: p grows by 1, B enters T2
    assert c.policy.p == 1
    c.request("D")  # T1 = C D, T2 = A B
    assert c.evict(1) == ["C"]  # |T1| = 2 > p = 1
    assert c.evict(1) == ["A"]  # |T1| = 1, not > p: T2's LRU
    assert c.evict(2) == ["B", "D"]  # |T1| = 1 = p: T2 first, then T1 (T2 empty)


def test_s3fifo_order_promotion_and_ghost(make):
    c = make("s3fifo")
    for name in "ABCD":
        c.request(name)  # all into S
    c.request("B")  # B's counter = 1
    assert c.evict(2) == ["A", "C"]  # S's head A goes (to G); B hit in S -> M; then C
    c.request("A")  # A's hash is in G: it starts in M
    # S = D, M = B A (insertion order): S holds >= 10% of the pages, so D first; then M.
    assert c.evict(3) == ["D", "B", "A"]


def test_s3fifo_main_queue_gives_a_second_chance(make):
    c = make("s3fifo")
    c.request("A")
    c.request("A")  # A hit while in S
    c.request("B")
    c.request("C")
    assert c.evict(1) == ["B"]  # A (hit) moves from S to M; B, unhit, goes
    c.request("A")  # hit in M: counter 1
    assert c.evict(1) == ["C"]  # S still first (1 of 2 pages >= 10%)
    c.request("E")
    c.request("F")
    # S = E F; M = A (counter 1). S's head first while S holds >= 10%.
    assert c.evict(3) == ["E", "F", "A"]


def warm_horizon(make) -> NS:
    """A 4-page horizon namespace that has been full once (its capacity estimate is 4) and
    whose ghost remembers W X Y Z, seen once each."""
    c = make("horizon", pages=4)
    for name in "WXYZ":
        c.request(name)
    assert c.evict(4) == ["W", "X", "Y", "Z"]
    assert c.policy.peak == 4 and c.policy.horizon == 1.0
    return c


def test_horizon_protects_reused_blocks_past_newer_one_time_blocks(make):
    c = warm_horizon(make)
    c.request("A")
    c.request("A")  # two accesses: protected, key = last access + 1.0 x 4 pages of clock
    for name in "BCD":
        c.request(name)  # probation, newer than A
    assert c.evict(4) == ["B", "C", "D", "A"]  # LRU would evict A first


def test_horizon_ghost_restores_counts_and_adapts(make):
    c = warm_horizon(make)
    c.request("A")
    c.request("A")
    for name in "BCD":
        c.request(name)
    c.evict(4)  # ghost: W X Y Z B C D (one access each), A (two)
    c.request("A")  # a ghost hit of a block evicted while protected: the horizon grows
    # by 1/peak x max(1, once/many) = 1/4 x 7/1
    assert c.policy.horizon == pytest.approx(1.0 + 7 / 4)
    c.request("E")
    c.request("F")
    assert c.evict(1) == ["E"]  # A came back protected (count 3), so new blocks go first
    before = c.policy.horizon
    c.request("B")  # a ghost hit of a block evicted from probation: it shrinks
    assert c.policy.horizon == pytest.approx(before - 1 / 4)  # 1/peak x max(1, many/once)
    # B came back with its count (2): protected as well, keyed 2.5 x 4 after its seal,
    # which is later than A's key (its seal + 2.75 x 4); F is on probation.
    assert c.evict(3) == ["F", "A", "B"]


@pytest.mark.parametrize("policy", ["lru", "lfu", "arc", "s3fifo", "horizon"])
@pytest.mark.parametrize("seed", range(3))
def test_victims_are_only_offered_candidates(make, policy, seed):
    """Random requests, pins and evictions: each victim was offered (on_evictable) and not
    withdrawn since (on_unevictable), and is evictable now; len() counts the candidates."""
    rng = random.Random(seed)
    c = make(policy, pages=24)
    ns, pol = c.ns, c.policy
    offered: set[int] = set()
    real_on, real_off = pol.on_evictable, pol.on_unevictable

    def on_evictable(page: Page) -> None:
        assert page.evictable
        offered.add(page.slot)
        real_on(page)

    def on_unevictable(page: Page) -> None:
        offered.discard(page.slot)
        real_off(page)

    pol.on_evictable, pol.on_unevictable = on_evictable, on_unevictable
    pinned: list[Page] = []
    roots = [f"r{i}" for i in range(6)]
    for _ in range(400):
        op = rng.random()
        if op < 0.6:
            chain = [rng.choice(roots)]
            for depth in range(rng.randint(0, 5)):
                chain.append(f"{chain[-1]}.{rng.randint(0, 2 if depth < 2 else 9)}")
            with contextlib.suppress(ResourceExhausted):  # pinned leaves can block their parents
                c.request(*chain)
        elif op < 0.75 and len(ns.index):
            page = rng.choice(
                [p for p in ns.pages.pages if p.block_hash is not None and p.state.name == "SEALED"]
            )
            ns.ref(page)
            pinned.append(page)
        elif op < 0.9 and pinned:
            ns.unref(pinned.pop(rng.randrange(len(pinned))))
        else:
            for _ in range(rng.randint(1, 4)):
                victim = pol.victim()
                if victim is None:
                    assert not offered and len(pol) == 0
                    break
                assert victim.slot in offered, f"{policy} proposed {victim}, never offered or withdrawn"
                assert victim.evictable
                offered.discard(victim.slot)
                ns.drop(victim)
        assert len(pol) == len(offered) == sum(p.evictable for p in ns.pages.pages)
