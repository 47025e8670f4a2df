"""What the disk tier knows in memory: which keys are committed, the bytes each takes, which
record extends which, the eviction policy over them, the keys found corrupt whose delete is
still queued, and the counters.

Eviction uses the pool's policy interface (kvstore/policy): one `EvictionPolicy` over a
lightweight `Page` per committed key, leaf-first as in the pool. Lookups walk a prefix chain
from its root, so a record whose child (a record of the same namespace whose parent_hash is
its hash) is also on disk is not a candidate: evicting it would strand the child. Children
are counted by parent key whether or not the parent is on disk, so a parent committed after
its children (the pool demotes leaves first) starts as a non-candidate; a record whose
parent is not on disk is a candidate like a root.

Shared by the writer thread (commits, deletes, evictions), reader threads (touch, counters)
and the re-index; every field is guarded by `lock` (the policies are not thread-safe), held
only for dict and heap operations: O(log n) per key. Two things on a read's path take no
lock: membership tests (one dict or set lookup, atomic under the GIL) and `hit`, which
queues the key; queued hits are applied in order, under the lock, before anything that
reads or changes the policy's order (victims, commits, touches, stats). A read is the
hottest path of the tier (every promotion from disk), and the lock and the policy's heap
update were a fifth of its cost.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Iterable
from typing import Any

from kvstore.errors import InvariantBroken
from kvstore.memory.pages import Page
from kvstore.policy import EvictionPolicy, make_policy

from .record import PageKey
from .shares import owner

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
    "reader_waits",
)
HITS_QUEUED_MAX = 256  # the read that queues this many applies them (~0.3 ms on the loop here)


class _Record(Page):
    """A committed key as the policy sees it: `slot` (a running id), `block_hash`,
    `last_access` and `policy_state`; the rest of Page stays unused."""

    __slots__ = ("commit_id", "key", "leaving", "parent_key")

    def __init__(self, slot: int, key: PageKey, parent_key: PageKey | None) -> None:
        super().__init__(slot)
        self.key = key
        self.block_hash = key.block_hash
        self.parent_key = parent_key  # the record it extends (on disk or not); None at a root
        self.leaving = False  # handed out by victims(), delete not yet done
        self.commit_id = 0  # which commit wrote the record now on disk (DiskIndex.commit_id)


def parent_of(key: PageKey, parent_hash: bytes) -> PageKey | None:
    return PageKey(key.namespace, parent_hash) if parent_hash and parent_hash != key.block_hash else None


class DiskIndex:
    def __init__(self, policy: str = "horizon") -> None:
        """`policy`: an eviction policy name (kvstore.policy); ValueError if unknown."""
        self.policy_name = policy
        self.lock = threading.Lock()
        self._policy: EvictionPolicy = make_policy(policy)  # lock
        self.entries: dict[PageKey, int] = {}  # key -> bytes in the map; lock
        self._records: dict[PageKey, _Record] = {}  # the same keys; lock
        self._children: dict[PageKey, int] = {}  # parent key -> committed records extending it; lock
        self._clock = 0  # logical time of commits and hits (Page.last_access); lock
        self._slots = 0  # the last slot id given out; lock
        self._commits = 0  # the last commit id given out; lock
        self.bytes_used = 0  # lock
        self.owned: dict[str, int] = {}  # namespace (shares.owner) -> bytes of its records; lock
        # Each key namespace's keys, least recently used first (commits and hits): a namespace
        # at its share finds its own victims without popping the others' (victims); lock
        self._lru_of: dict[str, OrderedDict[PageKey, None]] = {}
        self._represented: dict[PageKey, int] = {}  # key -> bytes of pool page it stands for; lock
        self.bytes_represented = 0  # lock (> bytes_used when records are quantized)
        self.dropped: set[PageKey] = set()  # corrupt, delete queued: read as misses; lock
        self.counters = dict.fromkeys(COUNTERS, 0)  # lock
        self._hits: deque[PageKey] = deque()  # reads' hits not yet applied (any thread appends)

    def __contains__(self, key: object) -> bool:
        return key in self.entries  # (one dict lookup: atomic under the GIL)

    def __len__(self) -> int:
        with self.lock:
            return len(self.entries)

    def commit_id(self, key: PageKey) -> int | None:
        """An id of the write of the record now under `key` (it changes when the record is
        rewritten, and a deleted key has none); None if the key is not on disk. Set after
        the write has committed, so a read transaction begun after this call sees that
        write or a later one. No lock: one dict lookup and one attribute read."""
        rec = self._records.get(key)
        return None if rec is None else rec.commit_id

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counters[name] += n

    # ------------------------------------------------------------------ records in and out (lock held)

    def _add(self, key: PageKey, size: int, parent_hash: bytes, last_access: int, represented: int) -> None:
        self._commits += 1
        rec = self._records.get(key)
        parent = parent_of(key, parent_hash)
        self.bytes_used += size - self.entries.get(key, 0)
        name = owner(key)
        self.owned[name] = self.owned.get(name, 0) + size - self.entries.get(key, 0)
        self.entries[key] = size
        mine = self._lru_of.setdefault(key.namespace, OrderedDict())
        mine[key] = None
        mine.move_to_end(key)
        self.bytes_represented += represented - self._represented.get(key, 0)
        self._represented[key] = represented
        if rec is not None:  # replaced: the block hash fixes the parent, but a swap key need not
            if rec.leaving:  # a victim whose delete did not happen: indexed again
                rec.leaving = False
                rec.parent_key = parent
                self._link(rec)
                if not self._children.get(key):
                    self._policy.on_evictable(rec)
            elif rec.parent_key != parent:
                self._unlink(rec)
                rec.parent_key = parent
                self._link(rec)
            rec.last_access = last_access
            rec.commit_id = self._commits
            self._policy.on_access(rec)
            return
        self._slots += 1
        rec = _Record(self._slots, key, parent)
        rec.commit_id = self._commits
        self._records[key] = rec
        rec.last_access = last_access
        self._policy.on_sealed(rec)
        self._link(rec)
        if not self._children.get(key):
            self._policy.on_evictable(rec)

    def _remove(self, key: PageKey) -> None:
        rec = self._records.pop(key, None)
        if rec is None:
            return
        size = self.entries.pop(key)
        self.bytes_used -= size
        mine = self._lru_of[key.namespace]
        del mine[key]
        if not mine:
            del self._lru_of[key.namespace]
        name = owner(key)
        self.owned[name] -= size
        if not self.owned[name]:
            del self.owned[name]
        self.bytes_represented -= self._represented.pop(key, 0)
        self._policy.on_unevictable(rec)
        self._policy.on_dropped(rec)
        if not rec.leaving:  # a leaving record let go of its parent already
            self._unlink(rec)

    def _link(self, rec: _Record) -> None:
        """`rec` is on disk: its parent, if on disk too, is no longer a leaf."""
        if rec.parent_key is None:
            return
        n = self._children.get(rec.parent_key, 0)
        self._children[rec.parent_key] = n + 1
        parent = self._records.get(rec.parent_key)
        if n == 0 and parent is not None and not parent.leaving:
            self._policy.on_unevictable(parent)

    def _unlink(self, rec: _Record) -> None:
        """`rec` leaves: its parent, once it has no child left on disk, is a candidate."""
        if rec.parent_key is None:
            return
        n = self._children[rec.parent_key] - 1
        if n:
            self._children[rec.parent_key] = n
            return
        del self._children[rec.parent_key]
        parent = self._records.get(rec.parent_key)
        if parent is not None and not parent.leaving:
            self._policy.on_evictable(parent)

    # ------------------------------------------------------------------ the writer, readers, re-index

    def committed(self, records: dict[PageKey, tuple[int, bytes, int]]) -> None:
        """Records committed (new, or replaced), key -> (size, parent_hash, represented bytes):
        most recently used."""
        with self.lock:
            self._apply_hits()
            for key, (size, parent_hash, represented) in records.items():
                self._clock += 1
                self._add(key, size, parent_hash, self._clock, represented)
            self.counters["puts"] += len(records)

    def found(self, key: PageKey, size: int, parent_hash: bytes, represented: int) -> None:
        """A record seen by the re-index; the caller holds `lock`. Older than anything put since
        start (last access 0) until `oldest_first` orders it."""
        if key not in self.entries:
            self._add(key, size, parent_hash, 0, represented)

    def discard(self, keys: Iterable[PageKey | bytes]) -> None:
        with self.lock:
            for k in keys:
                if isinstance(k, PageKey):
                    self._remove(k)
                    self.dropped.discard(k)

    def touch(self, keys: Iterable[PageKey]) -> None:
        """Hits: one clock tick and a policy access each."""
        with self.lock:
            self._apply_hits()
            for k in keys:
                rec = self._records.get(k)
                if rec is not None:
                    self._clock += 1
                    rec.last_access = self._clock
                    self._policy.on_access(rec)
                    self._lru_of[k.namespace].move_to_end(k)

    def hit(self, key: PageKey) -> None:
        """A read found `key`: queued, to be counted and touched in order under the lock."""
        hits = self._hits
        hits.append(key)
        if len(hits) >= HITS_QUEUED_MAX:
            with self.lock:
                self._apply_hits()

    def _apply_hits(self) -> None:
        """Count and touch the queued hits, oldest first (lock held)."""
        hits = self._hits
        n = len(hits)
        if not n:
            return
        records, policy = self._records, self._policy
        for _ in range(n):
            rec = records.get(hits.popleft())
            if rec is not None:
                self._clock += 1
                rec.last_access = self._clock
                policy.on_access(rec)
                self._lru_of[rec.key.namespace].move_to_end(rec.key)
        self.counters["hits"] += n

    def oldest_first(self, keys: list[PageKey]) -> None:
        """Order `keys` (in this order) before every other key: the order after a restart.
        The policy is rebuilt, fed `keys` and then the rest (by last access) with increasing
        last access and no access counted; O(n log n), once per re-index."""
        with self.lock:
            self._apply_hits()
            order = [self._records[k] for k in keys if k in self._records]
            first = {rec.slot for rec in order}
            rest = [rec for rec in self._records.values() if rec.slot not in first]
            rest.sort(key=lambda rec: (rec.last_access, rec.slot))
            self._policy = make_policy(self.policy_name)
            self._lru_of = {}
            for clock, rec in enumerate(order + rest, 1):
                self._lru_of.setdefault(rec.key.namespace, OrderedDict())[rec.key] = None
                rec.last_access = clock
                rec.policy_state = None
                self._policy.on_sealed(rec)
                if not rec.leaving and not self._children.get(rec.key):
                    self._policy.on_evictable(rec)
            self._clock = max(self._clock, len(self._records))

    def mark_dropped(self, key: PageKey) -> None:
        with self.lock:
            self.counters["corrupt"] += 1
            self.dropped.add(key)
            self._remove(key)

    def is_dropped(self, key: PageKey) -> bool:
        return key in self.dropped  # (one set lookup: atomic under the GIL)

    def incoming(self, keys: Iterable[PageKey], cost: int) -> int:
        """How far `cost` more bytes for `keys` would take bytes_used (replacing their old size)."""
        with self.lock:
            return self.bytes_used + cost - sum(self.entries.get(k, 0) for k in keys)

    # ------------------------------------------------------------------ eviction (writer thread)

    def victims(
        self, nbytes: int, exclude: Iterable[PageKey], namespace: str | None = None
    ) -> tuple[list[PageKey], int]:
        """The policy's victims worth at least `nbytes` (fewer if there are not enough), never
        one of `exclude`, leaves first: a victim's parent becomes a candidate at once. They
        stay indexed (marked leaving) until `discard`; `restore` them if the delete fails.
        With `namespace`, only that namespace's cached pages (a namespace over its share)."""
        skip = set(exclude)
        out: list[PageKey] = []
        held: list[_Record] = []  # popped but excluded: candidates again afterwards
        freed = 0
        with self.lock:
            self._apply_hits()
            if namespace is not None:
                return self._victims_of(namespace, nbytes, skip)
            policy = self._policy
            while freed < nbytes:
                rec = policy.victim()
                if rec is None:
                    break
                if not isinstance(rec, _Record):
                    raise InvariantBroken(f"the disk tier's policy chose {rec!r}, not one of its records")
                if rec.key in skip:
                    held.append(rec)
                    continue
                rec.leaving = True
                self._unlink(rec)
                out.append(rec.key)
                freed += self.entries[rec.key]
            for rec in held:
                policy.on_evictable(rec)
        return out, freed

    def _victims_of(self, namespace: str, nbytes: int, skip: set[PageKey]) -> tuple[list[PageKey], int]:
        """`victims` of one namespace's cached records (lock held): its least recently used
        leaves, by commit and hit order rather than the policy's (only its own are walked),
        each with the ancestors it leaves childless (a prompt's pages, from its tail)."""
        out: list[PageKey] = []
        freed = 0
        for key in self._lru_of.get(namespace, ()):  # (taking a victim changes no order)
            rec: _Record | None = self._records[key]
            while rec is not None and freed < nbytes:
                key = rec.key
                if rec.leaving or key in skip or key.namespace != namespace or self._children.get(key):
                    break
                self._policy.on_unevictable(rec)  # (as if the policy had chosen it)
                rec.leaving = True
                self._unlink(rec)
                out.append(key)
                freed += self.entries[key]
                rec = self._records.get(rec.parent_key) if rec.parent_key is not None else None
            if freed >= nbytes:
                break
        return out, freed

    def restore(self, keys: Iterable[PageKey]) -> None:
        """Victims whose delete failed: on disk still, candidates again (leaves first)."""
        with self.lock:
            for key in keys:
                rec = self._records.get(key)
                if rec is None or not rec.leaving:
                    continue
                rec.leaving = False
                self._link(rec)
                if not self._children.get(key):
                    self._policy.on_evictable(rec)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            self._apply_hits()
            return {
                "bytes_used": self.bytes_used,
                "bytes_represented": self.bytes_represented,
                "pages": len(self.entries),
                **self.counters,
            }
