"""One namespace's metadata: its pool, page table, prefix index, policy and
counters, and the page-level operations that keep them consistent (FREE -> RESERVED ->
SEALED -> FREE, references, eviction). Loop-owned. It knows nothing of sessions or of how
the tiers work: what is below the pool is a `Below` it is given (kvstore/store/tiering/)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from enum import Enum
from typing import NamedTuple, Protocol

from kvstore.errors import FailedPrecondition, InvariantBroken, ResourceExhausted
from kvstore.hashing import namespace_salt, root_hash
from kvstore.index.prefix_index import PrefixIndex, subtree_postorder
from kvstore.memory.backend import PoolBackend
from kvstore.memory.pages import RESERVED, SEALED, Page, PageTable, touch_pages
from kvstore.policy import EvictionPolicy
from kvstore.store.live_mrc import LiveMrc
from kvstore.store.page_sums import CORRUPT, Guard
from kvstore.store.types import (
    PAGE_LAYOUT,
    EvictResult,
    NamespaceInfo,
    NamespaceSpec,
    NamespaceStats,
    PoolInfo,
)

log = logging.getLogger(__name__)


GHOST_MIN_ENTRIES = 65536  # evictions Explain remembers: at least this many, or 4 x the pool


class Below(Protocol):
    """What is below the pool, as the page table calls it (kvstore/store/tiering/tiers.py)."""

    def demote(self, ns: Namespace, page: Page) -> None:
        """Copy a sealed page the pool is about to free below it (if not there already)."""

    def on_sealed(self, ns: Namespace, page: Page) -> None:
        """A page was sealed (write-through, the successor map)."""

    def admit(self, ns: Namespace) -> None:
        """A namespace begins (its share of the tiers, tiering/shares.py)."""

    def usage(self, name: str) -> dict[str, int]:
        """host_bytes, disk_bytes and share_evictions of the namespace below the pool."""


class GoneKind(Enum):
    EVICTED = "evicted"  # by the pool's policy (its copy below, if any, is still there) or a tier
    CORRUPT = "corrupt"  # failed its checksum below the pool


class Gone(NamedTuple):
    """Explain's memory of a page that left the pool (or a tier below)."""

    unix_s: float
    by: str  # the policy or tier that evicted it
    why: str  # what the eviction made room for
    kind: GoneKind


class Namespace:
    def __init__(
        self, spec: NamespaceSpec, pool: PoolBackend, policy: EvictionPolicy, tiers: Below | None = None
    ) -> None:
        self.spec = spec
        self.pool = pool
        self.policy = policy
        self.tiers = tiers  # below the pool: evicted pages are demoted there (None: dropped)
        if tiers is not None:
            tiers.admit(self)
        # What a page below the pool must match to be promoted into this pool.
        self.geometry = (
            f"{spec.num_layers}x2x{spec.page_tokens}x{spec.num_kv_heads}x{spec.head_dim}:{spec.dtype}"
            f":{spec.model_fingerprint}"
        )
        self.pages = PageTable(spec.num_pages)
        self.index = PrefixIndex(root_hash(namespace_salt(spec.name, spec.salt)))
        self.clock = 0  # logical time of accesses, for recency
        self.pages_reserved = 0
        self.pages_pinned = 0  # sealed pages with refcount > 0
        self.sequences = 0
        self.hit_tokens = 0
        self.miss_tokens = 0
        self.lookups = 0
        self.evictions = 0
        # Pages sealed inside `landing_batch`, whose staged bytes go to the device together
        # when it ends (None: outside one, each seal lands its own).
        self.landing: list[Page] | None = None
        self.deduplicated_pages = 0
        self.pages_committed = 0  # sealed or deduplicated by a commit: written by a client
        self.budget_dropped_pages = 0
        # Sealed pages a budget let go while a page extending them stayed pinned (only a budget
        # can unpin a page under a pinned one): eviction cannot take them until that page goes.
        self.held_up: set[Page] = set()
        self.pages_quarantined = 0  # RESERVED, held for a dead client (store/quarantine.py)
        self.quota_refused = 0  # requests refused by spec.max_session_pages (store/quotas.py)
        # Explain's memory of pages gone from every tier (kvstore/observe/explain.py): block
        # hash -> when, by whom, for what; the newest last.
        # The store's own, whatever the policy remembers. `evicting_for` says what the
        # evictions under way make room for (set around make_room and the Evict paths).
        self.ghost: OrderedDict[bytes, Gone] = OrderedDict()
        self.ghost_max = max(GHOST_MIN_ENTRIES, 4 * spec.num_pages)
        self.evicting_for = ""
        self.mrc = LiveMrc(spec.num_pages)  # sampled accesses, for Admin.Mrc
        # Reads of swapped pages into this pool on the disk tier's reader threads (a swap-in's
        # private pages; kvstore/store/tiering/private.py), also those of a swap-in given up: the pool
        # must not be closed under them.
        self.private_reads: set[asyncio.Future[bool]] = set()
        # Checksums, the scrubber and zeroing freed pages (kvstore/store/integrity.py), and the
        # SEALED pages found corrupt: out of the index, freed once nobody holds them.
        self.guard: Guard | None = None
        self.condemned: set[Page] = set()

    @property
    def name(self) -> str:
        return self.spec.name

    # ------------------------------------------------------------ page moves

    def reserve(self, owner: int, overwritten: bool = False) -> Page:
        """A RESERVED page for `owner`; the caller has made room (see make_room). `overwritten`:
        see PageTable.take."""
        page = self.pages.take(owner, overwritten)
        if page is None:
            raise InvariantBroken(f"namespace {self.name!r}: reserve() with no free page (make_room() first)")
        self.pages_reserved += 1
        return page

    def reserve_many(self, owner: int, n: int, overwritten: bool = False) -> list[Page]:
        """`reserve` n times, in one call (`overwritten`: see PageTable.take_many)."""
        if len(self.pages.free) < n:
            raise InvariantBroken(
                f"namespace {self.name!r}: reserve of {n} pages, fewer free (make_room() first)"
            )
        self.pages_reserved += n
        return self.pages.take_many(owner, n, overwritten)

    def free_reserved(self, page: Page) -> None:
        if page.state is not RESERVED:
            raise InvariantBroken(f"namespace {self.name!r}: freeing {page} as reserved")
        self.pages_reserved -= 1
        self.pool.dropped(self.offset(page.slot))
        self.pages.give_back(page)

    def seal(self, page: Page, parent: Page | None) -> None:
        """RESERVED -> SEALED, held once by the sealing sequence (here a promotion's)."""
        self.seal_run([page], parent)

    def seal_run(self, pages: list[Page], parent: Page | None, writer: int = 0) -> None:
        """`seal` of each page in order, each under the one before it (the first under
        `parent`), the policy told once (kvstore/store/page_runs.py). A page sealed here was
        never a candidate, so the policy hears nothing when the next one extends it.
        `writer`: the session whose sequence sealed them (0: a promotion)."""
        for page in pages:
            if page.state is not RESERVED or page.block_hash is None:
                raise InvariantBroken(f"namespace {self.name!r}: sealing {page}, not reserved with a hash")
        if self.pool.handle.on_device:  # a copy from below reaches the device first
            if self.landing is not None:
                self.landing += pages
            else:
                self.pool.landed_many([self.offset(page.slot) for page in pages])
        clock = self.clock
        prev = parent
        for page in pages:
            page.state = SEALED
            page.owner = 0
            page.refcount = 1
            page.parent = prev
            if prev is not None:
                if prev.children is None:
                    prev.children = {page}
                else:
                    prev.children.add(page)
            clock += 1
            page.last_access = clock
            prev = page
        self.clock = clock
        self.pages_reserved -= len(pages)
        self.pages_pinned += len(pages)
        if parent is not None:
            self.policy.on_unevictable(parent)  # no longer a leaf
        self.index.insert_all(pages)
        self.policy.on_sealed_all(pages)
        if self.guard is not None:
            self.guard.sealed(pages, writer)
        if self.tiers is not None:
            for page in pages:
                self.tiers.on_sealed(self, page)

    def ref(self, page: Page) -> None:
        if page.state is not SEALED:
            raise InvariantBroken(f"namespace {self.name!r}: a reference on {page}, which is not sealed")
        if page.refcount == 0:
            self.pages_pinned += 1
            self.policy.on_unevictable(page)
        page.refcount += 1

    def unref(self, page: Page) -> None:
        if page.state is not SEALED or page.refcount <= 0:
            raise InvariantBroken(f"namespace {self.name!r}: releasing a reference {page} does not have")
        page.refcount -= 1
        if page.refcount == 0:
            self.pages_pinned -= 1
            if page.evictable:
                self.policy.on_evictable(page)

    def touch(self, pages: list[Page]) -> list[int]:
        """One access of a whole prefix: every page gets the same clock value (see policy/lru.py).
        Returns the pages' slots (a lookup's reply), collected in the same pass."""
        self.clock = clock = self.clock + 1
        slots, candidates = touch_pages(pages, clock)
        self.policy.on_hit(pages, slots, candidates)
        return slots

    def drop(self, page: Page) -> None:
        """Evict a sealed, unpinned leaf: unindex and free it."""
        if not page.evictable:
            raise InvariantBroken(f"namespace {self.name!r}: evicting {page}, which is not evictable")
        policy = self.policy
        policy.on_unevictable(page)
        corrupt = page.checksum is CORRUPT  # (out of the index already; never copied below)
        if corrupt:
            self.condemned.discard(page)
        else:
            self.index.remove(page)
        parent = page.parent
        if parent is not None and parent.children is not None:
            parent.children.discard(page)
            if not parent.children and parent.refcount == 0:  # parent.evictable: a parent is sealed
                policy.on_evictable(parent)
        policy.on_dropped(page)  # before give_back clears block_hash (ghost histories)
        if not corrupt:
            self.remember_gone(page.block_hash, policy.name, self.evicting_for or "unknown")
        if self.tiers is not None and not corrupt:
            try:
                self.tiers.demote(self, page)  # copied down first, freed second
            except Exception:  # a tier failing must not fail the request that needed room
                log.exception("namespace %s: demoting page %s failed; it is dropped", self.name, page)
        if self.landing is not None:  # (sealed and evicted in one batch: never lands)
            self.pool.dropped(self.offset(page.slot))
        self.pages.give_back(page)
        self.evictions += 1

    def remember_gone(
        self, block_hash: bytes | None, by: str, why: str, kind: GoneKind = GoneKind.EVICTED
    ) -> None:
        """Explain's ghost: `block_hash` left the pool (or a tier below) at this moment."""
        if block_hash is None:
            return
        ghost = self.ghost
        ghost[block_hash] = Gone(time.time(), by, why, kind)
        ghost.move_to_end(block_hash)
        if len(ghost) > self.ghost_max:
            ghost.popitem(last=False)

    # ------------------------------------------------------------ capacity

    def obtainable(self) -> int:
        """Free pages plus the sealed pages eviction can take: nobody pins them or a page that
        extends them."""
        sealed = len(self.index) + len(self.condemned)
        return len(self.pages.free) + sealed - self.pages_pinned - self.pages_held_up()

    def pages_held_up(self) -> int:
        """Unpinned sealed pages that a pinned page extends (see `held_up`)."""
        still = {p for p in self.held_up if p.state is SEALED and p.refcount == 0 and pins_below(p)}
        self.held_up = still
        return len(still)

    def make_room(self, needed: int, what: str) -> None:
        """Evict (policy's choice) until `needed` pages are free, or raise with the numbers."""
        if len(self.pages.free) >= needed:
            return
        if needed > self.obtainable():
            raise self._exhausted(needed, what)
        self.evicting_for = what
        try:
            while len(self.pages.free) < needed:
                victim = self.policy.victim()
                if victim is None:
                    raise self._exhausted(needed, what)
                self.drop(victim)
        finally:
            self.evicting_for = ""

    def check_model(self, model_fingerprint: str) -> None:
        """Refuse a request for another model's KV (an empty fingerprint on either side accepts)."""
        mine = self.spec.model_fingerprint
        if mine and model_fingerprint and mine != model_fingerprint:
            raise FailedPrecondition(
                f"namespace {self.name!r} holds KV of model {mine}, this request is for model "
                f"{model_fingerprint}; use a namespace made for this model"
            )

    def _exhausted(self, needed: int, what: str) -> ResourceExhausted:
        return ResourceExhausted(
            f"namespace {self.name!r}: {what} needs {needed} free pages but only {len(self.pages.free)} "
            f"are free and {self.obtainable() - len(self.pages.free)} sealed unpinned ({len(self.pages)} total, "
            f"{self.pages_pinned} sealed+pinned, {self.pages_reserved} reserved)"
        )

    def evict_while(self, more: Callable[[int], bool], why: str = "Evict RPC") -> EvictResult:
        """Evict the policy's victims while `more(bytes freed so far)` holds."""
        evicted = 0
        self.evicting_for = why
        try:
            while more(evicted * self.spec.page_bytes):
                victim = self.policy.victim()
                if victim is None:
                    break
                self.drop(victim)
                evicted += 1
        finally:
            self.evicting_for = ""
        return EvictResult(evicted, evicted * self.spec.page_bytes, self.pages_pinned + self.pages_held_up())

    def evict_subtree(self, top: Page, why: str = "Evict RPC (prefix)") -> EvictResult:
        """Evict `top` and every resident page extending it, leaves first; pinned ones stay."""
        evicted = skipped = 0
        self.evicting_for = why
        try:
            for page in list(subtree_postorder(top)):
                if page.evictable:
                    self.drop(page)
                    evicted += 1
                else:
                    skipped += 1
        finally:
            self.evicting_for = ""
        return EvictResult(evicted, evicted * self.spec.page_bytes, skipped)

    # ------------------------------------------------------------ views

    def offset(self, slot: int) -> int:
        return self.pool.handle.offset + slot * self.spec.page_stride

    def page_view(self, slot: int) -> memoryview:
        """The bytes of one pool page in the daemon's own mapping (host pools only: tests)."""
        return self.pool.host_view(self.offset(slot), self.spec.page_bytes)  # type: ignore[attr-defined]

    def page_out(self, slot: int) -> memoryview:
        """A page's bytes for a copy below the pool (in place on host, staged from a device)."""
        return self.pool.copy_out(self.offset(slot), self.spec.page_bytes)

    def page_in(self, slot: int) -> memoryview:
        """Where a copy from below writes a page; `land` (or `seal`) makes it the page's."""
        return self.pool.copy_in(self.offset(slot), self.spec.page_bytes)

    @contextlib.contextmanager
    def landing_batch(self) -> Iterator[None]:
        """The pages sealed inside land on the device in one batch when it ends: for code
        that hands out none of them before then and never yields to the loop meanwhile (a
        lookup's walk below the pool). Until they land, a copy out of one reads its staged
        bytes, so a demotion or write-through inside is still right."""
        if self.landing is not None or not self.pool.handle.on_device:
            yield
            return
        self.landing = []
        try:
            yield
        finally:
            pages, self.landing = self.landing, None
            try:
                self.pool.landed_many([self.offset(p.slot) for p in pages if p.state is SEALED])
            except BaseException:
                self._unlanded(pages)
                raise

    def _unlanded(self, pages: list[Page]) -> None:
        """Sealed pages whose bytes never reached the device: out of the index at once, freed
        once nobody holds them (as a corrupt page is), never served."""
        log.error(
            "namespace %s: %d promoted pages failed to land on the device: dropped", self.name, len(pages)
        )
        for page in pages:
            if (
                page.state is SEALED
                and page.block_hash is not None
                and self.index.get(page.block_hash) is page
            ):
                page.checksum = CORRUPT
                self.index.remove(page)
                self.condemned.add(page)

    def land(self, page: Page) -> None:
        """A page copied in from below goes to a sequence unsealed (swap-in): push it now."""
        self.pool.landed(self.offset(page.slot))

    def sealed_pages(self) -> Iterator[Page]:
        return iter(list(self.index._pages.values()))

    def info(self) -> NamespaceInfo:
        spec = self.spec
        pool = PoolInfo(
            handle=self.pool.handle,
            num_pages=spec.num_pages,
            page_bytes=spec.page_bytes,
            page_stride=spec.page_stride,
            layout=PAGE_LAYOUT,
            page_shape=spec.page_shape,
            dtype=spec.dtype,
        )
        return NamespaceInfo(spec=spec, pool=pool)

    def stats(self) -> NamespaceStats:
        return NamespaceStats(
            name=self.name,
            policy=self.policy.name,
            page_bytes=self.spec.page_bytes,
            pages_total=len(self.pages),
            pages_free=len(self.pages.free),
            pages_reserved=self.pages_reserved,
            pages_sealed=len(self.index) + len(self.condemned),
            pages_pinned=self.pages_pinned,
            sequences=self.sequences,
            hit_tokens=self.hit_tokens,
            miss_tokens=self.miss_tokens,
            lookups=self.lookups,
            evictions=self.evictions,
            deduplicated_pages=self.deduplicated_pages,
            budget_dropped_pages=self.budget_dropped_pages,
            pages_quarantined=self.pages_quarantined,
            pages_free_unzeroed=self.pages.dirty_free,
            committed_bytes=self.pages_committed * self.spec.page_bytes,
            hit_bytes=self.hit_tokens // self.spec.page_tokens * self.spec.page_bytes,  # (whole pages)
            max_session_pages=self.spec.max_session_pages,
            session_pages_refused=self.quota_refused,
            tier_share=self.spec.tier_share,
            **(self.tiers.usage(self.name) if self.tiers is not None else {}),
            **(self.guard.stats() if self.guard is not None else {}),
        )


def pins_below(page: Page) -> bool:
    """Whether a pinned page extends `page` (its subtree, below it)."""
    return any(p.refcount > 0 for p in subtree_postorder(page) if p is not page)
