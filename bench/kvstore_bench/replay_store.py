"""Replaying a trace through the real store for `kvstore-bench replay` (replay.py).

Each request runs through a real `kvstore.store.namespace.Namespace` (its PageTable, PrefixIndex and eviction policy) with
`capacity` pages: walk the blocks and count hits up to the first miss (prefix semantics: a
block hits only if every block before it in the request hit), pin the hits, make room and
reserve + seal the missing blocks under their parent (as an engine writes a prompt's KV),
then unpin everything at the end of the request. A request longer than what eviction can
free caches only the blocks that fit.

Block keys are interned from (key of the parent, hash id), so two blocks share a page only
when their whole prefixes are equal, even in a trace whose ids are not chained.

Per run: `hit_rate` (hit blocks / blocks), `belady_hit_rate` (offline optimum at the same
capacity, see `belady_hits` in trace.py), `ceiling` (infinite cache: every block seen before hits),
`ratio_to_belady`, and `compute_saved`: hits weighted by what their block costs to recompute
at its position. A block at position i (0-based) of a request attends to (i+1) blocks of
context, and its linear layers (QKV/O projections, MLP) cost about as much as attention over
6·d_model tokens, so cost(i) = (i + 1) + C with C = 6·d_model / block_size (`--d-model`,
default 4096: C = 48 for 512-token blocks); compute_saved = Σ cost over hits / Σ cost over
all blocks.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

from kvstore.memory.shm_pool import ShmPool
from kvstore.policy import make_policy
from kvstore.store.namespace import Namespace
from kvstore.store.types import PAGE_ALIGN, NamespaceSpec

from .trace import Trace

_pool_ids = itertools.count()


@dataclass
class RunResult:
    policy: str
    capacity_blocks: int
    capacity_frac: float
    accesses: int
    hits: int
    hit_rate: float
    belady_hit_rate: float
    ceiling: float
    ratio_to_belady: float
    compute_saved: float
    accesses_per_s: float
    truncated_requests: int  # requests whose missing blocks did not all fit


def _namespace(policy: str, capacity: int, block_size: int) -> Namespace:
    spec = NamespaceSpec(
        name="replay",
        num_layers=1,
        num_kv_heads=1,
        head_dim=1,
        dtype="uint8",
        page_tokens=block_size,
        num_pages=capacity,
        policy=policy,
    )
    # The namespace never touches pool bytes here; a one-OS-page segment satisfies it.
    pool = ShmPool.create_for("kvsreplay-", f"{next(_pool_ids)}", PAGE_ALIGN)
    return Namespace(spec, pool, make_policy(policy))


def seal_missing(ns: Namespace, keys: list[bytes], chain: list[int], held: list[Any]) -> bool:
    """After a request's hits (`held`, referenced): make room for its missing blocks and seal
    them under their parent, as an engine writes a prompt's KV, appending them to `held`.
    True if not all of them fit (the request is truncated)."""
    want = len(chain) - len(held)
    truncated = False
    if want > len(ns.pages.free):
        room = min(want, ns.obtainable())
        truncated, want = room < want, room
        ns.make_room(want, "replay")
    parent = held[-1] if held else None
    for node in chain[len(held) : len(held) + want]:
        page = ns.reserve(0)
        page.block_hash = keys[node]
        ns.seal(page, parent)
        held.append(page)
        parent = page
    return truncated


def replay_store(
    trace: Trace, policy: str, capacity: int, block_size: int = 512, tick: Any = None
) -> tuple[list[int], int, float]:
    """Replay through a real Namespace. Returns (hit blocks per request, truncated requests, seconds)."""
    ns = _namespace(policy, capacity, block_size)
    try:
        keys = trace.keys
        get = ns.index.get
        ref, unref, touch = ns.ref, ns.unref, ns.touch
        hits_per_request: list[int] = []
        truncated = 0
        t0 = time.perf_counter()
        for r, chain in enumerate(trace.requests):
            held: list[Any] = []
            for node in chain:
                page = get(keys[node])
                if page is None:
                    break
                held.append(page)
            n_hit = len(held)
            hits_per_request.append(n_hit)
            if held:
                for page in held:
                    ref(page)
                touch(held)
            truncated += seal_missing(ns, keys, chain, held)
            for page in reversed(held):
                unref(page)
            if tick is not None and r & 255 == 0:
                tick(r)
        return hits_per_request, truncated, time.perf_counter() - t0
    finally:
        ns.pool.close()


def run_one(
    trace: Trace,
    policy: str,
    capacity: int,
    frac: float,
    *,
    block_size: int,
    weights: tuple[list[float], float],
    belady: list[int],
    ceiling: list[int],
    tick: Any = None,
) -> RunResult:
    hits, truncated, seconds = replay_store(trace, policy, capacity, block_size, tick)
    total = sum(hits)
    acc = max(1, trace.accesses)
    prefix, cost_total = weights
    opt = sum(belady) / acc
    rate = total / acc
    return RunResult(
        policy=policy,
        capacity_blocks=capacity,
        capacity_frac=round(frac, 6),
        accesses=trace.accesses,
        hits=total,
        hit_rate=rate,
        belady_hit_rate=opt,
        ceiling=sum(ceiling) / acc,
        ratio_to_belady=rate / opt if opt else 1.0,
        compute_saved=sum(prefix[h] for h in hits) / cost_total if cost_total else 0.0,
        accesses_per_s=trace.accesses / seconds if seconds else 0.0,
        truncated_requests=truncated,
    )
