"""The shared-prefix workload of `kvstore-bench tiers`' load parts, the same for the
daemon under 16 clients (tiers_load.py) and for the store alone (tiers_inproc.py).

A request: a prompt = one of 32 shared prefixes (8 pages; Zipf-like popularity) + one of 24
suffixes of that prefix (4 pages). 16-token pages of 32 KiB; the pool (768 pages) holds a
quarter of the ~3,300 distinct pages, so it evicts all the time. The host tier is a ratio of
the pool's bytes (default 2, as SGLang HiCache's recommended `--hicache-ratio`).
"""

from __future__ import annotations

import random
from typing import Any

LOAD_NS = {
    "name": "load",
    "num_layers": 2,
    "num_kv_heads": 4,
    "head_dim": 64,
    "dtype": "float16",
    "page_tokens": 16,
    "num_pages": 768,
}  # 2 x 2 x 16 x 4 x 64 x 2 bytes = 32 KiB a page
PREFIXES, PREFIX_PAGES, SUFFIXES, SUFFIX_PAGES = 32, 8, 24, 4
CLIENTS = 16
HOST_RATIO = 2.0
WARMUP_REQUESTS = 3000  # unmeasured requests first on each fresh daemon or store


def spec() -> Any:
    """LOAD_NS as the store's NamespaceSpec."""
    from kvstore.store.types import NamespaceSpec

    return NamespaceSpec(**LOAD_NS, vocab_size=50_000)


def host_tier_bytes(ratio: float) -> int:
    """The load parts' host tier: `ratio` x the pool's bytes, in whole pages."""
    s = spec()
    return int(ratio * s.num_pages) * s.page_bytes


def tokens(seed: str, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(50_000) for _ in range(n)]


def load_prompts() -> list[list[int]]:
    pt = LOAD_NS["page_tokens"]
    out = []
    for p in range(PREFIXES):
        head = tokens(f"prefix-{p}", PREFIX_PAGES * pt)
        out += [head + tokens(f"suffix-{p}-{s}", SUFFIX_PAGES * pt) for s in range(SUFFIXES)]
    return out


def schedule(thread: int, n: int) -> list[int]:
    """Request i of `thread`: a prompt index, Zipf-like over prefixes, uniform over suffixes."""
    rng = random.Random(f"thread-{thread}")
    weights = [1 / (p + 1) for p in range(PREFIXES)]
    return [rng.choices(range(PREFIXES), weights)[0] * SUFFIXES + rng.randrange(SUFFIXES) for _ in range(n)]
