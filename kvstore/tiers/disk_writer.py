"""The disk tier's one writer thread: it owns every LMDB write transaction.

Work arrives on a queue (put, remove, flush) with a concurrent future each. The writer takes
the first item, then whatever follows within the batch limits (records, bytes, a short
wait), and commits it all in one transaction per batch (last operation on a key wins); a
flush in the batch adds `env.sync(True)` before its future resolves.

Room: the map is `capacity_bytes`; writes evict records chosen by the index's eviction
policy (leaves first, never one of the batch being written) down to the soft limit first
(`disk_full_events`), so the headroom above it always holds the B-tree pages a delete
needs. A `MapFullError` anyway is counted (`map_full_errors`) and answered first by waiting
for the read transactions open then (pages freed after a reader's snapshot cannot be reused
until it ends: open_reads.py), then with more eviction and a retry; a record that cannot fit
at all is dropped and reported in its future. The writer never dies: an unexpected error
fails that batch's futures and it goes on.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import lmdb

from kvstore.errors import KVStoreError

from .disk_health import CORRUPTION, DiskFull, DiskHealth, DiskWriteError, fs_free_bytes, is_io_error
from .disk_index import DiskIndex
from .open_reads import OpenReads
from .record import PageKey, PageRecord
from .shares import DiskShares

log = logging.getLogger(__name__)

_STOP = object()
# How long the writer waits for the read transactions open at a MapFullError to end. They
# copy one record each; this bounds a reader stalled for another reason.
READERS_WAIT_S = 2.0
FS_FULL_SLACK = 8 << 20  # below this much free space, a failed write is taken for a full disk


@dataclass(frozen=True, slots=True)
class Dbs:
    meta: Any  # key -> record metadata (+ checksum)
    data: Any  # key -> payload
    state: Any  # small bookkeeping, never scanned as pages


@dataclass(frozen=True, slots=True)
class BatchLimits:
    records: int = 256
    # Bytes of payload per write transaction. Small transactions are faster without writemap:
    # LMDB mallocs each dirty overflow page, and a few MiB of them are reused across
    # transactions, while 64 MiB at once are fresh memory to fault in (2 vs 0.5-1 GB/s here).
    nbytes: int = 4 << 20
    wait_s: float = 0.002  # how long to wait for more after the first item


class _Work:
    __slots__ = ("future", "kind", "nbytes", "payload")

    def __init__(self, kind: str, payload: Any) -> None:
        self.kind = kind  # "put" | "remove" | "flush"
        self.payload = payload
        self.nbytes = sum(r.meta.page_bytes for r in payload) if kind == "put" else 0
        self.future: cf.Future = cf.Future()


class DiskWriter:
    def __init__(
        self,
        env: lmdb.Environment,
        dbs: Dbs,
        index: DiskIndex,
        *,
        name: str,
        soft_limit_bytes: int,
        limits: BatchLimits,
        on_evict: Callable[[list[PageKey]], None] | None,
        health: DiskHealth,
    ) -> None:
        self.name = name
        self.soft_limit_bytes = soft_limit_bytes
        self.env = env
        self.dbs = dbs
        self.index = index  # shared with the tier (readers, re-index)
        self.open_reads = OpenReads()  # the tier's readers count their transactions here
        self._limits = limits
        self._on_evict = on_evict
        self.shares = DiskShares(index)  # per-namespace shares of the tier (shares.py)
        self._psize = env.stat()["psize"]
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._queued_bytes = 0  # payload bytes submitted and not yet written; under _bytes_lock
        self._bytes_lock = threading.Lock()
        self._failed = 0  # records whose batch failed since the last flush; writer thread only
        self._full = 0  # records dropped because the file system was full, since the last flush
        self.health = health
        # Set by the tier: its readers' shortcuts (disk_recall.py) forget deleted records.
        self.on_deleted: Callable[[list[PageKey | bytes]], None] | None = None
        self._thread = threading.Thread(target=self._main, name="kvstore-disk-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, kind: str, payload: Any) -> cf.Future:
        work = _Work(kind, payload)
        # Queued work cannot be taken back: its future is running, so cancel() (by an awaiter
        # that went away, e.g. through asyncio.wrap_future) fails instead of failing the batch.
        work.future.set_running_or_notify_cancel()
        if work.nbytes:
            with self._bytes_lock:
                self._queued_bytes += work.nbytes
        self._queue.put(work)
        return work.future

    def queued(self) -> int:
        return self._queue.qsize()

    def queued_bytes(self) -> int:
        """Payload bytes waiting for the writer (the tier bounds this: DiskTier.has_queue_room)."""
        return self._queued_bytes

    def stop(self, timeout: float) -> bool:
        """Commit and sync what is queued, then end the thread; False if it did not in time."""
        self._queue.put(_STOP)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def cost(self, meta_len: int, page_bytes: int) -> int:
        """Bytes a record takes in the map (estimate): a payload past half a page lives on its
        own overflow pages (16-byte header, rounded up to whole pages); the rest in leaves."""
        psize = self._psize
        data = -(-(page_bytes + 16) // psize) * psize if page_bytes > psize // 2 else page_bytes + 48
        return meta_len + 48 + data

    # ------------------------------------------------------------------ the thread

    def _main(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is _STOP:
                batch, stop = [_Work("flush", None)], True
            else:
                batch, stop = self._gather(first)
            try:
                self._run(batch)
            except Exception as e:
                self._fail(batch, e)
            with self._bytes_lock:
                self._queued_bytes -= sum(w.nbytes for w in batch)

    def _fail(self, batch: list[_Work], e: Exception) -> None:
        """A batch failed: its futures raise; a damaged file disables the tier (disk_health)."""
        if isinstance(e, CORRUPTION):
            self.health.corrupt(e)
        elif is_io_error(e):
            self.health.count("io_errors")
        if self.health.ok:
            log.exception("disk tier %s: batch failed", self.name)
        self._failed += sum(len(w.payload) for w in batch if w.kind == "put")
        typed = e if isinstance(e, KVStoreError) else DiskWriteError(f"disk tier {self.name}: {e}")
        for w in batch:
            if not w.future.done():  # (a flush's error reaches a client: typed)
                w.future.set_exception(typed if w.kind == "flush" else e)

    def _gather(self, first: _Work) -> tuple[list[_Work], bool]:
        """`first` and whatever follows within the batch limits; True if a stop came."""
        batch = [first]
        n, nbytes = _size(first)
        deadline = time.monotonic() + self._limits.wait_s
        while n < self._limits.records and nbytes < self._limits.nbytes and batch[-1].kind != "flush":
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is _STOP:
                batch.append(_Work("flush", None))
                return batch, True
            batch.append(item)
            dn, db = _size(item)
            n, nbytes = n + dn, nbytes + db
        return batch, False

    def _run(self, batch: list[_Work]) -> None:
        self.health.check()  # (disabled, or its file deleted: the batch fails, typed)
        last: dict[PageKey | bytes, PageRecord | None] = {}  # in queue order, last op wins
        for w in batch:
            if w.kind == "put":
                for r in w.payload:
                    last[r.key] = r
            elif w.kind == "remove":
                for k in w.payload:
                    last[k] = None
        removes = [k for k, r in last.items() if r is None]
        puts = {k: (r.encode_meta(), r) for k, r in last.items() if r is not None}
        removed = self._delete(removes) if removes else {}
        dropped = set(self._write(puts)) if puts else set()  # type: ignore[arg-type]
        failed = 0
        full = 0
        if any(w.kind == "flush" for w in batch):
            self.env.sync(True)
            self.health.check()  # an fsync of a deleted file acknowledges nothing
            self.index.count("syncs")
            failed, self._failed = self._failed, 0
            full, self._full = self._full, 0
        self.index.count("batches")
        for w in batch:
            if w.kind == "put":
                w.future.set_result([r.key for r in w.payload if r.key in dropped])
            elif w.kind == "remove":
                w.future.set_result(sum(1 for k in w.payload if removed.get(k)))
            elif failed:
                # A flush acknowledges everything before it: not if some of it never got there.
                w.future.set_exception(
                    DiskWriteError(
                        f"disk tier {self.name}: {failed} pages failed to write since the last flush"
                        " (see the daemon's log)"
                    )
                )
            elif full:
                w.future.set_exception(
                    DiskFull(
                        f"disk tier {self.name}: its file system is full; {full} pages were not"
                        " written since the last flush (the tier shrank to fit)"
                    )
                )
            else:
                w.future.set_result(None)

    def _delete(self, keys: list[PageKey | bytes]) -> dict[PageKey | bytes, bool]:
        """Delete records by key (or raw key bytes, for garbage found by the re-index)."""
        found: dict[PageKey | bytes, bool] = {}
        with self.env.begin(write=True) as txn:
            for k in keys:
                raw = k if isinstance(k, bytes) else k.encode()
                found[k] = txn.delete(raw, db=self.dbs.meta)
                txn.delete(raw, db=self.dbs.data)
        self.index.discard(keys)
        if self.on_deleted is not None:
            self.on_deleted(keys)
        return found

    def _write(self, puts: dict[PageKey, tuple[bytes, PageRecord]]) -> list[PageKey]:
        """Commit the records, making room first. Returns the keys dropped (cannot fit)."""
        dropped = [
            k for k, (m, r) in puts.items() if self.cost(len(m), r.meta.page_bytes) > self.soft_limit_bytes
        ]
        items = [(k, v) for k, v in puts.items() if k not in dropped]
        # One transaction per `limits.nbytes`, and at most half the soft limit, so room can
        # always be made for one.
        limit = min(self._limits.nbytes, self.soft_limit_bytes // 2)
        chunk: dict[PageKey, tuple[bytes, PageRecord]] = {}
        cost = 0
        for i, (k, v) in enumerate(items):
            chunk[k] = v
            cost += self.cost(len(v[0]), v[1].meta.page_bytes)
            if i == len(items) - 1 or cost >= limit:
                dropped += self._write_chunk(chunk, cost)
                chunk, cost = {}, 0
        if dropped:
            self.index.count("dropped", len(dropped))
            log.warning("disk tier %s: dropped %d pages that do not fit", self.name, len(dropped))
        return dropped

    def _write_chunk(self, chunk: dict[PageKey, tuple[bytes, PageRecord]], cost: int) -> list[PageKey]:
        costs = {k: self.cost(len(m), r.meta.page_bytes) for k, (m, r) in chunk.items()}
        for name, over in self.shares.over(costs).items():
            self._evict(over, exclude=chunk.keys(), namespace=name)  # its own records first
        over = self.index.incoming(chunk.keys(), cost) - self.soft_limit_bytes
        if over > 0:
            self.index.count("disk_full_events")
            self._evict(over, exclude=chunk.keys())
        for attempt in range(4):
            try:
                self._commit(chunk)
                return []
            except lmdb.MapFullError:
                self.index.count("map_full_errors")
            except lmdb.Error as e:
                if not self._fs_full(e) or not self._shrink(cost, chunk.keys()):
                    break
                continue
            if attempt == 0:
                # Usually the room was made, but readers' snapshots still hold the pages freed
                # for it: once the readers open now are gone, those pages are free.
                self._wait_for_readers()
            elif not self._evict(cost * attempt + 64 * self._psize, exclude=chunk.keys()):
                break
        out = []
        for key, item in chunk.items():  # last resort: each alone, or dropped
            try:
                self._commit({key: item})
            except lmdb.MapFullError:
                out.append(key)
            except lmdb.Error as e:
                if not self._fs_full(e):
                    raise
                out.append(key)
                self._full += 1
        return out

    def _fs_full(self, e: lmdb.Error) -> bool:
        """A write failed for want of room in the file system (LMDB says EIO for a short
        write), not in the map: counted as a full disk."""
        if not is_io_error(e) or fs_free_bytes(self.health.path) > FS_FULL_SLACK:
            return False
        self.index.count("disk_full_events")
        self.health.count("fs_full_errors")
        return True

    def _shrink(self, cost: int, exclude: Iterable[PageKey]) -> bool:
        """The file cannot grow: lower the soft limit to 7/8 of what is held (for good; a
        restart sizes the map to the free space again) and evict down to it, so writes
        reuse the file's pages freed. False if nothing could be evicted."""
        used = self.index.bytes_used
        self.soft_limit_bytes = min(self.soft_limit_bytes, used * 7 // 8)
        log.warning(
            "disk tier %s: its file system is full; the tier shrinks to %d bytes",
            self.name,
            self.soft_limit_bytes,
        )
        return self._evict(used + cost - self.soft_limit_bytes, exclude)

    def _commit(self, items: dict[PageKey, tuple[bytes, PageRecord]]) -> None:
        done = {}  # key -> (size, parent_hash, represented): the index tracks which record extends which
        with self.env.begin(write=True) as txn:
            for key, (meta_raw, rec) in items.items():
                raw = key.encode()
                txn.put(raw, meta_raw, db=self.dbs.meta)
                txn.put(raw, rec.payload, db=self.dbs.data)
                meta = rec.meta
                done[key] = (
                    self.cost(len(meta_raw), meta.page_bytes),
                    meta.parent_hash,
                    meta.represented_bytes,
                )
        self.index.committed(done)

    def _delete_settled(self, victims: list[PageKey]) -> None:
        self._delete(victims)  # type: ignore[arg-type]
        # LMDB reuses pages freed by transaction N only from N+2 on (N's pages still back
        # the previous snapshot); one tiny commit in between lets the next write use them.
        with self.env.begin(write=True, db=self.dbs.state) as txn:
            txn.put(b"last_eviction_ns", str(time.time_ns()).encode())

    def _wait_for_readers(self) -> None:
        self.index.count("reader_waits")
        if not self.open_reads.wait_for_open(READERS_WAIT_S):
            log.warning("disk tier %s: a read transaction outlived %.0fs", self.name, READERS_WAIT_S)

    def _evict(self, nbytes: int, exclude: Iterable[PageKey], namespace: str | None = None) -> bool:
        """Delete the policy's victims worth `nbytes` (of `namespace` only, if given: it is
        at its share); False if none could be."""
        victims, freed = self.index.victims(nbytes, exclude, namespace)
        if not victims:
            return False
        try:
            try:
                self._delete_settled(victims)
            except lmdb.MapFullError:
                # Even a delete needs free pages; readers' snapshots may hold them.
                self.index.count("map_full_errors")
                self._wait_for_readers()
                self._delete_settled(victims)
        except lmdb.MapFullError:
            log.error("disk tier %s: map full even for deletes (headroom used up)", self.name)
            self.index.count("map_full_errors")
            self.index.restore(victims)  # still on disk (those deleted were unindexed)
            return False
        except BaseException:
            self.index.restore(victims)
            raise
        self.index.count("evicted", len(victims))
        if namespace is not None:
            self.shares.evicted[namespace] += len(victims)
        log.info("disk tier %s full: evicted %d pages (%d bytes)", self.name, len(victims), freed)
        if self._on_evict is not None:
            try:
                self._on_evict(victims)
            except Exception:
                log.exception("disk tier %s: on_evict callback failed", self.name)
        return True


def _size(w: _Work) -> tuple[int, int]:
    if w.kind == "put":
        return len(w.payload), sum(r.meta.page_bytes for r in w.payload)
    return (len(w.payload), 0) if w.kind == "remove" else (0, 0)
