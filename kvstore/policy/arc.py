"""ARC-style (Adaptive Replacement Cache), leaf-first.

Resident pages are in T1 (seen once while resident) or T2 (hit again, or re-sealed while
its hash was in a ghost list). Evicted hashes go to ghost lists B1 (from T1) and B2 (from
T2), each bounded by c, the most pages the namespace has held (its capacity once full).
Re-sealing a hash found in B1 grows the target size p of T1 (recency was evicted too
early); one found in B2 shrinks it. The victim is the least recently used candidate of T1
when |T1| > p (or T2 has no candidate), else of T2. Only candidates (sealed, unpinned
leaves) are considered, so a list with no candidate yields to the other. O(log n) per
operation: one lazy heap by last access per list, O(1) ghosts.
"""

from __future__ import annotations

from kvstore.memory.pages import Page
from kvstore.policy.base import register
from kvstore.policy.heap import Ghost, HeapPolicy, LazyHeap


@register("arc")
class ARC(HeapPolicy):
    def __init__(self) -> None:
        super().__init__()
        self._in_t2: dict[int, bool] = {}  # slot -> in T2
        self._heaps = (LazyHeap(), LazyHeap())  # candidates of T1, of T2
        self._sizes = [0, 0]  # resident pages in T1, T2
        self._ghosts = (Ghost(), Ghost())  # B1, B2
        self.p = 0.0  # target size of T1

    def key(self, page: Page) -> int:
        return page.last_access

    def _push(self, page: Page) -> None:
        self._version += 1
        page.policy_state = self._version
        t2 = self._in_t2[page.slot]
        self._heaps[t2].push(page, page.last_access, self._version, self._count)

    def on_sealed(self, page: Page) -> None:
        super().on_sealed(page)
        b1, b2 = self._ghosts
        c = self.peak
        if b1.pop(page.block_hash, False):
            self.p = min(c, self.p + max(1.0, len(b2) / max(1, len(b1))))
            t2 = True
        elif b2.pop(page.block_hash, False):
            self.p = max(0.0, self.p - max(1.0, len(b1) / max(1, len(b2))))
            t2 = True
        else:
            t2 = False
        self._in_t2[page.slot] = t2
        self._sizes[t2] += 1

    def on_access(self, page: Page) -> None:
        if not self._in_t2.get(page.slot, True):
            self._in_t2[page.slot] = True
            self._sizes[0] -= 1
            self._sizes[1] += 1
        self._rekey(page)

    def on_dropped(self, page: Page) -> None:
        super().on_dropped(page)
        t2 = self._in_t2.pop(page.slot)
        self._sizes[t2] -= 1
        if page.block_hash is not None:
            self._ghosts[t2].add(page.block_hash, True, max(1, self.peak))

    def victim(self) -> Page | None:
        first = 0 if self._sizes[0] > self.p else 1
        popped = self._heaps[first].pop() or self._heaps[1 - first].pop()
        if popped is None:
            return None
        page = popped[1]
        page.policy_state = None
        self._count -= 1
        return page
