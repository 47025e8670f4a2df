"""The tiers below the pools, as the store uses them: what is below, demotion, the disk write
queue, write-through and the successor map behind prefetch (docs/tiers.md, "In the store").
Promotion is in promote.py, a swapped sequence's private pages in private.py, Admin.Flush in
flush.py, the re-index at start in reindex.py; all of them work on the one `Tiers`.

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
- **Write-through** (`on_sealed`): with `write_through`, each page is queued for disk as it
  is sealed. What is queued for disk is bounded (`disk_queue_bytes`): past it a demotion is
  dropped, counted (`put_disk`).
- **Prefetch**: the store records which page followed which (`successor`); a lookup that hits
  every full page of its prompt promotes up to `prefetch_pages` pages that followed last time.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvstore.errors import InvariantBroken
from kvstore.memory.pages import Page
from kvstore.store.namespace import GoneKind
from kvstore.store.page_sums import intact
from kvstore.store.tiering import shares
from kvstore.store.tiering.promotion import Promotion, Verified
from kvstore.store.tiering.quantize import TierQuant
from kvstore.store.tiering.reindex_state import ReindexState
from kvstore.tiers import CorruptPage, DiskTier, HostTier, PageKey, PageMeta, PageRecord, TierName, make_meta
from kvstore.tiers.shares import SWAP_SEPARATOR

if TYPE_CHECKING:
    from kvstore.store.namespace import Namespace

log = logging.getLogger(__name__)

SUCCESSORS_REMEMBERED = 1 << 20
# Records of swapped-out sequences' unsealed pages live under "<namespace>" + this: never
# found by a lookup, and deleted at the next start (their sequences died with the daemon).
SWAP_SUFFIX = SWAP_SEPARATOR + "swap"
WRITE_WAIT_S = 60.0  # a read of a page still queued for disk waits this long for its write


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
        self.queued: dict[PageKey, cf.Future[list[Any]]] = {}
        self.read_batch: list[Promotion] | None = None  # disk reads collected by promote.begin_reads()
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
        self.share_evictions: Counter[str] = Counter()  # namespace -> host pages moved out at its share
        self.reindex_state = ReindexState()
        self.closing = False
        self.reindex_idle = threading.Event()  # set unless a re-index thread is reading LMDB
        self.reindex_idle.set()
        self.quant = TierQuant()  # namespaces stored quantized below the pool (quantize.py)
        # Told when a page leaves every tier for good: (key, by whom, why, kind); the store
        # keeps it for Explain (Store._page_lost).
        self.on_lost: Callable[[PageKey, str, str, GoneKind], None] | None = None

    def lost(self, key: PageKey, by: str, why: str, kind: GoneKind = GoneKind.EVICTED) -> None:
        if self.on_lost is not None:
            self.on_lost(key, by, why, kind)

    # ------------------------------------------------------------ what is below

    def holds(self, ns: Namespace, block_hash: bytes) -> TierName | None:
        """Which tier holds the page, or None."""
        return self.holds_key(ns, PageKey(ns.name, block_hash))

    def holds_key(self, ns: Namespace, key: PageKey) -> TierName | None:
        """`holds` by the page's key."""
        if key in self.quant.encoding:
            return TierName.HOST  # (its record is being made: a promotion copies the original)
        if self.host is not None and key in self.host:
            meta = self.host.meta(key)
            if meta is not None and meta.geometry == ns.geometry and self.readable(ns, meta):
                return TierName.HOST
        if self.disk is not None and (key in self.disk or key in self.queued):
            return TierName.DISK  # (a queued record is read once its batch has committed)
        return None

    @staticmethod
    def readable(ns: Namespace, meta: PageMeta) -> bool:
        """Whether a promotion into `ns` can read the record: the pool's bytes, or a quantized
        record of them when `ns` is quantized (an fp namespace reads only exact bytes)."""
        if meta.raw_bytes:
            return meta.raw_bytes == ns.spec.page_bytes and ns.spec.tier_quantized
        return meta.page_bytes == ns.spec.page_bytes

    def disk_evicted(self, keys: list[PageKey]) -> None:
        """The disk tier evicted `keys` to make room (DiskTier's on_evict, hopped to the loop):
        those in no other tier are gone for good."""
        for key in keys:
            if key in self.queued or key in self.promoting or (self.host is not None and key in self.host):
                continue
            self.lost(key, f"disk tier ({self.disk.policy_name})", "disk tier full")

    def note_successor(self, ns_name: str, parent_hash: bytes, child_hash: bytes) -> None:
        key = PageKey(ns_name, parent_hash)
        self._successor[key] = child_hash
        self._successor.move_to_end(key)
        if len(self._successor) > SUCCESSORS_REMEMBERED:
            self._successor.popitem(last=False)

    def successor(self, ns_name: str, block_hash: bytes) -> bytes | None:
        return self._successor.get(PageKey(ns_name, block_hash))

    # ------------------------------------------------------------ down

    def record(self, ns: Namespace, page: Page, copy: bool) -> PageRecord | None:
        """The page as a record for a tier (its payload a `bytes` copy with `copy`, else a view
        of the pool slot; a quantized record for a quantized namespace). A page that came up
        from a tier keeps the metadata and checksum its bytes verified against then: no new
        checksum (and bytes changed in the pool since, by a client writing where it must not,
        fail that checksum at the next promotion). None for a page dequantized from a record:
        its bytes are not the original, and quantizing them again would compound the error."""
        if page.block_hash is None:
            raise InvariantBroken(f"namespace {ns.name!r}: demoting {page}, which has no block hash")
        view = ns.page_out(page.slot)
        if not intact(ns.guard, page, view):  # scribbled on since its seal: never copied below
            return None
        verified = page.verified
        if isinstance(verified, Verified):
            meta = verified.meta
            if meta.raw_bytes:
                self.quant.counters["not_requantized"] += 1
                return None
            # (A quantized namespace's exact bytes are quantized again, below.)
            if (
                meta.block_hash == page.block_hash
                and meta.namespace == ns.name
                and not ns.spec.tier_quantized
            ):
                return PageRecord(meta, bytes(view) if copy else view, verified.checksum)
        parent = page.parent.block_hash if page.parent is not None and page.parent.block_hash else b""
        if ns.spec.tier_quantized:
            return self.quant.record(ns, page.block_hash, parent, view)
        meta = make_meta(
            ns.name, page.block_hash, parent, ns.spec.page_tokens, ns.spec.page_bytes, ns.geometry
        )
        return PageRecord.build(meta, bytes(view) if copy else view)

    def original(self, ns: Namespace, page: Page) -> tuple[bytes, bytes] | None:
        """A quantized namespace's page to quantize: (its parent's hash, a copy of its bytes),
        or None if its bytes were dequantized from a record (never quantized twice)."""
        verified = page.verified
        if isinstance(verified, Verified) and verified.meta.raw_bytes:
            return None
        view = ns.page_out(page.slot)
        if not intact(ns.guard, page, view):
            return None
        parent = page.parent.block_hash if page.parent is not None and page.parent.block_hash else b""
        return parent, bytes(view)

    def demote(self, ns: Namespace, page: Page) -> None:
        """Copy a sealed page the pool is about to free into the tier below (if not there)."""
        key = PageKey(ns.name, page.block_hash or b"")
        host, disk = self.host, self.disk
        if host is not None and key in host:
            host.touch(key)  # (a sealed page never changes: the copy below is still its bytes)
            self.counters["demoted_clean"] += 1
            return
        on_disk = disk is not None and (key in disk or key in self.queued)
        verified = page.verified
        if on_disk and isinstance(verified, Verified) and (verified.in_page_cache or verified.meta.raw_bytes):
            # It came up from disk through the OS page cache: its bytes are in DRAM there
            # already, and a host copy would be a second one (a memcpy, a host slot and the
            # host tier's bookkeeping for nothing). Should the kernel drop them, the next
            # promotion reads it on a reader thread, and its next demotion copies it here.
            # (Or it was dequantized from its record on disk: that record is all there is.)
            self.counters["demoted_clean"] += 1
            return
        if ns.spec.tier_quantized:
            if on_disk and host is None:
                self.counters["demoted_clean"] += 1  # freeing the slot loses nothing
            else:
                self._demote_quantized(ns, page, key)
            return
        # Any other page on disk still goes into the host tier if it can make room (moving
        # its coldest pages down): the next hit on it is then a copy from DRAM, not a read
        # from the device.
        if host is not None and self.make_host_room(ns.spec.page_bytes, ns):
            rec = self.record(ns, page, copy=False)  # (a view: put copies into its slab)
            if rec is not None:
                host.put(rec)
                self.counters["demoted_host"] += 1
        elif on_disk:
            self.counters["demoted_clean"] += 1  # freeing the slot loses nothing
        elif disk is not None:
            rec = self.record(ns, page, copy=True)
            if rec is not None and self.put_disk([rec]):
                self.counters["demoted_disk"] += 1

    def _demote_quantized(self, ns: Namespace, page: Page, key: PageKey) -> None:
        """A quantized namespace's page: its bytes copied (the slot is freed next), its record
        made on the quantizer's threads and placed by `_placed` (quantize.py)."""
        if key in self.quant.encoding:
            self.counters["demoted_clean"] += 1
            return
        original = self.original(ns, page)
        if original is None:
            self.quant.counters["not_requantized"] += 1
            self.lost(key, "quantized tier", "dequantized from a record no longer below the pool")
            return
        self.quant.start(ns, key, *original, self._placed)

    def _placed(self, ns: Namespace, key: PageKey, rec: PageRecord | None) -> None:
        """A demoted page's quantized record is made: into the host tier if it can make room,
        else to disk (unless a copy is there already)."""
        host, disk = self.host, self.disk
        if rec is None or self.closing:
            self.lost(key, "quantized tier", "its record could not be made")
            return
        if host is not None and key in host:
            return
        on_disk = disk is not None and (key in disk or key in self.queued)
        if host is not None and self.make_host_room(rec.meta.page_bytes, ns):
            host.put(rec)
            self.counters["demoted_host"] += 1
        elif on_disk:
            self.counters["demoted_clean"] += 1
        elif disk is not None and self.put_disk([rec]):
            self.counters["demoted_disk"] += 1

    def make_host_room(self, page_bytes: int, ns: Namespace | None = None) -> bool:
        """Room in the host tier for a page (of `ns`: within its share first, shares.py),
        moving least recently used pages down; False if there can be none."""
        host = self.host
        if host is None:
            raise InvariantBroken("making room in a host tier that does not exist")
        if ns is not None and not shares.host_room(
            host, ns, page_bytes, self.move_down, self.share_evictions
        ):
            return False
        while not host.has_room(page_bytes):
            victims = host.victims(8, page_bytes)
            if not victims:
                return False  # the page is larger than the whole host tier
            self.move_down(victims)
        return True

    def move_down(self, victims: list[PageKey]) -> None:
        """Host pages out: to disk unless there already, else dropped."""
        host = self.host
        if host is not None:
            down: list[PageRecord] = []
            for key in victims:
                if self.disk is not None and key not in self.disk and key not in self.queued:
                    try:
                        record = host.take(key)
                    except CorruptPage:
                        self.lost(key, "host tier", "failed its checksum in the host tier", GoneKind.CORRUPT)
                        continue  # counted and removed by the host tier; nothing to save
                    if record is not None:
                        down.append(record)
                else:
                    host.remove(key)
                    if self.disk is None:
                        self.lost(key, "host tier (LRU)", "host tier full, no disk tier below it")
            if down and self.put_disk(down):  # one queue entry and one future for the batch
                self.counters["host_to_disk"] += len(down)

    def put_disk(self, records: list[PageRecord], strict: bool = False) -> cf.Future[list[Any]] | None:
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
                self.lost(key, "disk write queue", "the disk write queue was full")
            return None
        fut = self.disk.put_async(records)
        for key in keys:
            self.queued[key] = fut

        def committed(done: cf.Future[list[Any]]) -> None:
            # (`done`, not `fut` from the closure: a future holding a callback that holds
            # the future is a reference cycle, left for the garbage collector to find.)
            for key in keys:
                if self.queued.get(key) is done:  # (not a later write of the same key)
                    self.queued.pop(key, None)

        fut.add_done_callback(committed)
        return fut

    def on_sealed(self, ns: Namespace, page: Page) -> None:
        if page.parent is not None and page.parent.block_hash and page.block_hash:
            self.note_successor(ns.name, page.parent.block_hash, page.block_hash)
        if self.write_through and page.block_hash:
            key = PageKey(ns.name, page.block_hash)
            if self.disk is not None and key not in self.disk and key not in self.queued:
                if ns.spec.tier_quantized:  # (made on the quantizer's threads)
                    original = self.original(ns, page) if key not in self.quant.encoding else None
                    if original is not None:
                        self.quant.start(ns, key, *original, self._written)
                    return
                record = self.record(ns, page, copy=True)
                if record is not None:
                    self.put_disk([record])
                    self.counters["written_through"] += 1

    def _written(self, ns: Namespace, key: PageKey, rec: PageRecord | None) -> None:
        """A written-through page's quantized record is made: to disk, unless it is there."""
        if rec is None or self.closing or self.disk is None or key in self.disk or key in self.queued:
            return
        if self.put_disk([rec]):
            self.counters["written_through"] += 1

    # ------------------------------------------------------------ stats and close

    def admit(self, ns: Namespace) -> None:
        if self.disk is not None:  # (the writer thread reads it: one dict assignment)
            self.disk.shares.caps[ns.name] = shares.cap(ns.spec.tier_share, self.disk.soft_limit_bytes)

    def usage(self, name: str) -> dict[str, int]:
        host, disk = self.host, self.disk
        return {
            "host_bytes": host.owned_bytes(name) if host is not None else 0,
            "disk_bytes": disk.shares.owned_bytes(name) if disk is not None else 0,
            "share_evictions": self.share_evictions[name]
            + (disk.shares.evicted[name] if disk is not None else 0),
        }

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.counters)
        out["promoting"] = len(self.promoting)
        out["swapped_pages"] = self.swapped_pages
        out["write_through"] = self.write_through
        out["reindex"] = dataclasses.asdict(self.reindex_state)
        out["quant"] = self.quant.stats()
        if self.host is not None:
            out["host"] = self.host.stats()
        if self.disk is not None:
            out["disk"] = self.disk.stats()
        return out

    def close(self) -> None:
        self.closing = True
        self.quant.close()  # (records being made are dropped: a cache)
        if not self.reindex_idle.wait(30):
            log.error("the disk tier's re-index did not stop within 30s; closing LMDB anyway")
        if self.disk is not None:
            self.disk.close()
        if self.host is not None:
            self.host.clear()
