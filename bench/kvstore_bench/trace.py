"""Mooncake-schema traces and the offline references a replay is measured against.

`parse_trace` reads one request a line (`hash_ids`; other fields ignored) and interns each
block as a node of the prefix tree, keyed by (parent node, hash id), so two blocks are the
same only when their whole prefixes are. `belady_hits` is the offline optimum under prefix
semantics, `ceiling_hits` the infinite cache, `compute_weights` the recompute cost model of
`compute_saved` (see replay.py).
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass
from typing import Any

from .harness import BenchError

# ---------------------------------------------------------------- the trace


@dataclass
class Trace:
    path: str
    requests: list[list[int]]  # per request: block node ids, root first
    keys: list[bytes]  # node id -> the block key the index stores
    accesses: int

    @property
    def distinct(self) -> int:
        return len(self.keys)


def parse_trace(lines: Any, path: str = "<lines>") -> Trace:
    """Requests of a Mooncake-schema JSONL stream, block ids interned into prefix-tree nodes."""
    nodes: dict[tuple[int, int], int] = {}
    requests: list[list[int]] = []
    accesses = 0
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ids = json.loads(line)["hash_ids"]
        except (ValueError, KeyError, TypeError) as e:
            raise BenchError(f"{path}:{lineno}: not a request with hash_ids ({e})") from None
        parent = -1
        chain = []
        for hid in ids:
            node = nodes.setdefault((parent, hid), len(nodes))
            chain.append(node)
            parent = node
        requests.append(chain)
        accesses += len(chain)
    keys = [n.to_bytes(8, "little") for n in range(len(nodes))]
    return Trace(path, requests, keys, accesses)


def load_trace(path: str) -> Trace:
    try:
        with open(path, encoding="utf-8") as f:
            return parse_trace(f, path)
    except OSError as e:
        raise BenchError(f"cannot read trace {path}: {e.strerror}") from None


# ---------------------------------------------------------------- offline references


def belady_hits(trace: Trace, capacity: int) -> list[int]:
    """Hit blocks per request of Belady's MIN at `capacity` blocks, under prefix semantics.

    Blocks are accessed in trace order; a missing block is inserted and, when the cache is
    over capacity, the resident block (the new one included, so MIN may bypass) whose next
    use is farthest goes. With chained keys a parent's next use always comes before its
    child's (same request, earlier position), and blocks never used again are evicted
    deepest first, so the victim is always a leaf: MIN's schedule respects leaf-first, and
    under leaf-first a block after a miss is never resident, so its prefix hits equal its
    plain hits. MIN maximises plain hits over all schedules (bypass allowed), hence this is
    the optimum for prefix caches of unit-size blocks too: an upper bound for every policy
    (which are further constrained by pins). O(log n) per access (lazy heap).
    """
    n = trace.distinct
    flat = [node for chain in trace.requests for node in chain]
    depth = [0] * n
    for chain in trace.requests:
        for i, node in enumerate(chain):
            depth[node] = i
    never = len(flat) + 1
    next_use = [0] * len(flat)
    upcoming = [never] * n
    for t in range(len(flat) - 1, -1, -1):
        node = flat[t]
        next_use[t] = upcoming[node]
        upcoming[node] = t
    resident = [False] * n
    key_of = [0] * n  # current next use of a resident node (heap entries with another value are stale)
    heap: list[tuple[int, int, int]] = []  # (-next_use, -depth, node)
    size = 0
    out: list[int] = []
    t = 0
    for chain in trace.requests:
        hit = 0
        prefix = True
        for node in chain:
            nu = next_use[t]
            t += 1
            if resident[node]:
                if prefix:
                    hit += 1
            else:
                prefix = False
                resident[node] = True
                size += 1
            key_of[node] = nu
            heapq.heappush(heap, (-nu, -depth[node], node))
            while size > capacity:
                negnu, _, victim = heapq.heappop(heap)
                if resident[victim] and key_of[victim] == -negnu:
                    resident[victim] = False
                    size -= 1
        out.append(hit)
        if len(heap) > 4 * (size + 1024):
            heap = [(-key_of[v], -depth[v], v) for v in range(n) if resident[v]]
            heapq.heapify(heap)
    return out


def ceiling_hits(trace: Trace) -> list[int]:
    """Hit blocks per request of an infinite cache: every block seen before hits."""
    seen = bytearray(trace.distinct)
    out = []
    for chain in trace.requests:
        hit = 0
        for node in chain:
            if seen[node]:
                hit += 1
            else:
                seen[node] = 1
        out.append(hit)
    return out


def compute_weights(trace: Trace, block_size: int, d_model: int) -> tuple[list[float], float]:
    """Prefix sums of cost(i) = (i + 1) + C (see the module doc) and the total over the trace."""
    c = 6 * d_model / block_size
    longest = max((len(ch) for ch in trace.requests), default=0)
    prefix = [0.0]
    for i in range(longest):
        prefix.append(prefix[-1] + i + 1 + c)
    total = sum(prefix[len(ch)] for ch in trace.requests)
    return prefix, total
