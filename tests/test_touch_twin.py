"""A lookup hit's pass over its pages in C (kvstore/_pagetouch.c: last_access, slots and the
eviction candidates in one pass, then the policy's on_hit) decides as the Python loops it
replaced (touch's loop, the policy's on_access_all, the reply's slot list): twin namespaces,
one touching the old way, under random prefix requests, hits unpinned and pinned, for
every policy; same pages, heap entries, policy fields, evictions and slots."""

from __future__ import annotations

import random

import pytest
from test_policies import NS
from twin_state import pages_state, policy_state

from kvstore.memory.pages import Page, py_touch_pages, touch_pages
from kvstore.policy import make_policy
from kvstore.store.namespace import Namespace


class OldTouch(Namespace):
    """Namespace.touch as it was before the pass (4e0350d)."""

    def touch(self, pages: list[Page]) -> list[int]:
        self.clock = clock = self.clock + 1
        for page in pages:
            page.last_access = clock
        self.policy.on_access_all(pages)
        return [page.slot for page in pages]


def lookup(twin: NS, names: list[str], pin: bool) -> list[int]:
    """A lookup's hit, touched unpinned (the candidates re-keyed) or under a pin."""
    ns, held = twin.ns, []
    for name in names:
        page = ns.index.get(name.encode())
        if page is None:
            break
        held.append(page)
    if not held:
        return []
    if pin:
        for page in held:
            ns.ref(page)
    slots = ns.touch(held)
    if pin:
        for page in reversed(held):
            ns.unref(page)
    return slots


def test_the_extension_is_built():
    assert touch_pages is not py_touch_pages  # (else the twins below compare Python to itself)


@pytest.mark.parametrize("policy", ["horizon", "lru", "lfu", "arc", "s3fifo"])
@pytest.mark.parametrize("seed", range(2))
def test_touch_decides_as_the_python_loops_did(policy: str, seed: int) -> None:
    rng = random.Random(seed)
    pages = 12
    ours, theirs = NS(policy, pages), NS(policy, pages)
    theirs.ns = OldTouch(theirs.ns.spec, theirs.pool, make_policy(policy))
    theirs.policy = theirs.ns.policy
    try:
        chains = [[f"{r}{i}" for i in range(rng.randint(1, 5))] for r in "abcdefghij"]
        for step in range(800):
            chain = chains[min(int(rng.expovariate(0.4)), len(chains) - 1)]
            names = chain[: rng.randint(1, len(chain))]
            if rng.random() < 0.5:
                pin = rng.random() < 0.3
                assert lookup(ours, names, pin) == lookup(theirs, names, pin), step
            else:
                assert ours.request(*names) == theirs.request(*names), step
            if rng.random() < 0.1:
                n = rng.randint(1, 3)
                if len(ours.resident()) >= n:
                    assert ours.evict(n) == theirs.evict(n), step
            assert pages_state(ours.ns) == pages_state(theirs.ns), step
            assert policy_state(ours.policy) == policy_state(theirs.policy), step
    finally:
        ours.pool.close()
        theirs.pool.close()


def test_c_pass_matches_its_python_reference():
    pages = [Page(s) for s in (5, 0, 7, 3)]
    pages[1].policy_state = 4
    pages[3].policy_state = 9
    twins = [Page(p.slot) for p in pages]
    for a, b in zip(pages, twins, strict=True):
        b.policy_state = a.policy_state
    slots, candidates = touch_pages(pages, 42)
    py_slots, py_candidates = py_touch_pages(twins, 42)
    assert slots == py_slots == [5, 0, 7, 3]
    assert candidates == [pages[1], pages[3]] and py_candidates == [twins[1], twins[3]]
    assert [p.last_access for p in pages] == [42] * 4
    assert touch_pages([], 1) == ([], [])


def test_c_pass_refuses_what_is_not_a_page():
    class NotAPage:
        last_access, slot, policy_state = 0, 1, None  # (class attributes, not __slots__ fields)

    with pytest.raises(TypeError, match="__slots__"):
        touch_pages([NotAPage()], 1)
    assert touch_pages([Page(2)], 3) == ([2], [])  # (and it still knows Page afterwards)
