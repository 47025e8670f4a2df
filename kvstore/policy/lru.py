"""LRU, leaf-first: the least recently used evictable page goes first.

The store only offers leaves (pages nothing resident extends), so a parent is
never evicted before its children. A lookup stamps every page on its path
with the same clock value, so a parent is always at least as recent as its
children; ordering candidates by last access keeps "older first" true even
for a parent that becomes a leaf late. O(log n) per operation: a lazy-deletion
heap keyed by (last_access, slot); stale entries are skipped when popped.
"""

from __future__ import annotations

from kvstore.memory.pages import Page
from kvstore.policy.base import register
from kvstore.policy.heap import HeapPolicy


@register("lru")
class LRULeafFirst(HeapPolicy):
    def key(self, page: Page) -> int:
        return page.last_access

    def on_sealed_all(self, pages: list[Page]) -> None:
        self.resident += len(pages)  # on_sealed (HeapPolicy's: counts only), for all of them
        if self.resident > self.peak:
            self.peak = self.resident

    def on_access(self, page: Page) -> None:
        self._rekey(page)  # a candidate touched without a pin

    def on_access_all(self, pages: list[Page]) -> None:
        push = self._push  # _rekey, inlined: a lookup's whole hit
        for page in pages:
            if page.policy_state is not None:
                push(page)

    def on_hit(self, pages: list[Page], slots: list[int], candidates: list[Page]) -> None:
        push = self._push  # on_access_all, from Namespace.touch's pass
        for page in candidates:
            push(page)
