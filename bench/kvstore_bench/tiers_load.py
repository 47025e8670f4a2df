"""The load part of `kvstore-bench tiers` (`load_with_and_without_tiers`): a daemon without
tiers and one with a host tier and a disk tier, both up at once, each driven by its own 16 client threads in this process (each
client its own session, `kvstore_client.connect`) with a shared-prefix workload: first
--load-warmup-requests unmeasured on each fresh daemon, then --load-windows windows of
--load-seconds on the daemon with tiers, each between two windows on the one without (none,
tiers, none, tiers, ..., none), one daemon loaded at a time while the other idles.
A request: a prompt = one of 32 shared prefixes (8 pages; Zipf-like popularity) + one of 24
suffixes of that prefix (4 pages); pinned `lookup` of the prompt (with tiers it promotes
from below the pool), `allocate` + `append` (sealed pages come back CACHED), write the
WRITABLE pages through the mapping, `commit`, release both. 16-token pages of 32 KiB; the
pool (768 pages) holds a quarter of the ~3,300 distinct pages, so it evicts all the time;
with tiers evicted pages are demoted (host tier, then disk) and promoted back on a hit. The host
tier is --load-host-ratio x the pool's bytes (default 2: 48 MiB, a pool plus host of ~70% of
the distinct pages; 2 is SGLang HiCache's recommended `--hicache-ratio`, host memory = 2x the
GPU pool). A ratio below 1 is the worst case for the tiers: most promotions come from disk
(LMDB through the page cache), the costliest path.
Every thread runs the same seeded request stream on both daemons. Reported: requests/s
(median of windows), lookup hit ratio, daemon CPU per request; `tiers_vs_none_throughput_ratio`
= the median over the tiers windows of their requests/s / the geometric mean of the two none
windows around each (goal >= 0.95: tiers must not make throughput worse). Short windows
between neighbours, not separate rounds: on a shared VM the speed drifts by +-25% over
minutes (and twice that within one here), windows seconds apart see the same machine, and
a window's two neighbours cancel a drift that is linear over the three.

Two costs of a miss, each its own set of windows:
- `load` (store only): a miss costs the client nothing (it writes a constant page).
  Everything the tiers do is overhead here: the worst case for them.
- `load_modeled_prefill` (only with --load-prefill-us-per-token N > 0): each client sleeps N
  us per token it missed, standing in for its engine's prefill of them on its own GPU (a
  sleep: GPU time leaves the host CPU free, as a CUDA sync does). 40 us/token is an 8B model
  on one H100 (2 x 8e9 FLOP a token at ~400 TFLOP/s, 40% of its dense BF16 peak): an
  assumption, not a measurement. On a machine where the 16 clients and the daemon already
  saturate the CPUs, the sleeps overlap with other clients' work and change little.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from .harness import BenchDaemon, BenchError, median, progress, self_cpu_seconds, system_busy_seconds
from .tiers_workload import (
    CLIENTS,
    HOST_RATIO,
    LOAD_NS,
    PREFIX_PAGES,
    PREFIXES,
    SUFFIX_PAGES,
    SUFFIXES,
    WARMUP_REQUESTS,
    host_tier_bytes,
    load_prompts,
    schedule,
)

LOAD_GOAL = 0.95
COUNTERS = ("done", "hit", "asked", "errors")
REQUESTS_PER_CLIENT = 50_000  # each client's request stream (a client that gets through it stops)


def _client_loop(
    target: str,
    prompts: list[list[int]],
    order: list[int],
    stop: threading.Event,
    active: threading.Event,
    out: dict[str, Any],
    prefill_us_per_token: float = 0.0,
) -> None:
    """One client: requests in `order` while `active` is set, until `stop`; running totals in
    `out` (read live; `busy` while a request is under way). With `prefill_us_per_token`, each
    request then sleeps that long per token the lookup missed."""
    import kvstore_client
    from kvstore_client.errors import ResourceExhausted

    with kvstore_client.connect(target, client_name="bench-load") as client:
        ns = client.namespace(LOAD_NS["name"])
        page = np.full(ns.pool.page_bytes, 7, np.uint8)
        out.pop("connected").wait(120)
        for i in order:
            active.wait()
            if stop.is_set():
                break
            out["busy"] = True
            tokens = prompts[i]
            try:
                with client.lookup(ns, tokens, pin=True) as found, client.allocate(ns) as seq:
                    for p in seq.append(tokens).writable_pages:
                        ns.pool.raw_page(p.slot).numpy()[:] = page
                    seq.commit()
                if prefill_us_per_token:
                    time.sleep(1e-6 * prefill_us_per_token * (len(tokens) - found.hit_tokens))
                out["hit"] += found.hit_tokens
                out["asked"] += len(tokens)
                out["done"] += 1
            except ResourceExhausted:
                out["errors"] += 1
            finally:
                out["busy"] = False
    out["finished"] = True


class _Side:
    """One daemon and its 16 clients, which send requests only while `active` is set."""

    def __init__(
        self,
        daemon: BenchDaemon,
        prompts: list[list[int]],
        schedules: list[list[int]],
        stop: threading.Event,
        prefill: float,
    ):
        self.daemon = daemon
        self.active = threading.Event()
        self.connected = threading.Barrier(CLIENTS + 1)
        self.outs: list[dict[str, Any]] = [
            {"connected": self.connected, "busy": False} | dict.fromkeys(COUNTERS, 0) for _ in range(CLIENTS)
        ]
        self.threads = [
            threading.Thread(
                target=_client_loop,
                args=(
                    daemon.target,
                    prompts,
                    schedules[t],
                    stop,
                    self.active,
                    self.outs[t],
                    prefill,
                ),
            )
            for t in range(CLIENTS)
        ]

    def done(self) -> int:
        return sum(o["done"] for o in self.outs)

    def snapshot(self) -> tuple[float, ...]:
        totals = tuple(sum(o[k] for o in self.outs) for k in COUNTERS)
        return (
            time.perf_counter(),
            self.daemon.cpu_seconds(),
            self_cpu_seconds(),
            system_busy_seconds(),
            *totals,
        )

    def pause(self) -> None:
        """Stop sending and wait for the requests under way (so windows never overlap)."""
        self.active.clear()
        deadline = time.monotonic() + 60
        while any(o["busy"] for o in self.outs):
            if time.monotonic() > deadline:
                raise BenchError("load clients did not finish their requests within 60 s")
            time.sleep(0.001)

    def warm_up(self, requests: int) -> None:
        # A fresh daemon: its first requests are compulsory misses, and with tiers every
        # distinct page is written below the pool once. Counted in requests, not seconds, so a
        # slower machine is not measured in that fill (3 s here once measured the disk tier's
        # first writes: 0.15 ms a request of writer thread, 0.005 ms after it).
        self.active.set()
        deadline = time.monotonic() + 300
        while self.done() < requests:
            if time.monotonic() > deadline or any(o.get("finished") for o in self.outs):
                raise BenchError(f"the load did not get through {requests} warmup requests: {self.outs}")
            time.sleep(0.05)
        self.pause()

    def window(self, seconds: float) -> dict[str, Any]:
        s0 = self.snapshot()
        self.active.set()
        time.sleep(seconds)
        self.pause()
        s1 = self.snapshot()
        wall, dcpu, mine, busy, done, hit, asked, errors = (b - a for a, b in zip(s0, s1, strict=True))
        if done == 0:
            raise BenchError(f"no request finished in a {seconds:g}-s window: {self.outs}")
        return {
            "requests_per_s": done / wall,
            "hit_ratio": hit / max(1, asked),
            "daemon_cpu_ms_per_request": 1e3 * dcpu / done,
            "client_cpu_ms_per_request": 1e3 * mine / done,
            "others_cpus": max(0.0, (busy - dcpu - mine) / wall),
            "errors": errors,
        }


def load_with_and_without_tiers(
    base: Path,
    seconds: float,
    windows: int,
    warmup_requests: int = WARMUP_REQUESTS,
    prefill_us_per_token: float = 0.0,
    host_ratio: float = HOST_RATIO,
) -> dict[str, Any]:
    """Both daemons up at once, each with its own 16 clients; after each one's warmup,
    `seconds`-long windows, one daemon loaded at a time (the other idle): none, tiers, none,
    ..., none, with `windows` tiers windows. Each tiers window is compared with the geometric
    mean of the none windows on either side of it, which cancels this VM's drifts when they
    are linear over the three (separate daemons' rounds minutes apart varied by +-25%)."""
    import kvstore_client  # (torch: imported once here, not by 16 threads at once)

    prompts = load_prompts()
    schedules = [schedule(t, REQUESTS_PER_CLIENT) for t in range(CLIENTS)]  # the same on both
    configs = {
        "none": {},
        "tiers": {
            "host_tier_bytes": host_tier_bytes(host_ratio),
            "disk_tier_dir": str(base / "disk"),
            "disk_tier_bytes": 1 << 30,
        },
    }
    per: dict[str, list[dict[str, Any]]] = {k: [] for k in configs}
    stop = threading.Event()
    with contextlib.ExitStack() as stack:
        sides = {
            name: _Side(
                stack.enter_context(BenchDaemon([LOAD_NS], server=cfg)),
                prompts,
                schedules,
                stop,
                prefill_us_per_token,
            )
            for name, cfg in configs.items()
        }
        try:
            for side in sides.values():
                for th in side.threads:
                    th.start()
                side.connected.wait(120)  # every client connected and mapped the pool
            for name, side in sides.items():
                side.warm_up(warmup_requests)
                progress("load %s: warmed up (%d requests)", name, side.done())
            order = ["none", "tiers"] * windows + ["none"]
            for k, name in enumerate(order):
                got = sides[name].window(seconds)
                per[name].append(got)
                progress(
                    "load window %d/%d%s, %s: %.0f requests/s, hit ratio %.3f, daemon %.2f ms CPU/request, "
                    "others %.2f CPUs",
                    k + 1,
                    len(order),
                    f" (prefill {prefill_us_per_token:g} us/missed token)" if prefill_us_per_token else "",
                    name,
                    got["requests_per_s"],
                    got["hit_ratio"],
                    got["daemon_cpu_ms_per_request"],
                    got["others_cpus"],
                )
            with kvstore_client.connect(sides["tiers"].daemon.target) as client:
                t = client.stats().tiers
                tier_stats = {
                    "demoted_pages": t.demoted_pages,
                    "promoted_pages": t.promoted_pages,
                    "host_pages": t.host_pages,
                    "disk_pages": t.disk_pages,
                    "promotion_failures": t.promotion_failures,
                    "corrupt_pages": t.corrupt_pages,
                }
        finally:
            stop.set()
            for side in sides.values():
                side.active.set()  # (waiting clients see `stop` and leave)
            for side in sides.values():
                for th in side.threads:
                    th.join(60)
    if not all(o.get("finished") for side in sides.values() for o in side.outs):
        raise BenchError("a load client failed")
    none_rps = [x["requests_per_s"] for x in per["none"]]
    ratios = [
        x["requests_per_s"] / math.sqrt(none_rps[i] * none_rps[i + 1]) for i, x in enumerate(per["tiers"])
    ]

    def med(name: str, key: str, digits: int = 3) -> float:
        return round(median([x[key] for x in per[name]]), digits)

    rps = {k: med(k, "requests_per_s", 1) for k in configs}
    ratio = median(ratios)
    return {
        "miss_cost": (
            f"modeled prefill: {prefill_us_per_token:g} us of sleep per missed token"
            if prefill_us_per_token
            else "store only: a miss costs the client nothing"
        ),
        "prefill_us_per_token": prefill_us_per_token,
        "host_tier_bytes": host_tier_bytes(host_ratio),
        "host_ratio": host_ratio,
        "clients": CLIENTS,
        "seconds_per_window": seconds,
        "warmup_requests": warmup_requests,
        "windows": windows,
        "method": (
            "both daemons up, each with its own clients; windows none, tiers, none, ..., none, one "
            "daemon loaded at a time; ratio = median over tiers windows of requests/s / the geometric "
            "mean of the none windows on either side"
        ),
        "workload": (
            f"{PREFIXES} prefixes x {PREFIX_PAGES} pages (Zipf-like), {SUFFIXES} suffixes x {SUFFIX_PAGES} "
            f"pages each; pool {LOAD_NS['num_pages']} pages of 32 KiB, host tier {host_ratio:g}x that; "
            "request = pinned lookup + "
            "allocate/append/write/commit + release"
        ),
        "none_requests_per_s": rps["none"],
        "tiers_requests_per_s": rps["tiers"],
        "tiers_vs_none_throughput_ratio": round(ratio, 3),
        "goal": LOAD_GOAL,
        "goal_met": ratio >= LOAD_GOAL,
        "none_hit_ratio": med("none", "hit_ratio"),
        "tiers_hit_ratio": med("tiers", "hit_ratio"),
        "none_daemon_cpu_ms_per_request": med("none", "daemon_cpu_ms_per_request"),
        "tiers_daemon_cpu_ms_per_request": med("tiers", "daemon_cpu_ms_per_request"),
        "client_cpu_ms_per_request": {k: med(k, "client_cpu_ms_per_request") for k in configs},
        "others_cpus": {k: med(k, "others_cpus") for k in configs},
        "errors": {k: sum(x["errors"] for x in per[k]) for k in configs},
        "windows_requests_per_s": {k: [round(x["requests_per_s"], 1) for x in per[k]] for k in configs},
        "windows_tiers_vs_neighbours": [round(x, 3) for x in ratios],
        "ratio_of_medians": round(rps["tiers"] / rps["none"], 3),
        "tiers_daemon_stats": tier_stats,
    }
