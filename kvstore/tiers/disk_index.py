"""What the disk tier knows in memory: which keys are committed, the bytes each takes, their
LRU order, the keys found corrupt whose delete is still queued, and the counters.

Shared by the writer thread (commits, deletes, evictions), reader threads (touch, counters)
and the re-index; every field is guarded by `lock`, held only for dict operations.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from .record import PageKey

COUNTERS = (
    "puts",
    "batches",
    "syncs",
    "hits",
    "misses",
    "corrupt",
    "evicted",
    "dropped",
    "disk_full_events",
    "map_full_errors",
)


class DiskIndex:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: OrderedDict[PageKey, int] = OrderedDict()  # key -> bytes in the map; LRU first; lock
        self.bytes_used = 0  # lock
        self.dropped: set[PageKey] = set()  # corrupt, delete queued: read as misses; lock
        self.counters = dict.fromkeys(COUNTERS, 0)  # lock

    def __contains__(self, key: object) -> bool:
        with self.lock:
            return key in self.entries

    def __len__(self) -> int:
        with self.lock:
            return len(self.entries)

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counters[name] += n

    def committed(self, sizes: dict[PageKey, int]) -> None:
        """Records committed (new, or replaced): most recently used."""
        with self.lock:
            for key, size in sizes.items():
                self.bytes_used += size - self.entries.pop(key, 0)
                self.entries[key] = size
            self.counters["puts"] += len(sizes)

    def found(self, key: PageKey, size: int) -> None:
        """A record seen by the re-index; the caller holds `lock`."""
        if key not in self.entries:
            self.entries[key] = size
            self.bytes_used += size

    def discard(self, keys: Iterable[PageKey | bytes]) -> None:
        with self.lock:
            for k in keys:
                if isinstance(k, PageKey):
                    self.bytes_used -= self.entries.pop(k, 0)
                    self.dropped.discard(k)

    def touch(self, keys: Iterable[PageKey]) -> None:
        with self.lock:
            for k in keys:
                if k in self.entries:
                    self.entries.move_to_end(k)

    def oldest_first(self, keys: list[PageKey]) -> None:
        """Put `keys` (in this order) before every other key: the order after a restart."""
        with self.lock:
            for k in reversed(keys):
                if k in self.entries:
                    self.entries.move_to_end(k, last=False)

    def mark_dropped(self, key: PageKey) -> None:
        with self.lock:
            self.counters["corrupt"] += 1
            self.dropped.add(key)
            self.bytes_used -= self.entries.pop(key, 0)

    def is_dropped(self, key: PageKey) -> bool:
        with self.lock:
            return key in self.dropped

    def incoming(self, keys: Iterable[PageKey], cost: int) -> int:
        """How far `cost` more bytes for `keys` would take bytes_used (replacing their old size)."""
        with self.lock:
            return self.bytes_used + cost - sum(self.entries.get(k, 0) for k in keys)

    def victims(self, nbytes: int, exclude: Iterable[PageKey]) -> tuple[list[PageKey], int]:
        """Least recently used keys worth at least `nbytes` (fewer if there are not enough)."""
        skip = set(exclude)
        out: list[PageKey] = []
        freed = 0
        with self.lock:
            for key, size in self.entries.items():
                if freed >= nbytes:
                    break
                if key not in skip:
                    out.append(key)
                    freed += size
        return out, freed

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"bytes_used": self.bytes_used, "pages": len(self.entries), **self.counters}
