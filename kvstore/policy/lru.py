"""LRU, leaf-first: the least recently used evictable page goes first.

The store only offers leaves (pages nothing resident extends), so a parent is
never evicted before its children. A lookup stamps every page on its path
with the same clock value, so a parent is always at least as recent as its
children; ordering candidates by last access keeps "older first" true even
for a parent that becomes a leaf late. O(log n) per operation: a lazy-deletion
heap keyed by (last_access, slot); stale entries are skipped when popped.
"""

from __future__ import annotations

import heapq

from kvstore.memory.pages import Page
from kvstore.policy.base import EvictionPolicy, register


@register("lru")
class LRULeafFirst(EvictionPolicy):
    def __init__(self) -> None:
        self._heap: list[tuple[int, int, int, Page]] = []
        self._version = 0  # bumps make older heap entries of a page stale
        self._count = 0

    def on_evictable(self, page: Page) -> None:
        self._push(page)
        self._count += 1

    def on_access(self, page: Page) -> None:
        if page.policy_state is not None:  # a candidate touched without a pin: re-key it
            self._push(page)

    def _push(self, page: Page) -> None:
        self._version += 1
        page.policy_state = self._version
        heapq.heappush(self._heap, (page.last_access, page.slot, self._version, page))
        if len(self._heap) > 2 * self._count + 1024:
            # Drop stale entries so pin/unpin churn cannot grow the heap without bound.
            self._heap = [e for e in self._heap if e[3].policy_state == e[2]]
            heapq.heapify(self._heap)

    def on_unevictable(self, page: Page) -> None:
        if page.policy_state is not None:
            page.policy_state = None
            self._count -= 1

    def victim(self) -> Page | None:
        while self._heap:
            _, _, version, page = heapq.heappop(self._heap)
            if page.policy_state == version:
                page.policy_state = None
                self._count -= 1
                return page
        return None

    def __len__(self) -> int:
        return self._count
