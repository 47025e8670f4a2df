"""Horizon: LRU with an adaptive reuse horizon, designed for prefix caches. O(log n) per op.

On prefix-cache traces most blocks are seen once (a prompt's private part) and much of the
reuse that does come — the next question on a shared document, a conversation resumed —
comes many requests later, after LRU has already evicted the block. A block reused once is
far more likely to be reused again than a new one, but "reused once" has to be remembered
across evictions, because that first reuse itself comes late. So:

- a **ghost history** keeps the access counts (one, or two-or-more: all that is asked of
  them) of the last `MAX_HORIZON x capacity` evicted block hashes (a bounded FIFO, O(1)); a
  block sealed again while its hash is remembered gets its old count back instead of
  starting from one;
- a block with two or more accesses is **protected**: its eviction key is its last access
  plus `horizon x capacity` clock ticks, as if it had been used that much later, while a
  new block (probation) competes on plain recency. A scan of up to horizon x capacity
  one-time blocks cannot flush the protected set, and a protected block that stops being
  used still ages out after `horizon` more cache turnovers: no frequency pinned forever;
- the **horizon adapts** (ARC-style, from the ghost): a ghost hit on a block evicted from
  probation means new blocks needed more room (horizon shrinks, towards plain LRU at 0);
  a ghost hit on a block evicted while protected means reused blocks needed more (it
  grows, up to MAX_HORIZON). Each step is 1/capacity of a turnover, scaled by how rare
  that kind of ghost is (ARC's ratio of ghost list sizes). So recency-dominated workloads
  (conversations that resume soon) settle near LRU, long-distance reuse near a large
  horizon. A key is fixed when the page is pushed, with the horizon of that moment.
- the store offers leaves only; a parent is accessed whenever its children are and is
  evicted after them, so its count is never below theirs and the ghost keeps it as long.

The clock is the namespace's (one tick per sealed page and per lookup), so one cache
turnover is about `capacity` ticks; capacity is the most pages the namespace has held.
Keys do not change between accesses, so a lazy-deletion heap orders the candidates:
O(log n) per operation; ghost lookups, inserts and the horizon update are O(1).
"""

from __future__ import annotations

from kvstore.memory.pages import Page
from kvstore.policy.base import register
from kvstore.policy.heap import Ghost, HeapPolicy

MAX_HORIZON = 4.0  # cache capacities: the ghost's size and the largest protection
START_HORIZON = 1.0


@register("horizon")
class Horizon(HeapPolicy):
    def __init__(self, max_horizon: float = MAX_HORIZON, horizon: float = START_HORIZON) -> None:
        super().__init__()
        self.max_horizon = max_horizon
        self.horizon = horizon  # in capacities
        # Slots of the resident pages accessed twice or more (counting the seal): what
        # "protected" asks. A count past two changes nothing here, so none is kept: a lookup's
        # hit is then one set update, not a dict increment a page.
        self._reused: set[int] = set()
        self._ghost = Ghost()  # evicted block hash -> its access count: 1, or 2 for "two or more"
        self._ghost_once = 0  # ghost entries of blocks evicted with a single access

    def key(self, page: Page) -> float:
        if page.slot in self._reused:
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
            if f == 1:  # evicted from probation, wanted again: give new blocks more room
                self._ghost_once -= 1
                self.horizon = max(0.0, self.horizon - step * max(1.0, many / max(1, once)))
            else:  # evicted while protected, wanted again: protect longer
                self.horizon = min(self.max_horizon, self.horizon + step * max(1.0, once / max(1, many)))
            self._reused.add(page.slot)  # (1 + f accesses)
        else:
            self._reused.discard(page.slot)

    def on_sealed_all(self, pages: list[Page]) -> None:
        ghost, reused, on_sealed = self._ghost, self._reused, self.on_sealed
        for page in pages:
            if ghost and page.block_hash in ghost:
                on_sealed(page)  # a remembered block: the horizon moves
                continue
            self.resident += 1  # on_sealed of a block the ghost does not hold, inlined
            if self.resident > self.peak:
                self.peak = self.resident
            reused.discard(page.slot)

    def on_access(self, page: Page) -> None:
        self._reused.add(page.slot)
        if page.policy_state is not None:
            self._push(page)

    def on_access_all(self, pages: list[Page]) -> None:
        # on_access, inlined: a lookup's whole hit. (A plain loop: CPython 3.11's specialized
        # slot reads beat set.update(map(attrgetter(...))), ~400 instructions a page.)
        add, push = self._reused.add, self._push
        for page in pages:
            add(page.slot)
            if page.policy_state is not None:
                push(page)

    def on_hit(self, pages: list[Page], slots: list[int], candidates: list[Page]) -> None:
        # on_access_all, from Namespace.touch's pass: a page's key reads only its own slot's
        # membership, so adding all the slots first pushes each candidate with the same key.
        self._reused.update(slots)
        push = self._push
        for page in candidates:
            push(page)

    def on_dropped(self, page: Page) -> None:
        self.resident -= 1
        f = 2 if page.slot in self._reused else 1
        self._reused.discard(page.slot)
        if f == 1:
            self._ghost_once += 1
        if self._ghost.add(page.block_hash, f, int(self.max_horizon * self.peak) + 1) == 1:
            self._ghost_once -= 1
