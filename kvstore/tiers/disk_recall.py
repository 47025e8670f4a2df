"""What the disk tier remembers of the records it read, so that reading them again costs
less: their decoded metadata (decoding is a third of a read's Python) and where their
payload was in the data file (a read on the loop then copies from there without LMDB).
Both are bounded (RECORDS_REMEMBERED, ~0.8 KiB each), forget a record once it is deleted,
and are only ever a shortcut: what they give must verify, or LMDB decides. Dict operations
are atomic: any thread."""

from __future__ import annotations

from collections.abc import Iterable

from .disk_index import DiskIndex
from .record import META_HEAD_BYTES, CorruptPage, PageKey, PageMeta, decode_meta, verify
from .residency import PageCacheCopier

RECORDS_REMEMBERED = 16384


class Recall:
    def __init__(self, cached: PageCacheCopier, index: DiskIndex) -> None:
        self._cached = cached
        self._index = index
        # key -> (the stored bytes, meta, checksum, BODY); used only while LMDB returns the
        # very same bytes (a rewritten record decodes again).
        self._decoded: dict[PageKey, tuple[bytes, PageMeta, int, bytes]] = {}
        # key -> (file offset of the payload when last read on the loop, the index's commit
        # id of that record, its meta, checksum, BODY): see `read_at`.
        self._offsets: dict[PageKey, tuple[int, int, PageMeta, int, bytes]] = {}

    def remember(
        self, key: PageKey, offset: int, commit_id: int, meta: PageMeta, crc: int, body: bytes
    ) -> None:
        if len(self._offsets) >= RECORDS_REMEMBERED:
            self._offsets.clear()  # (a bound, not a policy)
        self._offsets[key] = (offset, commit_id, meta, crc, body)

    def forget(self, key: PageKey) -> None:
        self._offsets.pop(key, None)

    def forget_deleted(self, keys: Iterable[PageKey | bytes]) -> None:
        """The writer deleted these records: what was learnt of them is of no more use. Keys
        that never come back (a swapped-out sequence's private pages) would otherwise stay
        until the bound: ~0.8 KiB each, a soak's RSS creeping for minutes (BENCHMARKS.md)."""
        for key in keys:
            self._decoded.pop(key, None)  # type: ignore[call-overload]
            self._offsets.pop(key, None)  # type: ignore[call-overload]

    def read_at(self, key: PageKey, dst: memoryview) -> tuple[PageMeta, memoryview, int] | None:
        """The read on the loop of a record read there before, without LMDB, while the index
        says the same write is on disk (its commit id): copy from the page cache at the file
        offset its payload had then, and verify against its metadata and checksum. Half the
        cost of a read through LMDB (a read transaction, two B-tree lookups, finding the
        address). None if anything is off (not read before, rewritten or deleted since, not
        in the page cache, or bytes that do not verify); then LMDB decides, as for any read.
        A delete or rewrite that commits during the copy is seen as a read transaction begun
        before it would see it: the freed pages are not reused for two more commits, and
        bytes that verify are this record's anyway (the checksum covers key and payload)."""
        known = self._offsets.get(key)
        if known is None:
            return None
        offset, commit_id, meta, crc, body = known
        if commit_id != self._index.commit_id(key):
            return None
        if dst.nbytes != meta.page_bytes or not self._cached.copy_at(offset, dst):
            return None
        try:
            verify(key, meta, crc, dst, body)
        except CorruptPage:
            self._offsets.pop(key, None)
            return None
        self._index.hit(key)
        return meta, dst, crc

    def decode(self, key: PageKey, raw: bytes) -> tuple[PageMeta, int, bytes]:
        """decode_meta, remembered while the stored bytes stay the same; also the BODY bytes
        as stored (the checksum is over them)."""
        known = self._decoded.get(key)
        if known is not None and known[0] == raw:
            return known[1], known[2], known[3]
        meta, crc = decode_meta(key, raw)
        body = raw[META_HEAD_BYTES:]  # (decode_meta checked the lengths)
        if len(self._decoded) >= RECORDS_REMEMBERED:
            self._decoded.clear()  # (a bound, not a policy: re-decoding is cheap)
        self._decoded[key] = (raw, meta, crc, body)
        return meta, crc, body
