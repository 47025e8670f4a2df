"""Shared machinery of the policies: a lazy-deletion heap of candidates and a ghost history.

`HeapPolicy` keeps the evictable pages in a heap ordered by a key the subclass computes
(`key(page)`); a page's entry is valid while `page.policy_state` holds the entry's version,
so making a page unevictable, or re-keying it, is O(1) and stale entries are skipped when
popped (O(log n) amortised per operation). Entries are compacted when stale ones outnumber
live ones, so pin/unpin churn cannot grow the heap without bound. Per-page data a policy keeps
while the page is resident but not a candidate (a frequency, a queue) lives in its own dict
keyed by slot, cleared in `on_dropped`.

`Ghost` is a bounded FIFO of evicted block hashes with a small value each (an access count,
a list tag): O(1) insert, lookup and trim.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Any

from kvstore.memory.pages import Page
from kvstore.policy.base import EvictionPolicy


def py_withdraw_all(pages: list[Page]) -> int:
    """Each page that is a candidate (`policy_state` set) is one no more; how many were.
    kvstore/_pagetouch.c does the same in C; this is its fallback and its reference."""
    n = 0
    for page in pages:
        if page.policy_state is not None:
            page.policy_state = None
            n += 1
    return n


try:  # (absent where the extension is not built)
    from kvstore._chainhash import withdraw_all
except ImportError:
    withdraw_all = py_withdraw_all


class LazyHeap:
    """Pages by key, smallest first (ties by slot); an entry is live while the page's
    `policy_state` equals the entry's version (versions come from the owning policy)."""

    def __init__(self) -> None:
        self.entries: list[tuple[Any, int, int, Page]] = []

    def push(self, page: Page, key: Any, version: int, live: int) -> None:
        heapq.heappush(self.entries, (key, page.slot, version, page))
        if len(self.entries) > 2 * live + 1024:
            self.entries = [e for e in self.entries if e[3].policy_state == e[2]]
            heapq.heapify(self.entries)

    def peek(self) -> tuple[Any, Page] | None:
        entries = self.entries
        while entries:
            key, _, version, page = entries[0]
            if page.policy_state == version:
                return key, page
            heapq.heappop(entries)
        return None

    def pop(self) -> tuple[Any, Page] | None:
        entries = self.entries
        while entries:
            key, _, version, page = heapq.heappop(entries)
            if page.policy_state == version:
                return key, page
        return None


class HeapPolicy(EvictionPolicy):
    """Candidates in one lazy heap by `key(page)`, smallest first. `page.policy_state` is the
    version of the page's live entry while it is a candidate, None otherwise."""

    def __init__(self) -> None:
        self._heap = LazyHeap()
        self._version = 0  # bumps make older heap entries of a page stale
        self._count = 0
        self.resident = 0  # sealed pages (candidates or not)
        self.peak = 0  # most pages ever resident: the policy's view of the capacity

    def key(self, page: Page) -> Any:
        raise NotImplementedError

    def on_sealed(self, page: Page) -> None:
        self.resident += 1
        if self.resident > self.peak:
            self.peak = self.resident

    def on_dropped(self, page: Page) -> None:
        self.resident -= 1

    def on_evictable(self, page: Page) -> None:
        self._push(page)
        self._count += 1

    def on_evictable_all(self, pages: list[Page]) -> None:
        push = self._push
        for page in pages:
            push(page)
            self._count += 1

    def _rekey(self, page: Page) -> None:
        """The page's key changed: re-push it if it is a candidate."""
        if page.policy_state is not None:
            self._push(page)

    def _push(self, page: Page) -> None:
        # The hot path of every policy: LazyHeap.push inlined.
        self._version = version = self._version + 1
        page.policy_state = version
        entries = self._heap.entries
        heapq.heappush(entries, (self.key(page), page.slot, version, page))
        if len(entries) > 2 * self._count + 1024:
            self._heap.entries = [e for e in entries if e[3].policy_state == e[2]]
            heapq.heapify(self._heap.entries)

    def on_unevictable(self, page: Page) -> None:
        if page.policy_state is not None:
            page.policy_state = None
            self._count -= 1

    def on_unevictable_all(self, pages: list[Page]) -> None:
        self._count -= withdraw_all(pages)  # on_unevictable of each, in one pass: a pin's whole hit

    def _pop(self) -> tuple[Any, Page] | None:
        popped = self._heap.pop()
        if popped is not None:
            popped[1].policy_state = None
            self._count -= 1
        return popped

    def victim(self) -> Page | None:
        popped = self._pop()
        return None if popped is None else popped[1]

    def __len__(self) -> int:
        return self._count


class Ghost(OrderedDict[bytes, Any]):
    """Block hashes of evicted pages with a value each, oldest first; `pop(hash, default)`
    and `in` are OrderedDict's."""

    def add(self, block_hash: bytes, value: Any, limit: int) -> Any:
        """Remember `block_hash`; returns the value of the oldest entry dropped to stay within
        `limit` (limits only grow, so at most one), or None."""
        if block_hash in self:
            del self[block_hash]
        self[block_hash] = value
        if len(self) > limit:
            return self.popitem(last=False)[1]
        return None
