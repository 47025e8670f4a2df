"""Horizon keeps whether a block was accessed twice or more, not how often (a set, so a
lookup's hit is one set update): the same evictions, horizon and ghost decisions as the
counting version it replaced, checked on twin namespaces under random prefix requests."""

from __future__ import annotations

import random

import pytest
from test_policies import NS

from kvstore.memory.pages import Page
from kvstore.policy.heap import Ghost, HeapPolicy
from kvstore.policy.horizon import MAX_HORIZON, START_HORIZON
from kvstore.store.namespace import Namespace


class CountingHorizon(HeapPolicy):
    """kvstore/policy/horizon.py as it was before the set (25b4eda): access counts per slot."""

    def __init__(self) -> None:
        super().__init__()
        self.max_horizon, self.horizon = MAX_HORIZON, START_HORIZON
        self._freq: dict[int, int] = {}
        self._ghost = Ghost()
        self._ghost_once = 0

    def key(self, page: Page) -> float:
        if self._freq[page.slot] >= 2:
            return page.last_access + self.horizon * self.peak
        return page.last_access

    def on_sealed(self, page: Page) -> None:
        self.resident += 1
        if self.resident > self.peak:
            self.peak = self.resident
        f = self._ghost.pop(page.block_hash, 0)
        if f:
            once = self._ghost_once
            many = len(self._ghost) + 1 - once
            step = 1.0 / self.peak
            if f == 1:
                self._ghost_once -= 1
                self.horizon = max(0.0, self.horizon - step * max(1.0, many / max(1, once)))
            else:
                self.horizon = min(self.max_horizon, self.horizon + step * max(1.0, once / max(1, many)))
        self._freq[page.slot] = 1 + f

    def on_access(self, page: Page) -> None:
        self._freq[page.slot] += 1
        if page.policy_state is not None:
            self._push(page)

    def on_dropped(self, page: Page) -> None:
        self.resident -= 1
        f = self._freq.pop(page.slot)
        if f == 1:
            self._ghost_once += 1
        if self._ghost.add(page.block_hash, f, int(self.max_horizon * self.peak) + 1) == 1:
            self._ghost_once -= 1


def counting(pages: int) -> NS:
    twin = NS("horizon", pages)
    twin.ns = Namespace(twin.ns.spec, twin.pool, CountingHorizon())
    twin.policy = twin.ns.policy
    return twin


@pytest.mark.parametrize("seed", range(4))
def test_horizon_decides_as_the_counting_version_did(seed: int) -> None:
    rng = random.Random(seed)
    pages = 12
    ours, theirs = NS("horizon", pages), counting(pages)
    try:
        # Chains over a small tree of blocks (shared prefixes), reused with a skew.
        chains = [[f"{r}{i}" for i in range(rng.randint(1, 5))] for r in "abcdefghij"]
        for step in range(1500):
            chain = chains[min(int(rng.expovariate(0.4)), len(chains) - 1)]
            names = chain[: rng.randint(1, len(chain))]
            assert ours.request(*names) == theirs.request(*names), step
            if rng.random() < 0.1:
                n = rng.randint(1, 3)
                if len(ours.resident()) >= n:
                    assert ours.evict(n) == theirs.evict(n), step
            assert ours.resident() == theirs.resident(), step
            assert ours.policy.horizon == theirs.policy.horizon, step
        assert ours.policy.horizon != START_HORIZON  # the ghost moved it: the test saw both kinds
    finally:
        ours.pool.close()
        theirs.pool.close()
