"""S3-FIFO-style (Yang et al., SOSP'23), leaf-first.

Three FIFO queues: S (small, ~10% of the pages) takes new pages, M (main) takes pages that
proved themselves, G (ghost) remembers the hashes of pages evicted from S, bounded by the
capacity c (the most pages the namespace has held). A hit only sets a 2-bit counter
(no reordering). Eviction: while S holds at least 10% of the resident pages, its oldest
candidate goes to M if it was hit while in S, else it is evicted (its hash into G);
otherwise M's oldest candidate is reinserted at M's head with its counter decremented if
the counter is non-zero, else evicted. A page re-sealed while its hash is in G starts in M.
Queues order candidates only (sealed, unpinned leaves); a queue with no candidate yields to
the other. O(log n) amortised per operation: one lazy heap by insertion number per queue
(each reinsertion spends a counter unit), O(1) ghost.
"""

from __future__ import annotations

from kvstore.memory.pages import Page
from kvstore.policy.base import register
from kvstore.policy.heap import Ghost, HeapPolicy, LazyHeap

SMALL_FRACTION = 0.1
MAX_FREQ = 3


@register("s3fifo")
class S3FIFO(HeapPolicy):
    def __init__(self) -> None:
        super().__init__()
        self._main: dict[int, bool] = {}  # slot -> in M (else S)
        self._freq: dict[int, int] = {}  # slot -> hits since insertion, capped at MAX_FREQ
        self._seq: dict[int, int] = {}  # slot -> insertion number into its queue
        self._inserted = 0
        self._heaps = (LazyHeap(), LazyHeap())  # candidates of S, of M, by insertion number
        self._sizes = [0, 0]  # resident pages in S, M
        self._ghost = Ghost()

    def key(self, page: Page) -> int:
        return self._seq[page.slot]

    def _push(self, page: Page) -> None:
        self._version += 1
        page.policy_state = self._version
        self._heaps[self._main[page.slot]].push(page, self._seq[page.slot], self._version, self._count)

    def _insert(self, page: Page, main: bool) -> None:
        self._inserted += 1
        self._seq[page.slot] = self._inserted
        self._main[page.slot] = main

    def on_sealed(self, page: Page) -> None:
        super().on_sealed(page)
        main = bool(self._ghost.pop(page.block_hash, False))
        self._insert(page, main)
        self._freq[page.slot] = 0
        self._sizes[main] += 1

    def on_access(self, page: Page) -> None:
        slot = page.slot
        self._freq[slot] = min(MAX_FREQ, self._freq.get(slot, 0) + 1)

    def on_dropped(self, page: Page) -> None:
        super().on_dropped(page)
        slot = page.slot
        main = self._main.pop(slot)
        self._sizes[main] -= 1
        del self._freq[slot], self._seq[slot]
        if not main and page.block_hash is not None:
            self._ghost.add(page.block_hash, True, max(1, self.peak))

    def victim(self) -> Page | None:
        small, main = self._heaps
        while True:
            use_small = self._sizes[0] >= SMALL_FRACTION * self.resident
            popped = (small.pop() or main.pop()) if use_small else (main.pop() or small.pop())
            if popped is None:
                return None
            page = popped[1]
            slot = page.slot
            if self._freq[slot] > 0:
                if not self._main[slot]:  # hit while in S: promote to M
                    self._sizes[0] -= 1
                    self._sizes[1] += 1
                    self._freq[slot] = 0
                else:
                    self._freq[slot] -= 1
                self._insert(page, True)
                self._push(page)  # still a candidate
                continue
            page.policy_state = None
            self._count -= 1
            return page
