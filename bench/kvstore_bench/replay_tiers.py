"""`kvstore-bench replay --host-tier-bytes`: the capacity a quantized host tier buys.

The pool is the real store code, as in replay_store.py (a real `Namespace`, its index and
eviction policy, `capacity` blocks); its evictions are demoted into a host tier of a fixed
number of bytes, and a lookup that misses in the pool continues there (prefix semantics: a
block hits if every block before it hit, in the pool or below), promoting what it finds
(the host tier keeps its copy, as kvstore's does). The tier's precision sets how many pages
its bytes hold: the bytes of one record are measured by encoding a page of the given KV
geometry (gaussian values, `page_tokens` = the trace's block size) with the daemon's codec
and its namespace scheme (kvstore/store/precision.py: int8 = vector-wise + 1 outlier, int4 =
per-channel keys + 2 outliers; a sequence's first page keeps 4 sink tokens exact), rounded up
to the host tier's slot size (kvstore/tiers/host.py `slot_size`). The host tier itself is
modelled: an LRU over those sizes (the HostTier's order), without copying bytes (a trace of
12 MB pages would copy terabytes); its slab fragmentation is not modelled.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from kvstore_client.cli.fmt import parse_bytes

from kvstore.memory.pages import Page
from kvstore.memory.shm_pool import ShmPool
from kvstore.policy import make_policy
from kvstore.quant import encode
from kvstore.store.namespace import Namespace
from kvstore.store.precision import SINK_TOKENS
from kvstore.store.types import PAGE_ALIGN, NamespaceSpec
from kvstore.tiers.host import slot_size

from .replay_store import seal_missing
from .trace import Trace

_pool_ids = itertools.count()


@dataclass(frozen=True)
class Geometry:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str

    @classmethod
    def parse(cls, text: str) -> Geometry:
        layers, heads, dim, dtype = (p.strip() for p in text.split(","))
        return cls(int(layers), int(heads), int(dim), dtype)


@dataclass(frozen=True)
class RecordSizes:
    tier_dtype: str
    page_bytes: int  # the pool page
    record_bytes: int  # a stored page (a first page: `first_bytes`, its sinks kept exact)
    first_bytes: int

    @property
    def compression(self) -> float:
        return self.page_bytes / self.record_bytes


def record_sizes(geometry: Geometry, page_tokens: int, tier_dtype: str, seed: int = 0) -> RecordSizes:
    """The bytes a page takes in a tier of this precision, by encoding one."""
    spec = NamespaceSpec(
        "capacity",
        geometry.num_layers,
        geometry.num_kv_heads,
        geometry.head_dim,
        geometry.dtype,
        page_tokens,
        1,
        tier_dtype=tier_dtype,
    )
    if not spec.tier_quantized:
        return RecordSizes(tier_dtype, spec.page_bytes, spec.page_bytes, spec.page_bytes)
    shape, scheme = spec.tier_codec()
    page = np.random.default_rng(seed).standard_normal(shape.dims, dtype=np.float32).astype(geometry.dtype)
    rest = len(encode(page.tobytes(), shape, scheme, sink_tokens=0).record)
    first = len(encode(page.tobytes(), shape, scheme, sink_tokens=min(SINK_TOKENS, page_tokens)).record)
    return RecordSizes(tier_dtype, spec.page_bytes, rest, first)


class HostModel:
    """The host tier below the replay's pool: LRU over slot-rounded record sizes, inclusive
    (a promoted page keeps its copy; demoting it again is a touch)."""

    def __init__(self, capacity_bytes: int, sizes: RecordSizes) -> None:
        self.capacity_bytes = capacity_bytes
        self.rest = slot_size(sizes.record_bytes)
        self.first = slot_size(sizes.first_bytes)
        self.lru: OrderedDict[bytes, int] = OrderedDict()
        self.used = 0

    def demote(self, ns: Namespace, page: Page) -> None:
        key = page.block_hash
        if key is None:
            return
        if key in self.lru:
            self.lru.move_to_end(key)
            return
        size = self.first if page.parent is None else self.rest
        if size > self.capacity_bytes:
            return
        while self.used + size > self.capacity_bytes:
            self.used -= self.lru.popitem(last=False)[1]
        self.lru[key] = size
        self.used += size

    def on_sealed(self, ns: Namespace, page: Page) -> None:
        pass

    def admit(self, ns: Namespace) -> None:
        pass  # one namespace, no share of the tier to set

    def usage(self, name: str) -> dict[str, int]:
        return {"host_bytes": self.used, "disk_bytes": 0, "share_evictions": 0}


@dataclass
class TieredResult:
    policy: str
    tier_dtype: str
    capacity_blocks: int  # the pool
    host_tier_bytes: int
    host_pages: int  # pages the host tier holds when full of non-first pages
    record_bytes: int
    compression: float  # pool page bytes / record bytes
    accesses: int
    hits: int
    hit_rate: float
    pool_hits: int
    host_hits: int
    seconds: float


def replay_tiered(
    trace: Trace, policy: str, capacity: int, block_size: int, host_bytes: int, sizes: RecordSizes
) -> TieredResult:
    spec = NamespaceSpec("replay", 1, 1, 1, "uint8", block_size, capacity, policy=policy)
    pool = ShmPool.create_for("kvsreplay-", f"t{next(_pool_ids)}", PAGE_ALIGN)
    host = HostModel(host_bytes, sizes)
    ns = Namespace(spec, pool, make_policy(policy), host)
    try:
        keys, get, lru = trace.keys, ns.index.get, host.lru
        ref, unref, touch, seal, reserve = ns.ref, ns.unref, ns.touch, ns.seal, ns.reserve
        free = ns.pages.free
        pool_hits = host_hits = 0
        t0 = time.perf_counter()
        for chain in trace.requests:
            held: list[Any] = []
            in_pool: list[Any] = []
            for node in chain:
                key = keys[node]
                page = get(key)
                if page is None:
                    if key not in lru:
                        break
                    lru.move_to_end(key)  # (read before the room is made: it is ours)
                    if not free:  # promote: room for one page (held pages are referenced)
                        if ns.obtainable() < 1:
                            break
                        ns.make_room(1, "promotion")
                    page = reserve(0)
                    page.block_hash = key
                    seal(page, held[-1] if held else None)  # (its reference: the reserve's)
                    host_hits += 1
                else:
                    ref(page)
                    in_pool.append(page)
                    pool_hits += 1
                held.append(page)
            if in_pool:
                touch(in_pool)
            seal_missing(ns, keys, chain, held)
            for page in reversed(held):
                unref(page)
        seconds = time.perf_counter() - t0
    finally:
        ns.pool.close()
    hits = pool_hits + host_hits
    return TieredResult(
        policy=policy,
        tier_dtype=sizes.tier_dtype,
        capacity_blocks=capacity,
        host_tier_bytes=host_bytes,
        host_pages=host_bytes // host.rest,
        record_bytes=sizes.record_bytes,
        compression=round(sizes.compression, 4),
        accesses=trace.accesses,
        hits=hits,
        hit_rate=hits / max(1, trace.accesses),
        pool_hits=pool_hits,
        host_hits=host_hits,
        seconds=seconds,
    )


def run_tiered(
    trace: Trace, policies: list[str], caps: list[tuple[int, float]], args: Any
) -> list[TieredResult]:
    """Every (pool capacity, policy, tier precision) of the command line; prints as it goes."""
    import json

    from .harness import machine_info, now_iso, progress

    geometry = Geometry.parse(args.kv_geometry)
    host_bytes = parse_bytes(args.host_tier_bytes)
    dtypes = [d.strip() for d in args.tier_dtypes.split(",") if d.strip()]
    sizes = {d: record_sizes(geometry, args.block_size, d) for d in dtypes}
    for s in sizes.values():
        progress(
            "%s: a %d-byte page is stored in %d bytes (%.2fx; a first page %d)",
            s.tier_dtype,
            s.page_bytes,
            s.record_bytes,
            s.compression,
            s.first_bytes,
        )
    results = []
    for capacity, _ in caps:
        for policy in policies:
            for d in dtypes:
                r = replay_tiered(trace, policy, capacity, args.block_size, host_bytes, sizes[d])
                progress(
                    "%s @ %d blocks + host %s at %s (%d pages): hit rate %.4f (%d pool, %d host)",
                    policy, capacity, args.host_tier_bytes, d, r.host_pages, r.hit_rate, r.pool_hits, r.host_hits,
                )  # fmt: skip
                results.append(r)
                if args.json:
                    print(
                        json.dumps(vars(r) | {"trace": trace.path, "kv_geometry": args.kv_geometry}),
                        flush=True,
                    )
    if not args.json:
        m = machine_info()
        print(
            f"# kvstore-bench replay {trace.path} --host-tier-bytes {args.host_tier_bytes} ({now_iso()}, {m.get('cpu_model', '?')})"
        )
        print(
            f"# KV geometry {args.kv_geometry} x {args.block_size} tokens a page; {trace.accesses} block accesses"
        )
        print(
            f"{'policy':<8} {'pool':>6} {'tier':>5} {'record':>10} {'ratio':>6} {'host_pages':>10} {'hit_rate':>9} {'pool_hits':>9} {'host_hits':>9}"
        )
        for r in results:
            print(
                f"{r.policy:<8} {r.capacity_blocks:>6} {r.tier_dtype:>5} {r.record_bytes:>10} {r.compression:>6.2f} "
                f"{r.host_pages:>10} {r.hit_rate:>9.4f} {r.pool_hits:>9} {r.host_hits:>9}"
            )
    return results
