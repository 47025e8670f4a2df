"""Miss-ratio curves from a sampled access log (SHARDS, Waldspurger et al., FAST'15).

`MrcSampler.record(block_hash)` sees every block access; it keeps only the accesses whose
spatial hash falls under a threshold: hash(block) mod P < T, a sample rate R = T/P. A block
is either always sampled or never, so the reuse distances among sampled blocks are the
true ones scaled by R. `curve(capacities)` computes each sampled access's LRU stack
distance (distinct sampled blocks since its previous access, O(log n) with a Fenwick tree),
scales it by 1/R, and reports for each capacity C the hit rate of an LRU cache of C blocks:
the fraction of accesses whose scaled distance is below C — every capacity from one pass.
The SHARDS-adj correction moves the difference between the expected (R x accesses) and the
actual number of sampled accesses into the hits at distance 0, which removes most of the
bias a few very popular blocks give a small sample.

Prefix semantics. A block only hits if every earlier block of its request hit. With chained
hashes a parent is accessed, root first, every time a child is, so its stack distance is
never larger than the child's (plus the blocks in between in the same request): when a
child's distance is below C, so are its ancestors', and the per-block estimate already
respects prefix semantics. The store's LRU also evicts leaves first and pins the blocks of
a running request; both move the exact curve a little from the stack model, and
`kvstore-bench replay --mrc` reports that error against exact replays through the store.

Memory is bounded: when more than `max_keys` distinct blocks are sampled, the threshold T
is halved and the log is filtered to the blocks still under it (fixed-size SHARDS), so a
long-running daemon keeps a sample of at most `max_keys` blocks and `max_log` accesses
(the oldest half of the log is forgotten beyond that: the curve is of recent history), at about
16 bytes a sampled access (two list slots; the hashes are the memo's int objects, the
accesses-before are small gaps).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from itertools import accumulate, pairwise

MODULUS = 1 << 24
_MASK64 = (1 << 64) - 1


def spatial_hash(block: bytes | int) -> int:
    """A well-mixed 64-bit hash of a block key (splitmix64 of its first 8 bytes)."""
    x = block if isinstance(block, int) else int.from_bytes(block[:8], "little")
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class MrcSampler:
    """Spatially hashed sample of a block access stream; `curve()` estimates LRU hit rates."""

    def __init__(self, rate: float = 1.0, max_keys: int = 1 << 14, max_log: int = 1 << 20) -> None:
        if not 0 < rate <= 1:
            raise ValueError(f"rate must be in (0, 1], got {rate}")
        self.threshold = max(1, round(rate * MODULUS))
        self.max_keys = max_keys
        self.max_log = max_log
        self._log: list[int] = []  # sampled accesses: spatial hashes, oldest first
        # The accesses recorded before each sampled one (for the window's total), as gaps to the
        # previous one's: mostly 0 or small, so the log costs two pointers an access and no int
        # object (those from -5 to 256 are shared). Absolute values, one int object each, made
        # a soak's RSS creep until the log's cap (BENCHMARKS.md, "soak").
        self._gaps: list[int] = []  # [0] is of no use (its predecessor is forgotten)
        self._last_seen = 0  # the last sampled access's accesses-before (when the log has one)
        self._keys: dict[bytes | int, int] = {}  # sampled block -> its spatial hash (memo)
        self._distinct: set[int] = set()  # the log's blocks (and, when stale, the forgotten head's)
        self._distinct_stale = False
        self.accesses = 0  # all accesses recorded (sampled or not)
        self._base = 0  # accesses forgotten with the log's dropped head

    @property
    def rate(self) -> float:
        return self.threshold / MODULUS

    @property
    def samples(self) -> int:
        return len(self._log)

    def record(self, block: bytes | int) -> None:
        self.accesses += 1
        h = self._keys.get(block)
        if h is None:
            h = spatial_hash(block)
            if h % MODULUS >= self.threshold:
                return
            self._keys[block] = h
        elif h % MODULUS >= self.threshold:
            return
        self.record_sampled(h)

    def record_sampled(self, h: int) -> None:
        """The sampled half of `record`, for a caller that has counted the access in
        `accesses` and tested `h % MODULUS < threshold` itself (the daemon's lookup path,
        kvstore/store/live_mrc.py, which tests the block hash's leading bytes directly)."""
        self._log.append(h)
        seen = self.accesses - 1
        self._gaps.append(seen - self._last_seen)
        self._last_seen = seen
        if h not in self._distinct:
            self._distinct.add(h)
            if len(self._distinct) > self.max_keys:
                self._lower_rate()
        if len(self._log) > self.max_log:
            self._forget_head()

    def record_request(self, blocks: Iterable[bytes | int]) -> None:
        """The blocks of one request, root first."""
        for block in blocks:
            self.record(block)

    def _lower_rate(self) -> None:
        """Halve the rate while the log holds more than `max_keys` distinct blocks."""
        if self._distinct_stale:
            self._narrow_to_log()
        while len(self._distinct) > self.max_keys and self.threshold > 1:
            self.threshold //= 2
            t = self.threshold
            keep = [i for i, h in enumerate(self._log) if h % MODULUS < t]
            seen = self._seen_at()
            self._log = [self._log[i] for i in keep]
            kept = [seen[i] for i in keep]
            self._gaps = [0] + [b - a for a, b in pairwise(kept)] if kept else []
            self._last_seen = kept[-1] if kept else self._last_seen
            self._distinct = {h for h in self._distinct if h % MODULUS < t}
            self._keys = {k: h for k, h in self._keys.items() if h % MODULUS < t}

    def _seen_at(self) -> list[int]:
        """The accesses recorded before each sampled one, from the gaps."""
        sums = list(accumulate(self._gaps))
        shift = self._last_seen - sums[-1] if sums else 0
        return [x + shift for x in sums]

    def _forget_head(self) -> None:
        cut = len(self._log) // 2
        self._base = self._last_seen - sum(self._gaps[cut + 1 :])  # the accesses before log[cut]
        del self._log[:cut], self._gaps[:cut]
        # `_distinct` and `_keys` still hold blocks only the forgotten half had: they are
        # narrowed to the log's when they matter, before the rate would fall for their size
        # (`_lower_rate`). Narrowed here, at every trim, they cost the daemon's Lookup more
        # than the trim itself, for a sample whose blocks are mostly still in the log.
        self._distinct_stale = True

    def _narrow_to_log(self) -> None:
        """`_distinct` and `_keys` of the blocks in the log only."""
        self._distinct = live = set(self._log)
        self._keys = {k: h for k, h in self._keys.items() if h in live}
        self._distinct_stale = False

    def distances(self) -> list[int]:
        """LRU stack distance of each sampled access among sampled blocks; -1 = first access."""
        n = len(self._log)
        tree = [0] * (n + 1)  # Fenwick tree: 1 at the latest access of each block
        last: dict[int, int] = {}
        out = []
        for t, h in enumerate(self._log):
            p = last.get(h)
            if p is None:
                out.append(-1)
            else:
                # distinct blocks accessed in (p, t) = marks in (p, t) = prefix(t) - prefix(p + 1)
                d = 0
                i = t
                while i > 0:
                    d += tree[i]
                    i -= i & -i
                i = p + 1
                while i > 0:
                    d -= tree[i]
                    i -= i & -i
                out.append(d)
                i = p + 1
                while i <= n:
                    tree[i] -= 1
                    i += i & -i
            i = t + 1
            while i <= n:
                tree[i] += 1
                i += i & -i
            last[h] = t
        return out

    def curve(self, capacities: Sequence[int]) -> list[tuple[int, float]]:
        """[(capacity in blocks, estimated LRU hit rate)] for each capacity."""
        window = self.accesses - self._base
        if not window:
            return [(c, 0.0) for c in capacities]
        rate = self.rate
        scaled = sorted(d / rate for d in self.distances() if d >= 0)
        expected = rate * window
        adj = expected - len(self._log)  # SHARDS-adj: the sampling's excess or shortfall
        out = []
        for c in capacities:
            hits = bisect_left(scaled, c) + (adj if scaled else 0.0)
            out.append((c, min(1.0, max(0.0, hits / expected))))
        return out
