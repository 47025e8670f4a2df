"""The live MRC's sample (kvstore/mrc.py, kvstore/store/live_mrc.py): what it costs in memory per
sampled access, and that the log's accesses-before (kept as gaps) stay exact when the head is
forgotten and when the rate falls.

The daemon records every sampled block of every Lookup and Append until the log's cap (131,072
accesses a namespace, ~11 minutes of `kvstore-bench soak`): at ~35 bytes an access it was
most of the soak's RSS growth after the warm-up (BENCHMARKS.md, "soak")."""

from __future__ import annotations

import hashlib
import random
import tracemalloc

from kvstore.mrc import MODULUS, MrcSampler, spatial_hash
from kvstore.store.live_mrc import MAX_LOG, LiveMrc

BYTES_PER_ACCESS = 20  # two list slots (16) and the lists' growth slack; no object per access


def test_live_mrc_log_costs_two_slots_a_sampled_access() -> None:
    blocks = [hashlib.blake2b(i.to_bytes(4, "little"), digest_size=16).digest() for i in range(2000)]
    mrc = LiveMrc(512)  # a small pool: every block sampled, like the soak's namespace
    for i in range(0, len(blocks), 4):
        mrc.add(4, blocks[i : i + 4])  # the memo of every block's hash: not per access
    rng = random.Random(1)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        start = mrc.sampler.samples
        while mrc.sampler.samples < MAX_LOG - 8:  # the soak's shape: 1-4 pages a call, calls apart
            n = rng.randint(1, 4)
            i = rng.randrange(len(blocks) - n)
            mrc.add(n + rng.randint(0, 3), blocks[i : i + n])
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    per_access = grown / (mrc.sampler.samples - start)
    assert per_access <= BYTES_PER_ACCESS, f"{per_access:.1f} bytes a sampled access"


def reference(sampler: MrcSampler, blocks: list[bytes]) -> list[tuple[int, int]]:
    """Record `blocks` one access each; return what the log must hold, (hash, accesses
    before it) per sampled access, kept by the same rules (rate halving, head forgotten)."""
    kept: list[tuple[int, int]] = []
    base = 0
    for block in blocks:
        seen = sampler.accesses
        sampler.record(block)
        h = spatial_hash(block)
        if h % MODULUS < sampler.threshold:
            kept.append((h, seen))
        kept = [(x, s) for x, s in kept if x % MODULUS < sampler.threshold]
        if len(kept) > sampler.max_log:
            cut = len(kept) // 2
            base = kept[cut][1]
            kept = kept[cut:]
    assert sampler._base == base
    return kept


def test_accesses_before_stay_exact_through_forgetting_and_rate_drops() -> None:
    rng = random.Random(7)
    sampler = MrcSampler(rate=1.0, max_keys=48, max_log=64)
    blocks = [rng.randrange(200).to_bytes(8, "little") for _ in range(3000)]
    kept = reference(sampler, blocks)
    assert sampler.rate < 1.0 and sampler._base > 0  # both happened
    assert list(sampler._log) == [h for h, _ in kept]
    assert sampler._seen_at() == [s for _, s in kept]


def test_live_mrc_window_after_the_head_is_forgotten() -> None:
    # Every access sampled, one block a call: the window is exactly the log, so the curve at
    # a capacity past every distance is the log's reuses over its length (SHARDS-adj 0).
    mrc = LiveMrc(512)
    rng = random.Random(3)
    blocks = [hashlib.blake2b(bytes([i]), digest_size=16).digest() for i in range(50)]
    for _ in range(MAX_LOG + 1000):
        mrc.add(1, [blocks[rng.randrange(len(blocks))]])
    s = mrc.snapshot()
    assert s.samples < MAX_LOG  # the head went
    reuses = s.samples - len(set(s._log))
    assert s.curve([10**9]) == [(10**9, reuses / s.samples)]
