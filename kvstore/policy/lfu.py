"""LFU with dynamic aging (LFU-DA), leaf-first.

Each resident page has a priority K = L + f, where f counts its accesses while resident
(the seal is the first) and L is the cache's age: the priority of the last victim. The
candidate with the smallest K goes first (ties: least recently used). A page that was
popular long ago keeps its old K while new accesses are scored against a risen L, so old
frequency ages out instead of pinning the cache forever. A parent is accessed whenever a
child is, so its K is never below its children's. O(log n) per operation (lazy heap).
"""

from __future__ import annotations

from kvstore.memory.pages import Page
from kvstore.policy.base import register
from kvstore.policy.heap import HeapPolicy


@register("lfu")
class LFUAging(HeapPolicy):
    def __init__(self) -> None:
        super().__init__()
        self._freq: dict[int, int] = {}  # slot -> accesses while resident
        self._prio: dict[int, int] = {}  # slot -> K at the last access
        self.age = 0  # L

    def key(self, page: Page) -> tuple[int, int]:
        return self._prio[page.slot], page.last_access

    def on_sealed(self, page: Page) -> None:
        super().on_sealed(page)
        self._freq[page.slot] = 1
        self._prio[page.slot] = self.age + 1

    def on_access(self, page: Page) -> None:
        f = self._freq.get(page.slot, 0) + 1
        self._freq[page.slot] = f
        self._prio[page.slot] = self.age + f
        self._rekey(page)

    def on_dropped(self, page: Page) -> None:
        super().on_dropped(page)
        self._freq.pop(page.slot, None)
        self._prio.pop(page.slot, None)

    def victim(self) -> Page | None:
        popped = self._pop()
        if popped is None:
            return None
        (prio, _), page = popped
        self.age = max(self.age, prio)
        return page
