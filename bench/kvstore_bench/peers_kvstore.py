"""kvstore's side of `kvstore-bench peers`, and the memcpy baseline, in this process.

`KvstoreSide` is the one place that knows the client API: `put` and `get` (and `get_views`,
the zero-copy get) of one request. put = `client.put` (a copy into the session's credit of
reserved pages, then Put: one RPC; the first put of a size is Reserve, copy, Seal, which
grants the credit); get = `client.get` (one Lookup whose pin ends by itself, a copy out of
each page, the deadline checked after it); the zero-copy get = `client.lookup(pin=True)`,
the pages' views, release (two RPCs: the client has no views-only fast get).

A request is a prompt of k pages whose tokens are fresh random ids, so every put writes k new
pages (none CACHED) and every get hits all k.
"""

from __future__ import annotations

import random
import time
from typing import Any

import kvstore_client
import torch

from .harness import BenchError
from .peers_worker import page_bytes_of

NAMESPACE = "peers"
PAGE_TOKENS = 16
# SmolLM2-135M: 30 layers x 2 (K, V) x 16 tokens x 3 KV heads x 64 dims x 4 bytes (float32)
# = 737,280 bytes a page.
GEOMETRY = {
    "num_layers": 30,
    "num_kv_heads": 3,
    "head_dim": 64,
    "dtype": "float32",
    "page_tokens": PAGE_TOKENS,
}
PAGE_BYTES = 30 * 2 * PAGE_TOKENS * 3 * 64 * 4
VOCAB = 49152


def page_data(seed: int, pages: int) -> torch.Tensor:
    """The pages every system stores (the peers' workers make the same bytes)."""
    raw = page_bytes_of(seed, pages, PAGE_BYTES)
    return torch.frombuffer(raw, dtype=torch.uint8).view(pages, PAGE_BYTES)


# The daemon grants no credit over 1/8 of a pool (kvstore/store/credit.py, POOL_SHARE): a
# smaller pool would make a put of the largest size Reserve + copy + Seal, two RPCs.
CREDIT_POOL_SHARE = 8


def namespace_spec(pages: int, largest_request: int) -> dict[str, Any]:
    # Room for one pass of every page, the last get's request (pinned until the next call), the
    # put's credit (a request's worth of reserved pages) and the credit's worth a full pool keeps
    # zeroed ahead (kvstore/store/zero_ahead.py): each pass evicts the last one first; and a pool
    # big enough that a credit of the largest request is granted.
    num_pages = max(pages + 3 * largest_request, CREDIT_POOL_SHARE * largest_request)
    return {"name": NAMESPACE, **GEOMETRY, "num_pages": num_pages, "vocab_size": VOCAB}


class KvstoreSide:
    """One request at a time through the client library; pages move as raw bytes."""

    def __init__(self, kv: kvstore_client.Client) -> None:
        self.kv = kv
        self.ns = kv.namespace(NAMESPACE)
        if int(self.ns.info.pool.page_bytes) != PAGE_BYTES:
            raise BenchError(f"namespace page_bytes {self.ns.info.pool.page_bytes} != {PAGE_BYTES}")
        self.pool = self.ns.pool  # maps (and prefaults) the pool before anything is timed

    def put(self, tokens: list[int], src: torch.Tensor) -> None:
        written = self.kv.put(self.ns, tokens, src).written_pages
        if written != len(src):
            raise BenchError(f"put: {written} pages written of {len(src)}")

    def get(self, tokens: list[int], dst: torch.Tensor) -> None:
        pages = self.kv.get(self.ns, tokens, dst).pages
        if pages != len(dst):
            raise BenchError(f"get: {pages} pages hit of {len(dst)}")

    def get_views(self, tokens: list[int]) -> int:
        """The zero-copy get: the pinned pages' views, nothing copied."""
        with self.kv.lookup(self.ns, tokens, pin=True) as hit:
            return len(hit.views())

    def clear(self) -> None:
        self.kv.evict(NAMESPACE, all=True)


def measure_kvstore(
    side: KvstoreSide, src: torch.Tensor, sizes: list[int], repeat: int, rng: random.Random
) -> dict[str, dict[str, list[float]]]:
    """Seconds a pass (all pages) for put, get and zero-copy get, per request size."""
    n = len(src)
    dst = torch.zeros_like(src)
    out: dict[str, dict[str, list[float]]] = {"put_s": {}, "get_s": {}, "get_zero_copy_s": {}}
    for k in sizes:
        spans = [(i, min(i + k, n)) for i in range(0, n, k)]
        for rep in range(repeat + 1):  # the first pass warms up
            prompts = [[rng.randrange(VOCAB) for _ in range((b - a) * PAGE_TOKENS)] for a, b in spans]
            dst.zero_()
            t0 = time.perf_counter()
            for tokens, (a, b) in zip(prompts, spans, strict=True):
                side.put(tokens, src[a:b])
            t1 = time.perf_counter()
            for tokens, (a, b) in zip(prompts, spans, strict=True):
                side.get(tokens, dst[a:b])
            t2 = time.perf_counter()
            for tokens in prompts:
                side.get_views(tokens)
            t3 = time.perf_counter()
            if not torch.equal(dst, src):
                raise BenchError(f"kvstore, {k} pages a request: the bytes read back differ")
            side.clear()
            if rep:
                for key, t in (("put_s", t1 - t0), ("get_s", t2 - t1), ("get_zero_copy_s", t3 - t2)):
                    out[key].setdefault(str(k), []).append(t)
    return out


def measure_memcpy(src: torch.Tensor, sizes: list[int], repeat: int) -> dict[str, list[float]]:
    """Seconds to copy all pages, k pages a copy, into a warm preallocated buffer."""
    n, dst = len(src), torch.empty_like(src)
    out: dict[str, list[float]] = {}
    for k in sizes:
        for rep in range(repeat + 1):
            t0 = time.perf_counter()
            for a in range(0, n, k):
                dst[a : a + k].copy_(src[a : a + k])
            if rep:
                out.setdefault(str(k), []).append(time.perf_counter() - t0)
    return out
