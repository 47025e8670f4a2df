"""The host tier: page copies in DRAM owned by the daemon (clients never map it).

Memory comes in slabs: anonymous mmaps (prefaulted) cut into fixed-size slots, one size
class per payload size rounded up to 4 KiB (a namespace's page_bytes is fixed, so an fp
namespace uses one class; a quantized one a few: records with layers over the error bound,
or sinks, are larger). The capacity bounds the bytes of all slabs together; an emptied slab
is unmapped, so its bytes go back to the capacity for any class. A slab takes at most an
eighth of the capacity, so that one class cannot hold all of a small tier and another class
find room only by emptying it. Pages are kept in LRU order; the tier never
drops a page on its own: when it is full, `put` raises HostFull and the caller asks
`victims()` which pages to move down (to disk) or drop, then `take()`s or `remove()`s them.

Threading: not thread-safe. Every method is synchronous and meant for the daemon's event
loop (loop-owned); a copy is one memcpy of a page (~40 us for 512 KiB).
"""

from __future__ import annotations

import mmap
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .record import CorruptPage, PageKey, PageMeta, PageRecord, verify
from .shares import owner

DEFAULT_SLAB_BYTES = 32 << 20
SLOT_ALIGN = 4096


def slot_size(page_bytes: int) -> int:
    """The size class of a payload: its size rounded up to 4 KiB (as is below that)."""
    return page_bytes if page_bytes <= SLOT_ALIGN else -(-page_bytes // SLOT_ALIGN) * SLOT_ALIGN


class HostFull(Exception):
    """No slot for the page within the host tier's capacity: move or drop `victims()` first."""


class _Slab:
    __slots__ = ("free", "mapping", "slot_bytes", "view")

    def __init__(self, slot_bytes: int, slots: int) -> None:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        self.mapping = mmap.mmap(-1, max(1, slot_bytes * slots), flags=flags)
        self.view = memoryview(self.mapping)
        self.slot_bytes = slot_bytes
        self.free = list(range(slots - 1, -1, -1))  # pop() hands out slot 0 first

    @property
    def nbytes(self) -> int:
        return len(self.mapping)

    def slot(self, i: int) -> memoryview:
        return self.view[i * self.slot_bytes : (i + 1) * self.slot_bytes]

    def close(self) -> None:
        self.view.release()
        self.mapping.close()


@dataclass(slots=True)
class _Entry:
    meta: PageMeta
    checksum: int
    slab: _Slab
    slot: int


@dataclass(slots=True)
class _Class:
    slabs: list[_Slab] = field(default_factory=list)
    pages: int = 0


class HostTier:
    """Daemon-owned DRAM for pages below the pool, bounded by `capacity_bytes`."""

    def __init__(self, capacity_bytes: int, *, slab_bytes: int = DEFAULT_SLAB_BYTES) -> None:
        if capacity_bytes < 0 or slab_bytes < 1:
            raise ValueError(f"capacity_bytes={capacity_bytes} must be >= 0, slab_bytes={slab_bytes} >= 1")
        self.capacity_bytes = capacity_bytes
        self.slab_bytes = slab_bytes
        self._entries: OrderedDict[PageKey, _Entry] = OrderedDict()  # loop-owned; LRU first
        self._classes: dict[int, _Class] = {}  # slot_size(page_bytes) -> its slabs
        self._slab_total = 0  # bytes of all slabs; <= capacity_bytes
        self._bytes_used = 0  # payload bytes of the pages held
        self._bytes_represented = 0  # pool bytes they stand for (more when quantized)
        self._owned: dict[str, int] = {}  # namespace -> slot bytes of its pages (tier shares)
        # Each key namespace's keys in the same LRU order: a namespace at its share finds its
        # own least recently used pages without walking the others' (victims_of).
        self._lru_of: dict[str, OrderedDict[PageKey, None]] = {}
        self.hits = 0
        self.misses = 0
        self.corrupt = 0

    # ------------------------------------------------------------------ writing

    def has_room(self, page_bytes: int) -> bool:
        """Whether `put` of a page of this size would succeed now."""
        size = slot_size(page_bytes)
        cls = self._classes.get(size)
        if cls and any(s.free for s in cls.slabs):
            return True
        return self._new_slab_slots(size) > 0

    def put(self, record: PageRecord) -> bool:
        """Copy the record into a slot. False (and a touch) if the key is already here — a
        sealed page's bytes never change. HostFull when there is no room."""
        key = record.key
        if key in self._entries:
            self._used(key)
            return False
        n = record.meta.page_bytes
        slab, slot = self._allocate(slot_size(n))
        slab.slot(slot)[:n] = record.payload
        self._entries[key] = _Entry(record.meta, record.checksum, slab, slot)
        self._lru_of.setdefault(key.namespace, OrderedDict())[key] = None
        self._classes[slot_size(n)].pages += 1
        name = owner(key)
        self._owned[name] = self._owned.get(name, 0) + slot_size(n)
        self._bytes_used += record.meta.page_bytes
        self._bytes_represented += record.meta.represented_bytes
        return True

    def _new_slab_slots(self, size: int) -> int:
        room = self.capacity_bytes - self._slab_total
        if size == 0:
            return 1 << 16 if room >= 0 else 0
        slab = min(self.slab_bytes, max(size, self.capacity_bytes // 8))
        return min(max(1, slab // size), room // size)

    def _allocate(self, page_bytes: int) -> tuple[_Slab, int]:
        cls = self._classes.setdefault(page_bytes, _Class())
        for slab in cls.slabs:
            if slab.free:
                return slab, slab.free.pop()
        slots = self._new_slab_slots(page_bytes)
        if slots <= 0:
            raise HostFull(
                f"host tier full: {self._slab_total} of {self.capacity_bytes} bytes in slabs, "
                f"no free slot of {page_bytes} bytes; move or drop victims() first"
            )
        slab = _Slab(page_bytes, slots)
        cls.slabs.append(slab)
        self._slab_total += slab.nbytes
        return slab, slab.free.pop()

    # ------------------------------------------------------------------ reading

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[PageKey]:
        """Every key held, least recently used first (a snapshot: safe to remove while iterating)."""
        return list(self._entries)

    def _used(self, key: PageKey) -> None:
        self._entries.move_to_end(key)
        self._lru_of[key.namespace].move_to_end(key)

    def meta(self, key: PageKey) -> PageMeta | None:
        entry = self._entries.get(key)
        return entry.meta if entry else None

    def touch(self, key: PageKey) -> None:
        """Mark the page most recently used (a lookup went through it)."""
        if key in self._entries:
            self._used(key)

    def read_into(self, key: PageKey, out: memoryview | bytearray) -> PageMeta | None:
        """Copy the page into `out` (e.g. its pool slot) and verify the copy there: what the
        caller reads is what was checked. None on a miss; CorruptPage (the page is dropped)
        when the copy does not verify."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        dst = memoryview(out).cast("B")
        if dst.nbytes != entry.meta.page_bytes:
            raise ValueError(f"page {key} is {entry.meta.page_bytes} bytes, the buffer {dst.nbytes}")
        dst[:] = entry.slab.slot(entry.slot)[: dst.nbytes]
        self._check(key, entry, dst)
        self._used(key)
        self.hits += 1
        return entry.meta

    def read_record_into(self, key: PageKey, out: memoryview | bytearray) -> tuple[PageMeta, int] | None:
        """`read_into`, returning the metadata and the checksum the copy verified against."""
        meta = self.read_into(key, out)
        return None if meta is None else (meta, self._entries[key].checksum)

    def read_stored(self, key: PageKey) -> tuple[PageMeta, int, memoryview] | None:
        """A verified copy of the stored payload: (meta, checksum, payload) for a caller that
        decodes it (a quantized record) itself. None on a miss; CorruptPage (the page is
        dropped) when the copy does not verify."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        payload = memoryview(bytearray(entry.meta.page_bytes))
        self.read_into(key, payload)
        return entry.meta, entry.checksum, payload

    def get(self, key: PageKey) -> bytes | None:
        """A verified copy of the page's bytes, or None on a miss."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        out = bytearray(entry.meta.page_bytes)
        self.read_into(key, out)
        return bytes(out)

    def record(self, key: PageKey) -> PageRecord | None:
        """The page as a record with its original checksum (for the disk tier), the payload
        a verified copy; the page stays here. None on a miss."""
        payload = self.get(key)
        if payload is None:
            return None
        entry = self._entries[key]
        return PageRecord(entry.meta, payload, entry.checksum)

    def refuse(self, key: PageKey) -> None:
        """A page that verified but that its reader cannot use (a quantized record the codec
        refuses): dropped and counted as corrupt."""
        if self.remove(key):
            self.corrupt += 1

    def _check(self, key: PageKey, entry: _Entry, payload: memoryview) -> None:
        try:
            verify(key, entry.meta, entry.checksum, payload)
        except CorruptPage:
            self.corrupt += 1
            self.remove(key)
            raise

    # ------------------------------------------------------------------ eviction

    def victims(self, n: int, page_bytes: int | None = None) -> list[PageKey]:
        """Up to `n` keys, least recently used first, that the caller should move down or
        drop. With `page_bytes`, when no new slab fits, only pages of that size (removing
        them frees slots the new page can use); the pages stay until removed."""
        size = None if page_bytes is None else slot_size(page_bytes)
        if size is not None and self._new_slab_slots(size) <= 0:
            cls = self._classes.get(size)
            if cls and cls.pages:
                out = []
                for key, entry in self._entries.items():
                    if slot_size(entry.meta.page_bytes) == size:
                        out.append(key)
                        if len(out) >= n:
                            break
                return out
        out = []
        for key in self._entries:
            if len(out) >= n:
                break
            out.append(key)
        return out

    def owned_bytes(self, namespace: str) -> int:
        """Slot bytes of `namespace`'s pages here (its swapped-out sequences' included)."""
        return self._owned.get(namespace, 0)

    def victims_of(self, namespace: str, n: int) -> list[PageKey]:
        """Up to `n` of `namespace`'s cached pages, least recently used first (a namespace
        over its share gives up its own pages, not another's; never its swapped sequences',
        which are no cache: they count, and its next swap-out goes to disk instead)."""
        out = []
        for key in self._lru_of.get(namespace, ()):
            out.append(key)
            if len(out) >= n:
                break
        return out

    def take(self, key: PageKey) -> PageRecord | None:
        """`record(key)` then `remove(key)`: move a page out (demotion to disk)."""
        rec = self.record(key)
        if rec is not None:
            self.remove(key)
        return rec

    def remove(self, key: PageKey) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        mine = self._lru_of[key.namespace]
        del mine[key]
        if not mine:
            del self._lru_of[key.namespace]
        size = slot_size(entry.meta.page_bytes)
        cls = self._classes[size]
        cls.pages -= 1
        name = owner(key)
        self._owned[name] -= size
        if not self._owned[name]:
            del self._owned[name]
        self._bytes_used -= entry.meta.page_bytes
        self._bytes_represented -= entry.meta.represented_bytes
        slab = entry.slab
        slab.free.append(entry.slot)
        if len(slab.free) * slab.slot_bytes >= slab.nbytes or (size == 0 and not cls.pages):
            cls.slabs.remove(slab)  # empty: give its bytes back to every class
            self._slab_total -= slab.nbytes
            slab.close()
        return True

    def clear(self) -> None:
        for key in list(self._entries):
            self.remove(key)

    def stats(self) -> dict[str, Any]:
        return {
            "capacity_bytes": self.capacity_bytes,
            "bytes_used": self._bytes_used,
            "bytes_represented": self._bytes_represented,
            "slab_bytes": self._slab_total,
            "pages": len(self._entries),
            "hits": self.hits,
            "misses": self.misses,
            "corrupt": self.corrupt,
        }
