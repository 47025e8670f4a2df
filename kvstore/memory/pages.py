"""Page metadata and the intrusive free list (the list lives on the pages).

One `Page` per pool slot, created once at start; taking and freeing pages allocates no
Python objects but the (time, page) entry of a page freed dirty (`PageTable.freed`). All of
it is loop-owned: only kvstore/store mutates it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from enum import IntEnum
from time import monotonic

from kvstore.errors import InvariantBroken


class PageState(IntEnum):
    FREE = 0  # on the free list, content meaningless
    RESERVED = 1  # owned by one sequence, writable by its client, invisible to lookups
    SEALED = 2  # immutable, indexed by block_hash, shared through refcounts


# The members as plain names for the hot paths: `PageState.X` is looked up through the slot
# that EnumType's __getattr__ installs, ~20x a plain attribute's cost on Python 3.11, and
# every page move tests states a few times.
FREE, RESERVED, SEALED = PageState.FREE, PageState.RESERVED, PageState.SEALED


class Page:
    """Metadata of one pool page. `prev`/`next` belong to the FreeList only."""

    __slots__ = (
        "block_hash",
        "checksum",
        "children",
        "dirty",
        "last_access",
        "next",
        "owner",
        "parent",
        "policy_state",
        "prev",
        "refcount",
        "slot",
        "state",
        "verified",
        "writer",
        "zeroing",
    )

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.state = FREE
        self.refcount = 0  # SEALED: holders (sequences and pins); 0 = unpinned
        self.block_hash: bytes | None = None  # set once the page is full (RESERVED) and while SEALED
        self.parent: Page | None = None  # SEALED: the page this one extends (None at the root)
        self.children: set[Page] | None = None  # SEALED: resident pages that extend this one
        self.owner = 0  # RESERVED: sequence id that may write it
        self.last_access = 0  # logical clock of the last hit or seal
        self.policy_state: object = None  # owned by the namespace's eviction policy
        # SEALED pages brought up from a tier: (PageMeta, checksum) their bytes verified
        # against, so copying them down again needs no new checksum (kvstore/store/tiering/tiers.py).
        self.verified: object = None
        # Integrity (kvstore/store/integrity.py): SEALED: the checksum of its bytes (an int),
        # a marker while it is being computed, or page_sums.CORRUPT; None: none.
        self.checksum: object = None
        self.writer = 0  # SEALED: the session that sealed it (0: promoted from below)
        # FREE: bytes of a previous occupant, not yet zeroed; `zeroing`: the batch zeroing it
        # off the loop now (taking the page waits for that batch first).
        self.dirty = False
        self.zeroing: object = None
        self.prev: Page | None = None
        self.next: Page | None = None

    @property
    def is_leaf(self) -> bool:
        return not self.children

    @property
    def evictable(self) -> bool:
        """Sealed, pinned by nobody, and nothing resident extends it (leaf-first)."""
        return self.state is SEALED and self.refcount == 0 and not self.children

    def __repr__(self) -> str:
        return f"Page(slot={self.slot}, {self.state.name}, ref={self.refcount})"


class FreeList:
    """Doubly linked list of FREE pages with sentinels: O(1) pop, push and remove."""

    def __init__(self, pages: list[Page]) -> None:
        self._head = Page(-1)
        self._tail = Page(-1)
        self._head.next = self._tail
        self._tail.prev = self._head
        self._len = 0
        for page in pages:
            self.push(page)

    def __len__(self) -> int:
        return self._len

    def push(self, page: Page) -> None:
        last = self._tail.prev
        if page.prev is not None or page.next is not None or last is None:
            raise InvariantBroken(f"{page} is already linked")
        last.next = page
        page.prev = last
        page.next = self._tail
        self._tail.prev = page
        self._len += 1

    def push_front(self, page: Page) -> None:
        """Link a FREE page first (a page zeroed off the loop: taken before dirty ones)."""
        first = self._head.next
        if page.prev is not None or page.next is not None or first is None:
            raise InvariantBroken(f"{page} is already linked")
        self._head.next = page
        page.prev = self._head
        page.next = first
        first.prev = page
        self._len += 1

    def pop(self) -> Page | None:
        first = self._head.next
        if first is self._tail or first is None:
            return None
        self.remove(first)
        return first

    def pop_many(self, n: int) -> list[Page]:
        """`pop` n times (fewer if fewer are linked): the first n pages, unlinked in one walk."""
        head, tail, out = self._head, self._tail, []
        page = head.next
        while len(out) < n and page is not tail and page is not None:
            nxt = page.next
            page.prev = page.next = None
            out.append(page)
            page = nxt
        head.next = page
        if page is not None:
            page.prev = head
        self._len -= len(out)
        return out

    def pop_back_many(self, n: int, want: Callable[[Page], bool]) -> list[Page]:
        """Up to n pages that `want` accepts, unlinked, looking from the last one back at no
        more than 4n pages (the others stay linked where they are)."""
        out: list[Page] = []
        page = self._tail.prev
        for _ in range(4 * n):
            if len(out) >= n or page is None or page is self._head:
                break
            prev = page.prev
            if want(page):
                self.remove(page)
                out.append(page)
            page = prev
        return out

    def remove(self, page: Page) -> None:
        prev, nxt = page.prev, page.next
        if prev is None or nxt is None:
            raise InvariantBroken(f"{page} is not linked")
        prev.next = nxt
        nxt.prev = prev
        page.prev = page.next = None
        self._len -= 1


def py_touch_pages(pages: list[Page], clock: int) -> tuple[list[int], list[Page]]:
    """A lookup hit's pass over its pages (Namespace.touch): each page's `last_access` set
    to `clock`; (their slots, the pages whose `policy_state` is set). kvstore/_pagetouch.c
    does the same in C, at the fields' offsets; this is its fallback and its reference."""
    candidates = []
    for page in pages:
        page.last_access = clock
        if page.policy_state is not None:
            candidates.append(page)
    return [page.slot for page in pages], candidates


try:  # (absent where the extension is not built)
    from kvstore._chainhash import touch_pages
except ImportError:
    touch_pages = py_touch_pages


class PageTable:
    """The pages of one pool and its free list.

    With `zero` set (kvstore/store/integrity.py), a freed page is dirty until its bytes are
    zeroed: off the loop from `freed` (a queue the store drains), else by `zero` as it is
    taken, so a page is never handed out with a previous occupant's bytes; unless its taker
    writes all of it before anyone sees it (`overwritten`: a promotion, a credit of a client
    that copies whole pages), which gets it as it is."""

    def __init__(self, num_pages: int) -> None:
        self.pages = [Page(slot) for slot in range(num_pages)]
        self.free = FreeList(self.pages)
        self.zero: Callable[[list[Page], bool], None] | None = None
        # (when, page) of each page freed dirty, in that order (only with `zero`): the integrity
        # thread zeroes those free for a while, the newest of them first (kvstore/store/integrity.py).
        self.freed: deque[tuple[float, Page]] = deque()
        self.dirty_free = 0  # FREE pages that are dirty (with `zero`): the rest of `free` is zeroed

    def __len__(self) -> int:
        return len(self.pages)

    def take(self, owner: int, overwritten: bool = False) -> Page | None:
        """A FREE page made RESERVED for `owner`, or None when none is free. `overwritten`:
        the caller writes all of it before anyone sees it (a promotion), so a dirty page
        needs no zeroing, only its zeroing under way finished."""
        page = self.free.pop()
        if page is None:
            return None
        page.state = RESERVED
        page.owner = owner
        if page.dirty:
            self.dirty_free -= 1
            self.zero([page], overwritten)  # type: ignore[misc] (dirty only with `zero`)
        return page

    def take_many(self, owner: int, n: int, overwritten: bool = False) -> list[Page]:
        """`take` n times (fewer if fewer are free), in one call. `overwritten` (see `take`):
        the dirty pages no zeroing job holds are taken first (from the free list's end, where
        freed pages go), so the zeroed ones are left for takers that need them."""
        if overwritten and self.dirty_free:
            out = self.free.pop_back_many(n, _unzeroed)
            out += self.free.pop_many(n - len(out))
        else:
            out = self.free.pop_many(n)
        dirty = []
        for page in out:
            page.state = RESERVED
            page.owner = owner
            if page.dirty:
                dirty.append(page)
        if dirty:
            self.dirty_free -= len(dirty)
            self.zero(dirty, overwritten)  # type: ignore[misc] (dirty only with `zero`)
        return out

    def give_back(self, page: Page) -> None:
        """Return a page to the free list, clearing everything it held."""
        page.state = FREE
        page.refcount = 0
        page.block_hash = None
        page.parent = None
        page.children = None
        page.owner = 0
        page.policy_state = None
        page.verified = None
        page.checksum = None
        page.writer = 0
        if self.zero is not None:
            page.dirty = True
            self.dirty_free += 1
            self.freed.append((monotonic(), page))
        self.free.push(page)


def _unzeroed(page: Page) -> bool:
    return page.dirty and page.zeroing is None
