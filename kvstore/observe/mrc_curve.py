"""Admin.Mrc: the miss-ratio curve of a namespace's live sample (kvstore/store/live_mrc.py),
at the capacities asked for. Read-only, above the store: the sample is copied on the loop and
the curve computed on the copy, off the loop."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvstore.errors import InvalidArgument
from kvstore.mrc import MrcSampler
from kvstore.store.store import Store

DEFAULT_FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)
MAX_POINTS = 1024
MAX_CAPACITY = 1 << 40


@dataclass
class MrcResult:
    namespace: str
    policy: str
    pool_pages: int
    page_bytes: int
    sample_rate: float
    sampled_accesses: int
    accesses: int  # block accesses in the window the sample covers
    sampled_blocks: int
    points: list[tuple[int, float]]  # (capacity in pages, estimated LRU hit rate), ascending


def capacities(pool_pages: int, pages: Sequence[int], fractions: Sequence[float]) -> list[int]:
    """The capacities (pages) asked for, checked; the pool's own is always among them."""
    for i, c in enumerate(pages):
        if not 0 < c <= MAX_CAPACITY:
            raise InvalidArgument(f"capacities[{i}]={c} must be in [1, {MAX_CAPACITY}] pages")
    for i, f in enumerate(fractions):
        if not (math.isfinite(f) and 0 < f <= 1e6):
            raise InvalidArgument(
                f"fractions[{i}]={f} must be a number > 0 (of the pool's {pool_pages} pages)"
            )
    if len(pages) + len(fractions) > MAX_POINTS:
        raise InvalidArgument(
            f"{len(pages)} capacities + {len(fractions)} fractions is over the limit of {MAX_POINTS} points"
        )
    if not pages and not fractions:
        fractions = DEFAULT_FRACTIONS
    out = {int(c) for c in pages} | {max(1, round(f * pool_pages)) for f in fractions} | {pool_pages}
    return sorted(out)


def curve(
    namespace: str, policy: str, pool_pages: int, page_bytes: int, snap: MrcSampler, caps: list[int]
) -> MrcResult:
    """Runs off the loop, on a snapshot (LiveMrc.snapshot)."""
    return MrcResult(
        namespace,
        policy,
        pool_pages,
        page_bytes,
        snap.rate,
        snap.samples,
        snap.accesses - snap._base,
        len(set(snap._log)),
        snap.curve(caps),
    )


def snapshot(
    store: Store, namespace: str, pages: Sequence[int], fractions: Sequence[float]
) -> Callable[[], MrcResult]:
    """Checks the request and copies the namespace's sample; the returned function
    computes the curve (slow: run it off the loop)."""
    ns = store.namespace(namespace)
    caps = capacities(ns.spec.num_pages, pages, fractions)
    snap = ns.mrc.snapshot()
    spec = ns.spec
    return lambda: curve(ns.name, ns.policy.name, spec.num_pages, spec.page_bytes, snap, caps)
