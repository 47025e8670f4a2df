"""The tiers below the pools, as the store uses them: demotion, promotion, write-through,
flush and the successor map behind prefetch (docs/tiers.md, "In the store").

One `Tiers` serves every namespace: a `HostTier` (daemon DRAM) and/or a `DiskTier` (LMDB),
keyed by `PageKey(namespace, block_hash)`. Loop-owned like the store; the disk tier's own
threads (writer, readers) only ever touch disk state and the bytes of a RESERVED pool page
that nobody else can see.

- **Demotion** (`demote`): a sealed page the pool evicts is copied down before its slot is
  freed: into the host tier (checksummed, one memcpy), pushing the host's least recently used
  pages to disk when it is full; straight to disk when there is no host tier. The copy is
  synchronous on the loop, so "copied first, freed second" holds without a pin. Both tiers
  are inclusive of the pool: a page already in the host tier is not copied again; one that
  is only on disk is just freed when it came up through the OS page cache (its bytes are in
  DRAM there), else copied into the host tier if there is one.
- **Promotion** (`promote_now`, `promote`): a lookup whose prefix continues below the pool
  reserves a pool page per such block (the policy makes room, demoting others) and fills it:
  from the host tier, or from disk if its bytes are in the page cache, at once and in place
  (`promote_now` seals it there and then); else on the reader threads, tracked by a
  `Promotion`. A `Promotion` seals its page into the index
  once its bytes have verified *and* its parent is sealed (chains seal in order); a checksum
  failure or a missing record frees the page and every later one of the chain, so a lookup
  never serves bytes that failed verification. Each promotion holds one reference on its
  parent page until it settles, so the parent cannot be evicted under it.
- **Write-through** (`on_sealed`): with `write_through`, each page is queued for disk as it
  is sealed (flush.py streams every sealed page not yet on disk for Admin.Flush). What is
  queued for disk is bounded (`disk_queue_bytes`): past it a demotion is dropped, counted.
- **Prefetch**: the store records which page followed which (`successor`); a lookup that hits
  every full page of its prompt promotes up to `prefetch_pages` pages that followed last time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, NamedTuple

from kvstore.errors import InvariantBroken
from kvstore.memory.pages import Page
from kvstore.store import swap_io
from kvstore.tiers import (
    NOT_RESIDENT,
    CorruptPage,
    DiskTier,
    HostTier,
    PageKey,
    PageMeta,
    PageRecord,
    TierName,
    make_meta,
)

if TYPE_CHECKING:
    from kvstore.store.namespace import Namespace
    from kvstore.store.sessions import Pin

log = logging.getLogger(__name__)

PROMOTING_OWNER = -1  # owner of a RESERVED pool page being filled from a tier
SUCCESSORS_REMEMBERED = 1 << 20
# Records of swapped-out sequences' unsealed pages live under "<namespace>" + this: never
# found by a lookup, and deleted at the next start (their sequences died with the daemon).
SWAP_SUFFIX = "\x00swap"


class NotNow(Enum):
    """Why `Tiers.promote_now` brought no page up."""

    WAIT = "wait"  # it has to wait (a write not yet committed, bytes not in the page cache)
    FAILED = "failed"  # its record failed verification or is gone: the hit ends there


class Verified(NamedTuple):
    """What a promoted page's bytes verified against (kept on the sealed page: `Page.verified`),
    and whether they came from disk through the OS page cache (read on the loop)."""

    meta: PageMeta
    checksum: int
    in_page_cache: bool


@dataclass(eq=False, slots=True)
class Promotion:
    """One page on its way up: `page` is RESERVED (owner PROMOTING_OWNER) until it settles."""

    ns: Namespace
    key: PageKey
    page: Page
    parent_page: Page | None  # resident parent (we hold a ref on it); None: root or in flight
    parent: Promotion | None  # in-flight parent
    source: TierName
    pins: list[Pin] = field(default_factory=list)
    children: list[Promotion] = field(default_factory=list)  # in flight, waiting on us
    read_ok: bool | None = None  # None: the read has not finished
    verified: Verified | None = None  # the record the copy verified against
    ok: bool | None = None  # None: not settled
    sealed: Page | None = None  # once settled ok: the sealed page (ours, or an equal one)
    _waiters: list[asyncio.Future[bool]] = field(default_factory=list)

    async def wait(self) -> bool:
        return bool(await self.future())

    def future(self) -> asyncio.Future[bool]:
        """Resolved (with `ok`) when the promotion settles; cancelling it cancels nothing else."""
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if self.ok is None:
            self._waiters.append(fut)
        else:
            fut.set_result(self.ok)
        return fut


class Tiers:
    def __init__(
        self,
        host: HostTier | None,
        disk: DiskTier | None,
        *,
        write_through: bool = False,
        prefetch_pages: int = 4,
    ) -> None:
        self.host = host
        self.disk = disk
        self.write_through = write_through and disk is not None
        self.prefetch_pages = prefetch_pages
        self.promoting: dict[PageKey, Promotion] = {}
        # Put to disk, not yet committed: key -> the writer's future for its batch. Entries are
        # removed by the future's callback (on the writer thread; single dict operations).
        self._queued: dict[PageKey, cf.Future[list[Any]]] = {}
        self._batch: list[Promotion] | None = None  # disk reads collected by begin_reads()
        self._successor: OrderedDict[PageKey, bytes] = OrderedDict()
        self.counters = {
            "demoted_host": 0,
            "demoted_disk": 0,
            "demoted_clean": 0,  # evicted while a copy was below already: nothing to copy
            "host_to_disk": 0,
            "promoted_host": 0,
            "promoted_disk": 0,
            "promoted_disk_inline": 0,  # of those, read on the loop (bytes in the page cache)
            "promotion_failures": 0,
            "prefetched": 0,
            "written_through": 0,
            "disk_queue_dropped": 0,  # pages not written: the disk write queue was full
        }
        self.swapped_pages = 0  # pages of swapped-out sequences below the pool now
        self.reindex_state = {"running": False, "done": 0, "total": 0}
        self.closing = False
        self._reindex_idle = threading.Event()  # set unless a re-index thread is reading LMDB
        self._reindex_idle.set()
        # Told when a page leaves every tier for good: (key, by, why, kind "evicted" |
        # "corrupt"); the store keeps it for Explain (Store._page_lost).
        self.on_lost: Callable[[PageKey, str, str, str], None] | None = None

    def _lost(self, key: PageKey, by: str, why: str, kind: str = "evicted") -> None:
        if self.on_lost is not None:
            self.on_lost(key, by, why, kind)

    # ------------------------------------------------------------ what is below

    def holds(self, ns: Namespace, block_hash: bytes) -> TierName | None:
        """Which tier holds the page, or None."""
        return self.holds_key(ns, PageKey(ns.name, block_hash))

    def holds_key(self, ns: Namespace, key: PageKey) -> TierName | None:
        """`holds` by the page's key."""
        if self.host is not None and key in self.host:
            meta = self.host.meta(key)
            if meta is not None and meta.geometry == ns.geometry and meta.page_bytes == ns.spec.page_bytes:
                return TierName.HOST
        if self.disk is not None and (key in self.disk or key in self._queued):
            return TierName.DISK  # (a queued record is read once its batch has committed)
        return None

    def disk_evicted(self, keys: list[PageKey]) -> None:
        """The disk tier evicted `keys` to make room (DiskTier's on_evict, hopped to the loop):
        those in no other tier are gone for good."""
        for key in keys:
            if key in self._queued or key in self.promoting or (self.host is not None and key in self.host):
                continue
            self._lost(key, f"disk tier ({self.disk.policy_name})", "disk tier full")

    def note_successor(self, ns_name: str, parent_hash: bytes, child_hash: bytes) -> None:
        key = PageKey(ns_name, parent_hash)
        self._successor[key] = child_hash
        self._successor.move_to_end(key)
        if len(self._successor) > SUCCESSORS_REMEMBERED:
            self._successor.popitem(last=False)

    def successor(self, ns_name: str, block_hash: bytes) -> bytes | None:
        return self._successor.get(PageKey(ns_name, block_hash))

    # ------------------------------------------------------------ down

    def _record(self, ns: Namespace, page: Page, copy: bool) -> PageRecord:
        """The page as a record for a tier (its payload a `bytes` copy with `copy`, else a view
        of the pool slot). A page that came up from a tier keeps the metadata and checksum its
        bytes verified against then: no new checksum (and bytes changed in the pool since, by
        a client writing where it must not, fail that checksum at the next promotion)."""
        if page.block_hash is None:
            raise InvariantBroken(f"namespace {ns.name!r}: demoting {page}, which has no block hash")
        view = ns.page_view(page.slot)
        verified = page.verified
        if isinstance(verified, Verified):
            meta = verified.meta
            if meta.block_hash == page.block_hash and meta.namespace == ns.name:
                return PageRecord(meta, bytes(view) if copy else view, verified.checksum)
        parent = page.parent.block_hash if page.parent is not None and page.parent.block_hash else b""
        meta = make_meta(
            ns.name, page.block_hash, parent, ns.spec.page_tokens, ns.spec.page_bytes, ns.geometry
        )
        return PageRecord.build(meta, bytes(view) if copy else view)

    def demote(self, ns: Namespace, page: Page) -> None:
        """Copy a sealed page the pool is about to free into the tier below (if not there)."""
        key = PageKey(ns.name, page.block_hash or b"")
        host, disk = self.host, self.disk
        if host is not None and key in host:
            host.touch(key)  # (a sealed page never changes: the copy below is still its bytes)
            self.counters["demoted_clean"] += 1
            return
        on_disk = disk is not None and (key in disk or key in self._queued)
        verified = page.verified
        if on_disk and isinstance(verified, Verified) and verified.in_page_cache:
            # It came up from disk through the OS page cache: its bytes are in DRAM there
            # already, and a host copy would be a second one (a memcpy, a host slot and the
            # host tier's bookkeeping for nothing). Should the kernel drop them, the next
            # promotion reads it on a reader thread, and its next demotion copies it here.
            self.counters["demoted_clean"] += 1
            return
        # Any other page on disk still goes into the host tier if it can make room (moving
        # its coldest pages down): the next hit on it is then a copy from DRAM, not a read
        # from the device.
        if host is not None and self._make_host_room(ns.spec.page_bytes):
            host.put(self._record(ns, page, copy=False))  # put copies into its slab
            self.counters["demoted_host"] += 1
        elif on_disk:
            self.counters["demoted_clean"] += 1  # freeing the slot loses nothing
        elif disk is not None and self._put_disk([self._record(ns, page, copy=True)]):
            self.counters["demoted_disk"] += 1

    def _make_host_room(self, page_bytes: int) -> bool:
        host = self.host
        if host is None:
            raise InvariantBroken("making room in a host tier that does not exist")
        while not host.has_room(page_bytes):
            victims = host.victims(8, page_bytes)
            if not victims:
                return False  # the page is larger than the whole host tier
            down: list[PageRecord] = []
            for key in victims:
                if self.disk is not None and key not in self.disk and key not in self._queued:
                    try:
                        record = host.take(key)
                    except CorruptPage:
                        self._lost(key, "host tier", "failed its checksum in the host tier", "corrupt")
                        continue  # counted and removed by the host tier; nothing to save
                    if record is not None:
                        down.append(record)
                else:
                    host.remove(key)
                    if self.disk is None:
                        self._lost(key, "host tier (LRU)", "host tier full, no disk tier below it")
            if down and self._put_disk(down):  # one queue entry and one future for the batch
                self.counters["host_to_disk"] += len(down)
        return True

    def _put_disk(self, records: list[PageRecord], strict: bool = False) -> cf.Future[list[Any]] | None:
        """Queue records for disk; if the queue is at its bound (`disk_queue_bytes`), drop
        them (counted; a page no longer cached), or with `strict` raise ValueError."""
        if self.disk is None:
            raise InvariantBroken("writing to a disk tier that does not exist")
        keys = [r.key for r in records]
        if not self.disk.has_queue_room(sum(r.meta.page_bytes for r in records)):
            if strict:
                raise ValueError("the disk write queue is full (server.disk_queue_bytes)")
            self.counters["disk_queue_dropped"] += len(records)
            for key in keys:
                self._lost(key, "disk write queue", "the disk write queue was full")
            return None
        fut = self.disk.put_async(records)
        for key in keys:
            self._queued[key] = fut

        def committed(done: cf.Future[list[Any]]) -> None:
            # (`done`, not `fut` from the closure: a future holding a callback that holds
            # the future is a reference cycle, left for the garbage collector to find.)
            for key in keys:
                if self._queued.get(key) is done:  # (not a later write of the same key)
                    self._queued.pop(key, None)

        fut.add_done_callback(committed)
        return fut

    def on_sealed(self, ns: Namespace, page: Page) -> None:
        if page.parent is not None and page.parent.block_hash and page.block_hash:
            self.note_successor(ns.name, page.parent.block_hash, page.block_hash)
        if self.write_through and page.block_hash:
            key = PageKey(ns.name, page.block_hash)
            if self.disk is not None and key not in self.disk and key not in self._queued:
                self._put_disk([self._record(ns, page, copy=True)])
                self.counters["written_through"] += 1

    # ------------------------------------------------------------ swapped sequences

    def save_private(self, ns: Namespace, page: Page) -> PageKey:
        """Copy an unsealed page of a sequence being swapped out below the pool, under a
        key of its own. ResourceExhausted-worthy failure is reported as None by raising
        ValueError when no tier can take it."""
        meta = make_meta(
            ns.name + SWAP_SUFFIX, os.urandom(16), b"", ns.spec.page_tokens, ns.spec.page_bytes, ns.geometry
        )
        view = ns.page_view(page.slot)
        if self.host is not None and self._make_host_room(ns.spec.page_bytes):
            self.host.put(PageRecord.build(meta, view))
        elif self.disk is not None:
            self._put_disk([PageRecord.build(meta, bytes(view))], strict=True)
        else:
            raise ValueError("no tier below the pool has room")
        return meta.key

    def load_private(self, ns: Namespace, key: PageKey, page: Page) -> bool | asyncio.Future[bool]:
        """Copy a swapped page back into `page`, verified: whether it could be (it may be gone
        or corrupt), or a future of that while a reader thread reads it from disk."""
        return swap_io.read_private(self.host, self.disk, self._queued.get(key), key, ns.page_view(page.slot))

    def discard_private(self, key: PageKey) -> None:
        if self.host is not None and self.host.remove(key):
            return
        if self.disk is not None:
            self.disk.remove_async((key,))

    # ------------------------------------------------------------ up

    def promote(
        self,
        ns: Namespace,
        block_hash: bytes,
        parent_page: Page | None,
        parent: Promotion | None,
        source: TierName,
    ) -> Promotion:
        """Start bringing one page up; the caller has made room for one page. `parent_page`
        (resident) or `parent` (in flight) is the page it extends."""
        key = PageKey(ns.name, block_hash)
        page = ns.reserve(PROMOTING_OWNER)
        page.block_hash = block_hash
        if parent_page is not None:
            ns.ref(parent_page)  # released when we settle
        prom = Promotion(ns, key, page, parent_page, parent, source)
        self.promoting[key] = prom
        if parent is not None:
            parent.children.append(prom)
        if source is TierName.HOST:
            self._read_done(prom, self._read_host(prom))
        else:
            self._read_disk(prom)
        return prom

    def promote_now(
        self, ns: Namespace, key: PageKey, parent_page: Page | None, source: TierName
    ) -> Page | NotNow:
        """Bring one page up at once when nothing has to wait for it: from the host tier, or
        from disk when its record has committed and its bytes are in the OS page cache (read
        here, on the loop). The caller has made room for one page, and `parent_page` is
        resident. Returns the sealed page, with one reference that is now the caller's;
        FAILED if its record failed verification or is gone (the hit ends there); WAIT if it
        has to wait (a write not yet committed, bytes not in the page cache): nothing was
        done, start a `promote`. The common case of a lookup that continues below the pool,
        without a `Promotion` to track, settle and wait for."""
        block_hash = key.block_hash
        disk = self.disk
        in_page_cache = False
        if source is TierName.HOST:
            page = ns.reserve(PROMOTING_OWNER)
            try:
                got: Any = self.host.read_record_into(key, ns.page_view(page.slot))  # type: ignore[union-attr]
            except (CorruptPage, ValueError) as e:
                log.warning("promotion of %s from host failed: %s", key, e)
                got = None
        else:
            if disk is None:
                raise InvariantBroken(f"promoting {key} from a disk tier that does not exist")
            if key in self._queued:
                return NotNow.WAIT  # its write first: a reader thread waits for it
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (tools, tests of the store alone): read here
                loop = None
            page = ns.reserve(PROMOTING_OWNER)
            got = self._read_disk_one(key, ns.page_view(page.slot), ns.geometry, loop)
            if got is None:  # not in the page cache: a reader thread reads it
                ns.free_reserved(page)
                return NotNow.WAIT
            in_page_cache = loop is not None
        if not isinstance(got, tuple):
            ns.free_reserved(page)
            self._failed(ns, key, source)
            return NotNow.FAILED
        existing = ns.index.get(block_hash)
        if existing is not None:  # (cannot happen from a lookup's walk; kept for any caller)
            ns.free_reserved(page)
            ns.ref(existing)
            return existing
        page.block_hash = block_hash
        ns.seal(page, parent_page)  # refcount 1: the caller's
        page.verified = Verified(got[0], got[1], in_page_cache)
        self.counters["promoted_" + source] += 1
        self.counters["promoted_disk_inline"] += in_page_cache
        return page

    def _failed(self, ns: Namespace, key: PageKey, source: TierName) -> None:
        """A promotion's record failed verification or was gone: counted, and remembered for
        Explain when no tier holds the page any more."""
        self.counters["promotion_failures"] += 1
        if self.holds(ns, key.block_hash) is None:
            self._lost(
                key,
                f"{source} tier",
                f"promotion from the {source} tier failed: corrupt or missing record",
                "corrupt",
            )

    def _read_host(self, prom: Promotion) -> tuple[PageMeta, int] | bool:
        if self.host is None:
            raise InvariantBroken(f"promoting {prom.key} from a host tier that does not exist")
        try:
            got = self.host.read_record_into(prom.key, prom.ns.page_view(prom.page.slot))
        except (CorruptPage, ValueError) as e:
            log.warning("promotion of %s from host failed: %s", prom.key, e)
            return False
        return False if got is None else got

    def begin_reads(self) -> None:
        """Collect the disk reads of the promotions started until `end_reads` into one job
        for the reader threads (one executor hop and one callback per lookup, not per page)."""
        self._batch = []

    def end_reads(self) -> None:
        batch, self._batch = self._batch, None
        if batch:
            self._submit_reads(batch)

    def _read_disk(self, prom: Promotion) -> None:
        if self._batch is not None:
            self._batch.append(prom)
        else:
            self._submit_reads([prom])

    def _submit_reads(self, proms: list[Promotion]) -> None:
        """Read the promotions' pages from disk, in chain order (parents first). Those whose
        bytes are in the OS page cache are copied here, on the loop, at once (a memcpy is
        cheaper than the hop to a thread and back); from the first that is not, the rest go to
        the reader threads as one job."""
        disk = self.disk
        if disk is None:
            raise InvariantBroken("reading from a disk tier that does not exist")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (tools, tests of the store alone): read here
            loop = None
        inline = 0
        for prom in proms:
            write = self._queued.get(prom.key)
            if write is not None:  # its batch is not committed yet
                if loop is not None:
                    break  # a reader thread waits for it
                with contextlib.suppress(Exception):
                    write.result(swap_io.WRITE_WAIT_S)
            got = self._read_disk_one(prom.key, prom.ns.page_view(prom.page.slot), prom.ns.geometry, loop)
            if got is None:
                break
            self._read_done(prom, got, in_page_cache=True)
            inline += 1
        self.counters["promoted_disk_inline"] += inline
        rest = proms[inline:]
        if not rest or loop is None:  # (without a loop every read was done above)
            return
        jobs = [(p.key, p.ns.page_view(p.page.slot), p.ns.geometry, self._queued.get(p.key)) for p in rest]

        def read_all() -> list[tuple[PageMeta, int] | bool]:
            results: list[tuple[PageMeta, int] | bool] = []
            for key, view, geometry, write in jobs:
                if write is not None:  # a page demoted a moment ago: its write first
                    with contextlib.suppress(Exception):  # (what is on disk then decides)
                        write.result(swap_io.WRITE_WAIT_S)
                results.append(self._read_disk_one(key, view, geometry, None) or False)
            return results

        def done(results: list[tuple[PageMeta, int] | bool]) -> None:
            for prom, ok in zip(rest, results, strict=True):  # chain order: parents first
                self._read_done(prom, ok)

        fut = loop.run_in_executor(disk.readers, read_all)
        fut.add_done_callback(
            lambda f: done(f.result() if not f.cancelled() and f.exception() is None else [False] * len(rest))
        )

    def _read_disk_one(
        self, key: PageKey, view: memoryview, geometry: str, loop: asyncio.AbstractEventLoop | None
    ) -> tuple[PageMeta, int] | bool | None:
        """Read one page from disk into its pool slot: the (meta, checksum) it verified against
        if it did and is of this geometry, else False. On the loop (`loop` given) only if it
        cannot block: None if its bytes are not in the page cache (nothing was read)."""
        disk = self.disk
        if disk is None:
            raise InvariantBroken(f"reading {key} from a disk tier that does not exist")
        try:
            got = disk.read_record_into(key, view, resident_only=loop is not None)
        except (CorruptPage, ValueError) as e:
            log.warning("promotion of %s from disk failed: %s", key, e)
            return False
        if got is NOT_RESIDENT:
            return None
        if not isinstance(got, tuple) or got[0].geometry != geometry:
            return False
        return got

    def _read_done(
        self, prom: Promotion, got: tuple[PageMeta, int] | bool, in_page_cache: bool = False
    ) -> None:
        prom.read_ok = bool(got)
        prom.verified = Verified(got[0], got[1], in_page_cache) if isinstance(got, tuple) else None
        if prom.parent is None or prom.parent.ok is not None:
            self._settle(prom)

    def _settle(self, prom: Promotion) -> None:
        """Seal or free the page, once its read is done and its parent has settled; then its
        children whose reads are done."""
        ns, page = prom.ns, prom.page
        ok = bool(prom.read_ok) and (prom.parent is None or bool(prom.parent.ok))
        del self.promoting[prom.key]
        holders = len(prom.pins) + len(prom.children)
        if ok:
            parent = prom.parent.sealed if prom.parent is not None else prom.parent_page
            existing = ns.index.get(prom.key.block_hash)
            if existing is not None:  # a sequence sealed the same block meanwhile: share it
                ns.free_reserved(page)
                for _ in range(holders):
                    ns.ref(existing)
                prom.sealed = existing
            else:
                ns.seal(page, parent)  # refcount 1 (ours), replaced by the holders' count
                page.verified = prom.verified
                if holders == 0:
                    ns.unref(page)
                else:
                    page.refcount = holders
                prom.sealed = page
            for pin in prom.pins:
                pin.settled(prom, prom.sealed)
            self.counters["promoted_" + prom.source] += 1
            # The host copy stays (the host tier is inclusive): when the pool evicts the page
            # again, demoting it costs nothing.
        else:
            ns.free_reserved(page)
            for pin in list(prom.pins):
                pin.settled(prom, None)
            if prom.read_ok is False:
                self._failed(ns, prom.key, prom.source)
        if prom.parent is not None and prom.parent.sealed is not None:
            ns.unref(prom.parent.sealed)  # the reference our parent's holders count gave us
        if prom.parent_page is not None:
            ns.unref(prom.parent_page)
        prom.ok = ok
        for fut in prom._waiters:
            if not fut.done():
                fut.set_result(ok)
        children = prom.children
        # Settled: drop the links of the chain (parent <-> children is a reference cycle,
        # which would leave every chain to the garbage collector instead of freeing it here).
        prom.parent, prom.children, prom.pins = None, [], []
        for child in children:
            if child.read_ok is not None:
                self._settle(child)

    # ------------------------------------------------------------ stats and close

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.counters)
        out["promoting"] = len(self.promoting)
        out["swapped_pages"] = self.swapped_pages
        out["write_through"] = self.write_through
        out["reindex"] = dict(self.reindex_state)
        if self.host is not None:
            out["host"] = self.host.stats()
        if self.disk is not None:
            out["disk"] = self.disk.stats()
        return out

    def close(self) -> None:
        self.closing = True
        if not self._reindex_idle.wait(30):
            log.error("the disk tier's re-index did not stop within 30s; closing LMDB anyway")
        if self.disk is not None:
            self.disk.close()
        if self.host is not None:
            self.host.clear()
