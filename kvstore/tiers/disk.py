"""The disk tier: pages in an LMDB environment, written by one writer thread in batches.

Three named databases: `meta` (key -> record metadata + checksum, ~120 bytes), `data`
(key -> payload) and `state` (bookkeeping). A record's meta and data are written in the same
transaction, so it is there whole or not at all; the re-index scans only `meta`.

Threading (py-lmdb's rule: a write transaction never crosses threads):
- the writer thread (disk_writer.py) owns every write transaction. `put_async`,
  `remove_async` and `flush_async` queue work for it and return concurrent futures (any
  thread may call them; `put_many`/`flush` await them from asyncio);
- reads (`get`, `read_into`, `meta`) run on any thread in their own short read
  transactions: synchronously, or via `aget`/`aread_into` on the tier's reader pool. Each
  is counted (open_reads.py), so the writer can wait for them when their snapshots hold
  the pages it needs;
- the in-memory index (disk_index.py) is shared under one lock.

Durability: the environment is opened with sync=False (no fsync per commit). A committed
batch is in the OS page cache, so it survives `kill -9` of the process; `flush()` commits
everything queued before it and then fsyncs (`env.sync(True)`), so after it returns the
pages survive a power loss too. Without fsync LMDB may lose batches committed after the last
sync on an OS crash (and with writemap, on a file system that reorders writes, its
consistency); `sync_commits=True` fsyncs every batch instead. docs/tiers.md has the numbers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import lmdb

from kvstore.errors import InvariantBroken

from .disk_health import CORRUPTION, DiskUnavailable, DiskWriteError, is_io_error
from .disk_open import headroom_bytes, open_writer
from .disk_recall import Recall
from .disk_reindex import scan
from .disk_writer import BatchLimits, DiskWriter
from .record import CorruptPage, PageKey, PageMeta, PageRecord, decode_meta, verify
from .residency import PageCacheCopier, copy_off_the_gil

log = logging.getLogger(__name__)

__all__ = ["NOT_RESIDENT", "DiskTier", "DiskUnavailable", "DiskWriteError", "headroom_bytes"]

NOT_RESIDENT = object()  # read_record_into(resident_only=True): not in the page cache


class DiskTier:
    """Pages in LMDB under `path`; the file never grows past `capacity_bytes` (the map size).
    Build with `DiskTier.open`; close with `close()` (or use it as a context manager)."""

    def __init__(
        self, env: lmdb.Environment, path: Path, capacity_bytes: int, writer: DiskWriter, reader_threads: int
    ) -> None:
        self.path = path
        self.capacity_bytes = capacity_bytes
        self._env = env
        self._dbs = writer.dbs
        self._index = writer.index
        self._writer = writer
        self.shares = writer.shares  # per-namespace shares of this tier (shares.py)
        self._open_reads = writer.open_reads  # every read transaction is counted there
        self._health = writer.health  # disabled (corrupt, file deleted): reads miss, writes fail
        # For aget/aread_into; its threads start on first use.
        self._readers = cf.ThreadPoolExecutor(reader_threads, thread_name_prefix="kvstore-disk-read")
        # Reads on the event loop copy only from the page cache through this (residency.py).
        self._cached = PageCacheCopier(str(path / "data.mdb"), env.stat()["psize"])
        # What earlier reads learnt (decoded metadata, file offsets): cheaper reads again.
        self._recall = Recall(self._cached, self._index)
        writer.on_deleted = self._recall.forget_deleted
        self._closed = False
        self.queue_bytes = 128 << 20  # bound of the payload bytes queued for the writer
        self.flushing = 0  # Admin.Flush calls streaming into the tier now (store/tiering/flush.py)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        capacity_bytes: int,
        *,
        batch_records: int = 256,
        batch_bytes: int = 4 << 20,
        batch_wait_s: float = 0.002,
        reader_threads: int = 4,
        writemap: bool = False,
        readahead: bool = True,
        sync_commits: bool = False,
        on_evict: Callable[[list[PageKey]], None] | None = None,
        policy: str = "horizon",
        check: bool = True,
        queue_bytes: int = 128 << 20,
    ) -> DiskTier:
        """Open (creating) the environment in `path` (mode 0700), clear reader slots of dead
        processes (`reader_check`) and start the writer. Nothing on disk is indexed until
        `reindex()` has run. `on_evict(keys)` is called on the writer thread with the keys it
        evicted to make room (hop to your loop with call_soon_threadsafe). `policy` names the
        eviction policy (kvstore.policy) that picks them, leaves first; ValueError if unknown.
        With `check`, an existing file is walked in a child process first and moved aside if
        it is corrupt, and the map is clamped to the file system's room (disk_check.py)."""
        path = Path(path)
        writer, capacity_bytes = open_writer(
            path,
            capacity_bytes,
            limits=BatchLimits(batch_records, batch_bytes, batch_wait_s),
            reader_threads=reader_threads,
            writemap=writemap,
            readahead=readahead,
            sync_commits=sync_commits,
            on_evict=on_evict,
            policy=policy,
            check=check,
        )
        tier = cls(writer.env, path, capacity_bytes, writer, reader_threads)
        tier.queue_bytes = queue_bytes
        writer.start()
        return tier

    @property
    def soft_limit_bytes(self) -> int:
        """Writes evict down to this; the headroom above it holds B-tree pages and lets
        deletes commit even when the map is full."""
        return self._writer.soft_limit_bytes

    # ------------------------------------------------------------------ writing (any thread)

    def put_async(self, records: Iterable[PageRecord]) -> cf.Future[list[PageKey]]:
        """Queue records for the writer. The future resolves once their batch is committed
        (visible to reads, safe from kill -9; not fsynced: see flush), to the keys dropped
        because they cannot fit even in an empty tier (usually [])."""
        return self._submit("put", list(records))

    def has_queue_room(self, nbytes: int) -> bool:
        """Whether `nbytes` more of payload fit in the write queue's bound (`queue_bytes`);
        one record always fits in an empty queue. Callers drop or wait (store/tiering/flush.py)."""
        queued = self._writer.queued_bytes()
        return queued == 0 or queued + nbytes <= self.queue_bytes

    def barrier(self) -> cf.Future[int]:
        """Resolves once everything queued before it is written (no fsync)."""
        return self._submit("remove", [])

    async def put_many(self, records: Iterable[PageRecord]) -> list[PageKey]:
        return await asyncio.wrap_future(self.put_async(records))

    def remove_async(self, keys: Iterable[PageKey | bytes]) -> cf.Future[int]:
        """Queue deletions; resolves to how many of the records were there."""
        return self._submit("remove", list(keys))

    def flush_async(self) -> cf.Future[None]:
        """Resolves once everything queued before it is committed and fsynced. Raises
        DiskWriteError if a batch since the last flush failed (its futures raised too);
        records dropped for size are reported by their put futures, not here."""
        return self._submit("flush", None)

    async def flush(self) -> None:
        await asyncio.wrap_future(self.flush_async())

    def flush_sync(self, timeout: float | None = None) -> None:
        self.flush_async().result(timeout)

    def _submit(self, kind: str, payload: Any) -> cf.Future:
        if self._closed or not self._health.ok:
            fut: cf.Future = cf.Future()
            fut.set_exception(DiskUnavailable(self._health.reason or f"disk tier {self.path} is closed"))
            return fut
        return self._writer.submit(kind, payload)

    def close(self, timeout: float = 30.0) -> None:
        """Commit and fsync what is queued, stop the writer and the readers, close LMDB."""
        if self._closed:
            return
        self._closed = True
        if not self._writer.stop(timeout):
            log.error(
                "disk tier %s: the writer did not stop within %.0fs; LMDB left open", self.path, timeout
            )
            return
        self._readers.shutdown(wait=True)
        self._env.close()
        self._cached.close()
        self._health.close()

    def __enter__(self) -> DiskTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ reading (any thread)

    def __contains__(self, key: object) -> bool:
        """Committed and not found corrupt (after `reindex()` for what an earlier run wrote)."""
        return key in self._index and not self._health.reason

    def __len__(self) -> int:
        return len(self._index)

    def keys_of(self, namespace: str) -> list[PageKey]:
        """The keys of `namespace` on disk now (a snapshot; a deleted namespace's, to remove)."""
        with self._index.lock:
            return [k for k in self._index.entries if k.namespace == namespace]

    def touch(self, keys: Iterable[PageKey]) -> None:
        """Tell the eviction policy the pages were used (e.g. a lookup went through them)."""
        self._index.touch(keys)

    def meta(self, key: PageKey) -> PageMeta | None:
        """The stored metadata (no payload read), or None; CorruptPage if it is garbage."""
        if not self._health.ok:
            return None
        try:
            with self._open_reads.txn(self._env) as txn:
                raw = txn.get(key.encode(), db=self._dbs.meta)
                if raw is None or self._index.is_dropped(key):
                    return None
                try:
                    return decode_meta(key, raw)[0]
                except CorruptPage as e:
                    raise self._corrupt(e) from None
        except lmdb.Error as e:
            self._lmdb_failed(e)
            return None

    def read_into(self, key: PageKey, out: memoryview | bytearray) -> PageMeta | None:
        """Copy the page into `out` (e.g. its pool slot) and verify the copy there: what the
        caller reads is what was checked. None on a miss; CorruptPage when it fails (the
        record is then dropped: counted, logged, deleted, a miss from then on)."""
        got = self._read(key, memoryview(out).cast("B"))
        if got is NOT_RESIDENT:
            raise InvariantBroken(f"reading {key}: NOT_RESIDENT from a read that may block")
        return None if got is None else got[0]

    def read_record_into(
        self, key: PageKey, out: memoryview | bytearray, *, resident_only: bool = False
    ) -> tuple[PageMeta, int] | object | None:
        """`read_into`, returning the metadata and the checksum the copy verified against.
        With `resident_only` (for the event loop) only if the record's payload is in the OS
        page cache, so the copy cannot wait for the device (residency.py); NOT_RESIDENT,
        having read and counted nothing, when it is not (read it on a reader thread)."""
        got = self._read(key, memoryview(out).cast("B"), resident_only)
        if got is None or got is NOT_RESIDENT:
            return got
        meta, _, crc = got  # type: ignore[misc]
        return meta, crc

    def read_stored(
        self, key: PageKey, *, resident_only: bool = False
    ) -> tuple[PageMeta, int, memoryview] | object | None:
        """The stored payload, a verified copy: (meta, checksum, payload) for a caller that
        decodes it (a quantized record). None on a miss, CorruptPage as read_into;
        `resident_only` and NOT_RESIDENT as read_record_into."""
        got = self._read(key, None, resident_only)
        if got is None or got is NOT_RESIDENT:
            return got
        meta, payload, crc = got  # type: ignore[misc]
        return meta, crc, payload

    def get(self, key: PageKey) -> bytes | None:
        """A verified copy of the page's bytes, or None on a miss (CorruptPage as read_into)."""
        got = self._read(key, None)
        return None if got is None else bytes(got[1])

    @property
    def readers(self) -> cf.ThreadPoolExecutor:
        """The tier's reader threads, for callers that add checks of their own to a read."""
        return self._readers

    async def aget(self, key: PageKey) -> bytes | None:
        """`get` on the tier's reader pool, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._readers, self.get, key)

    async def aread_into(self, key: PageKey, out: memoryview | bytearray) -> PageMeta | None:
        return await asyncio.get_running_loop().run_in_executor(self._readers, self.read_into, key, out)

    def _read(
        self, key: PageKey, dst: memoryview | None, resident_only: bool = False
    ) -> tuple[PageMeta, memoryview, int] | object | None:
        if self._index.is_dropped(key) or not self._health.ok:
            self._index.count("misses")
            return None
        if resident_only and dst is not None:
            got = self._recall.read_at(key, dst)
            if got is not None:
                return got
        offset: int | None = None
        commit_id = self._index.commit_id(key) if resident_only else None  # (before the txn)
        try:
            with self._open_reads.txn(self._env) as txn:
                raw = key.encode()
                meta_raw = txn.get(raw, db=self._dbs.meta)
                payload = txn.get(raw, db=self._dbs.data)
                if meta_raw is None or payload is None:
                    self._index.count("misses")
                    return None
                meta, crc, body = self._recall.decode(key, bytes(meta_raw))
                if dst is None:
                    dst = memoryview(bytearray(meta.page_bytes))
                elif dst.nbytes != meta.page_bytes:
                    raise ValueError(f"page {key} is {meta.page_bytes} bytes, the buffer {dst.nbytes}")
                if len(payload) != meta.page_bytes:
                    raise CorruptPage(
                        key, f"payload is {len(payload)} bytes, the metadata says {meta.page_bytes}"
                    )
                if resident_only:  # (on the loop: only from the page cache, residency.py)
                    if not self._cached.copy(payload, dst):
                        return NOT_RESIDENT
                    offset = self._cached.offset_of(payload)
                else:  # (off the loop: numpy's copy lets go of the GIL; see copy_off_the_gil)
                    copy_off_the_gil(dst, payload)
            verify(key, meta, crc, dst, body)  # the copy, after the transaction: what the caller gets
        except CorruptPage as e:
            raise self._corrupt(e) from None
        except lmdb.Error as e:  # LMDB's own structure is damaged: a miss, the tier disabled
            self._lmdb_failed(e)
            self._index.count("misses")
            return None
        if offset is not None and commit_id is not None:
            self._recall.remember(key, offset, commit_id, meta, crc, body)
        self._index.hit(key)
        return meta, dst, crc

    def refuse(self, key: PageKey) -> None:
        """A record that verified but that its reader cannot use (a quantized record the codec
        refuses): dropped like a corrupt one (counted, logged, deleted; a miss from now on)."""
        if not self._index.is_dropped(key):
            self._corrupt(CorruptPage(key, "its reader refused it"))

    def _corrupt(self, e: CorruptPage) -> CorruptPage:
        """Count and drop a corrupt record; returns the error for the caller to raise."""
        self._index.mark_dropped(e.key)
        self._recall.forget(e.key)
        log.warning("disk tier %s: page %s is corrupt (%s); dropping it", self.path, e.key, e.reason)
        if not self._closed:
            self.remove_async((e.key,))
        return e

    def _lmdb_failed(self, e: lmdb.Error) -> None:
        """An error from LMDB on a read (the read is a miss): a damaged file disables the
        tier; anything else (e.g. out of reader slots) is counted and logged, and passes."""
        if isinstance(e, CORRUPTION):
            self._health.corrupt(e)
        else:
            self._health.count("io_errors" if is_io_error(e) else "read_errors")
            log.warning("disk tier %s: a read failed (%s: %s); a miss", self.path, type(e).__name__, e)

    # ------------------------------------------------------------------ re-index

    def reindex(
        self,
        progress: Callable[[int, int, float], None] | None = None,
        *,
        chunk: int = 2048,
        progress_every_s: float = 1.0,
    ) -> Iterator[PageMeta]:
        """Yield the metadata of every record on disk and rebuild the index (disk_reindex.py).
        LMDB finding its file damaged disables the tier (disk_health.py) and ends the scan."""
        if not self._health.ok:
            return
        try:
            yield from scan(self._writer, progress, chunk, progress_every_s)
        except lmdb.Error as e:
            self._lmdb_failed(e)

    # ------------------------------------------------------------------ stats

    @property
    def policy_name(self) -> str:
        """The eviction policy that picks what the tier evicts when full."""
        return self._index.policy_name

    def stats(self) -> dict[str, Any]:
        """capacity/soft limit, policy (the eviction policy's name), bytes_used (estimated
        bytes in the map of the pages held), pages, counters (puts, batches, syncs, hits,
        misses, corrupt, evicted, dropped, disk_full_events, map_full_errors), map_used_bytes
        (the file's high-water mark), queued."""
        out: dict[str, Any] = {
            "capacity_bytes": self.capacity_bytes,
            "soft_limit_bytes": self.soft_limit_bytes,
            "policy": self._index.policy_name,
        }
        out |= self._index.snapshot()
        out |= self._health.stats()
        if not self._closed:
            out["map_used_bytes"] = (self._env.info()["last_pgno"] + 1) * self._env.stat()["psize"]
        out["queued"] = self._writer.queued()
        out["queued_bytes"] = self._writer.queued_bytes()
        out["queue_bytes"] = self.queue_bytes
        out["flushing"] = self.flushing
        return out
