"""The store's own cost of the tiers, without gRPC: part of `kvstore-bench tiers`' store level.

The load workload of tiers_load.py (tiers_workload.py: same prompts, same per-thread schedules, interleaved
into one stream) driven straight against a `kvstore.store.store.Store` in this process, on an
asyncio loop as in the daemon: pinned `lookup` (awaiting promotions still in flight as the
Lookup servicer does), `allocate` + `append` + `commit` (no bytes written: the client's part
is not measured here), release both. Once with no tiers, once with a host tier (the load
parts' size, --load-host-ratio) + a disk tier, alternating, --inproc-rounds each; the first 3,000 requests warm up, the next
--inproc-requests are timed. Reported: microseconds of store work a request (median of
rounds) for each, their difference, and the pages demoted / promoted per request.

Why: the daemon's per-request cost is mostly gRPC, so the tiers' share of it hides in the
noise of a shared 2-vCPU VM; here it is measured alone and repeatably.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from .harness import median, progress
from .tiers_workload import CLIENTS, WARMUP_REQUESTS, load_prompts, schedule, spec


async def _run(
    tiers_dir: Path | None, order: list[int], prompts: list[list[int]], host_bytes: int
) -> tuple[float, dict]:
    from kvstore.store.store import Store
    from kvstore.store.tiering.tiers import Tiers
    from kvstore.store.types import StoreLimits
    from kvstore.tiers import DiskTier, HostTier

    tiers = None
    if tiers_dir is not None:
        tiers = Tiers(HostTier(host_bytes) if host_bytes else None, DiskTier.open(tiers_dir, 1 << 30))
    store = Store(StoreLimits(), f"kvsb-inproc-{uuid.uuid4().hex[:8]}-", tiers=tiers)
    try:
        store.create_namespace(spec())
        sid = store.open_session("bench-inproc", 60).session_id

        async def request(i: int) -> None:
            tokens = prompts[i]
            r = store.lookup(sid, "load", tokens, b"", True)
            if r.promotions:
                waiting = [p.wait() for p in r.promotions if p.ok is None]
                if waiting:
                    await asyncio.gather(*waiting)
                r = store.settle_lookup(r)
            seq, _ = store.allocate(sid, "load", 0, b"")
            store.append(sid, seq, tokens)
            store.commit(sid, seq, len(tokens))
            store.release_sequence(sid, seq)
            if r.pin_id:
                store.release_pin(sid, r.pin_id)

        for i in order[:WARMUP_REQUESTS]:
            await request(i)
        before = dict(tiers.counters) if tiers is not None else {}
        t0 = time.perf_counter()
        for k, i in enumerate(order[WARMUP_REQUESTS:]):
            await request(i)
            if k % 64 == 63:
                await asyncio.sleep(0)  # the disk writer's callbacks run, as between RPCs
        elapsed = time.perf_counter() - t0
        moved = {k: v - before.get(k, 0) for k, v in (tiers.counters.items() if tiers else [])}
        return elapsed, moved
    finally:
        store.close()


def store_cost_in_process(requests: int, rounds: int, host_bytes: int) -> dict[str, Any]:
    prompts = load_prompts()
    per_thread = -(-(WARMUP_REQUESTS + requests) // CLIENTS)
    streams = [schedule(t, per_thread) for t in range(CLIENTS)]
    order = [s[k] for k in range(per_thread) for s in streams][: WARMUP_REQUESTS + requests]
    us: dict[str, list[float]] = {"none": [], "tiers": []}
    moved: dict[str, int] = {}
    for r in range(rounds):
        for name in ("none", "tiers") if r % 2 == 0 else ("tiers", "none"):
            with tempfile.TemporaryDirectory(prefix="kvsb-inproc-") as d:
                elapsed, got = asyncio.run(
                    _run(Path(d) / "disk" if name == "tiers" else None, order, prompts, host_bytes)
                )
            us[name].append(1e6 * elapsed / requests)
            if name == "tiers":
                moved = got
            progress("store in-process round %d, %s: %.1f us/request", r + 1, name, us[name][-1])
    none, tiers = median(us["none"]), median(us["tiers"])
    demoted = sum(moved.get(k, 0) for k in ("demoted_host", "demoted_disk", "demoted_clean"))
    promoted = moved.get("promoted_host", 0) + moved.get("promoted_disk", 0)
    return {
        "requests": requests,
        "rounds": rounds,
        "host_tier_bytes": host_bytes,
        "none_us_per_request": round(none, 1),
        "tiers_us_per_request": round(tiers, 1),
        "tiers_extra_us_per_request": round(tiers - none, 1),
        "rounds_us_per_request": {k: [round(x, 1) for x in v] for k, v in us.items()},
        "demoted_per_request": round(demoted / requests, 2),
        "promoted_per_request": round(promoted / requests, 2),
        "promoted_from_disk_on_the_loop": moved.get("promoted_disk_inline", 0),
        "promoted_from_disk": moved.get("promoted_disk", 0),
    }
