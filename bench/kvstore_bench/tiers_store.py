"""The store-level part of `kvstore-bench tiers`: TTFT with the prefix on disk, and 16 clients
with tiers vs without. Both start their own daemons (`BenchDaemon`).

TTFT (`ttft_on_disk`): SmolLM2-135M-Instruct (loaded as in ttft.py), a --ttft-tokens prompt
(default 2048, pydoc text as in ttft.py) + a short question, timed from the token ids to the
logits of the last position through the adapter (`KVStoreCache.prefill(logits_to_keep=1)`:
lookup, load the prefix, prefill the question, store its KV) on a daemon with a disk tier only:

- pool:      the prefix's pages are in the pool (an untimed lookup brings them up first);
- disk:      `flush()` then `evict(all=True)`: every page is out of the pool and only on disk
             (LMDB; warm page cache, dropping it needs root); the timed lookup promotes the
             pages from disk (read + checksum check into the pool) before the model runs;
- recompute: the model alone on the whole input (no kvstore).

Sides interleaved, order rotated per repeat, one warmup; each repeat its own question; the
first token (argmax) of pool and disk must equal the recompute's. Medians reported, with
disk/pool and recompute/disk ratios.

Load (`load_with_and_without_tiers`): a daemon without tiers and one with a host tier and a
disk tier, both up at once, each driven by its own 16 client threads in this process (each
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

In-process store cost (`store_cost_in_process`, tiers_inproc.py): the same workload against
the `Store` alone, no gRPC: microseconds of store work a request with and without tiers.

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

import argparse
import contextlib
import math
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from .harness import BenchDaemon, BenchError, median, progress, self_cpu_seconds, system_busy_seconds
from .tiers_inproc import WARMUP_REQUESTS, _spec, store_cost_in_process

LOAD_GOAL = 0.95
HOST_RATIO = 2.0
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


def host_tier_bytes(ratio: float) -> int:
    """The load parts' host tier: `ratio` x the pool's bytes, in whole pages."""
    spec = _spec()
    return int(ratio * spec.num_pages) * spec.page_bytes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-store-level", action="store_true", help="skip the store-level measurements")
    p.add_argument("--ttft-tokens", type=int, default=2048, help="prompt tokens for the TTFT (default 2048)")
    p.add_argument("--ttft-repeat", type=int, default=5, help="TTFT repeats; medians (default 5)")
    p.add_argument("--load-seconds", type=float, default=2.5, help="seconds per load window (default 2.5)")
    p.add_argument(
        "--load-warmup-requests",
        type=int,
        default=WARMUP_REQUESTS,
        help=f"unmeasured requests first on each fresh daemon (default {WARMUP_REQUESTS}, as in-process)",
    )
    p.add_argument(
        "--load-windows",
        type=int,
        default=16,
        help="load windows on the daemon with tiers, each between two on the one without (default 16)",
    )
    p.add_argument(
        "--load-host-ratio",
        type=float,
        default=HOST_RATIO,
        help=f"host tier bytes / pool bytes in the load parts (default {HOST_RATIO:g}, as SGLang HiCache's "
        "--hicache-ratio; below 1 most promotions come from disk)",
    )
    p.add_argument(
        "--load-prefill-us-per-token",
        type=float,
        default=0.0,
        help="also measure the load with this much sleep per missed token, a modeled prefill "
        "(40 ~ an 8B model on one H100); default 0: skipped",
    )
    p.add_argument(
        "--inproc-requests", type=int, default=16_000, help="timed requests of the in-process store cost"
    )
    p.add_argument("--inproc-rounds", type=int, default=3, help="in-process rounds per side (default 3)")


def store_level(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.no_store_level:
        return None
    base = Path(tempfile.mkdtemp(prefix="kvsb-tiers-store-", dir=args.dir))
    try:
        return {
            "ttft": ttft_on_disk(base / "ttft", args.ttft_tokens, args.ttft_repeat),
            "load": load_with_and_without_tiers(
                base / "load",
                args.load_seconds,
                args.load_windows,
                args.load_warmup_requests,
                host_ratio=args.load_host_ratio,
            ),
            "load_modeled_prefill": load_with_and_without_tiers(
                base / "load-prefill",
                args.load_seconds,
                args.load_windows,
                args.load_warmup_requests,
                prefill_us_per_token=args.load_prefill_us_per_token,
                host_ratio=args.load_host_ratio,
            )
            if args.load_prefill_us_per_token > 0
            else None,
            "store_cost_in_process": store_cost_in_process(
                args.inproc_requests, args.inproc_rounds, host_tier_bytes(args.load_host_ratio)
            ),
        }
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------- TTFT from disk


def ttft_on_disk(base: Path, tokens: int, repeat: int) -> dict[str, Any]:
    from kvstore_client import hf

    missing = hf.smollm2_missing()
    if missing:
        progress("TTFT from disk: skipped (%s)", missing)
        return {"skipped": missing}
    import kvstore_client
    import torch
    from kvstore_client.hf import KVStoreCache

    from . import ttft

    progress("TTFT from disk: loading the model")
    model, tokenizer = ttft.load_model()
    ids = ttft.text_ids(tokenizer)
    prefix = ids[:tokens]
    runs = 1 + repeat
    questions = [
        tokenizer(ttft.QUESTION.format(r=r + 1), add_special_tokens=False)["input_ids"] for r in range(runs)
    ]
    page_tokens = ttft.PAGE_TOKENS
    num_pages = tokens // page_tokens + runs * 4 + 64
    spec = hf.namespace_spec_for(model, "ttft", num_pages=num_pages, page_tokens=page_tokens)
    server = {"max_pool_bytes": "64GiB", "disk_tier_dir": str(base / "disk"), "disk_tier_bytes": 4 << 30}

    @torch.no_grad()
    def recompute(inp: list[int]) -> tuple[float, int, int]:
        t0 = time.perf_counter()
        out = model(input_ids=torch.tensor([inp]), use_cache=True, logits_to_keep=1).logits[0, -1]
        return time.perf_counter() - t0, int(out.argmax()), 0

    @torch.no_grad()
    def adapter(client: Any, inp: list[int]) -> tuple[float, int, int]:
        t0 = time.perf_counter()
        with KVStoreCache(client, "ttft", model) as cache:
            out = cache.prefill(model, inp, logits_to_keep=1)[0, -1]
            elapsed = time.perf_counter() - t0
            return elapsed, int(out.argmax()), cache.hit_tokens

    times: dict[str, list[float]] = {"pool": [], "disk": [], "recompute": []}
    equal: list[bool] = []
    with BenchDaemon([], server=server) as daemon, kvstore_client.connect(daemon.target) as client:
        page_bytes = client.create_namespace(spec).pool.page_bytes
        with KVStoreCache(client, "ttft", model) as cache:
            cache.prefill(model, prefix, logits_to_keep=1)  # process A's part: the prefix is stored
        for r in range(runs):
            inp = prefix + questions[r]
            sides = ["pool", "disk", "recompute"]
            sides = sides[r % 3 :] + sides[: r % 3]
            first: dict[str, int] = {}
            for side in sides:
                if side == "recompute":
                    elapsed, first[side], hit = recompute(inp)
                else:
                    if side == "pool":
                        client.lookup("ttft", prefix).hit_tokens  # noqa: B018 (brings it up)
                    else:
                        client.evict("ttft", all=True)  # demoted to disk (the only tier)...
                        client.flush()  # ...and committed
                        if client.stats("ttft").namespaces[0].pages_sealed:
                            raise BenchError("pages are left in the pool after evict(all=True)")
                    elapsed, first[side], hit = adapter(client, inp)
                    if hit < tokens:
                        raise BenchError(f"TTFT {side}: the lookup hit {hit} of {tokens} prefix tokens")
                if r:
                    times[side].append(elapsed)
            equal.append(first["pool"] == first["recompute"] == first["disk"])
            progress(
                "TTFT %d tokens, %s: %s",
                tokens,
                "warmup" if r == 0 else f"repeat {r}",
                ", ".join(f"{s} {1e3 * t[-1]:.0f} ms" for s, t in times.items() if t and r),
            )
        tiers = client.stats().tiers
    med = {s: median(v) for s, v in times.items()}
    return {
        "prompt_tokens": tokens,
        "page_tokens": page_tokens,
        "page_bytes": page_bytes,
        "ttft_pool_ms": round(1e3 * med["pool"], 1),
        "ttft_disk_ms": round(1e3 * med["disk"], 1),
        "ttft_recompute_ms": round(1e3 * med["recompute"], 1),
        "disk_vs_pool": round(med["disk"] / med["pool"], 3),
        "recompute_vs_disk": round(med["recompute"] / med["disk"], 2),
        "recompute_vs_pool": round(med["recompute"] / med["pool"], 2),
        "runs_ms": {s: [round(1e3 * t, 1) for t in v] for s, v in times.items()},
        "first_token_equal": all(equal),
        "promoted_pages": tiers.promoted_pages,
        "repeat": repeat,
        "reads": "disk side from LMDB through the page cache (warm: dropping it needs root)",
    }


# ---------------------------------------------------------------- 16 clients, tiers vs none


def _tokens(seed: str, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(50_000) for _ in range(n)]


def _prompts() -> list[list[int]]:
    pt = LOAD_NS["page_tokens"]
    out = []
    for p in range(PREFIXES):
        head = _tokens(f"prefix-{p}", PREFIX_PAGES * pt)
        out += [head + _tokens(f"suffix-{p}-{s}", SUFFIX_PAGES * pt) for s in range(SUFFIXES)]
    return out


def _schedule(thread: int, n: int) -> list[int]:
    """Request i of `thread`: a prompt index, Zipf-like over prefixes, uniform over suffixes."""
    rng = random.Random(f"thread-{thread}")
    weights = [1 / (p + 1) for p in range(PREFIXES)]
    return [rng.choices(range(PREFIXES), weights)[0] * SUFFIXES + rng.randrange(SUFFIXES) for _ in range(n)]


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

    prompts = _prompts()
    schedules = [_schedule(t, REQUESTS_PER_CLIENT) for t in range(CLIENTS)]  # the same on both
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


def format_text(s: dict[str, Any] | None) -> list[str]:
    if s is None:
        return ["  store level: skipped (--no-store-level)"]
    lines = []
    t = s["ttft"]
    if "skipped" in t:
        lines.append(f"  TTFT from disk: skipped ({t['skipped']})")
    else:
        lines.append(
            f"  TTFT {t['prompt_tokens']} tokens through the adapter: pool {t['ttft_pool_ms']:.0f} ms, "
            f"disk {t['ttft_disk_ms']:.0f} ms, recompute {t['ttft_recompute_ms']:.0f} ms "
            f"(disk/pool {t['disk_vs_pool']:.2f}x, recompute/disk {t['recompute_vs_disk']:.2f}x; "
            f"first token equal: {t['first_token_equal']})"
        )
    ip = s.get("store_cost_in_process")
    if ip is not None:
        lines.append(
            f"  store alone (no gRPC), same workload: {ip['none_us_per_request']:.0f} us/request without "
            f"tiers, {ip['tiers_us_per_request']:.0f} with (+{ip['tiers_extra_us_per_request']:.0f}); "
            f"{ip['demoted_per_request']:.1f} pages demoted and {ip['promoted_per_request']:.1f} promoted "
            "a request"
        )
    for ld in (s["load"], s.get("load_modeled_prefill")):
        if ld is None:
            continue
        lines.append(
            f"  {ld['clients']} clients, shared prefixes, {ld['miss_cost']}: none "
            f"{ld['none_requests_per_s']:.0f} req/s (hit {ld['none_hit_ratio']:.2f}), tiers "
            f"{ld['tiers_requests_per_s']:.0f} req/s (hit {ld['tiers_hit_ratio']:.2f}): "
            f"tiers_vs_none_throughput_ratio {ld['tiers_vs_none_throughput_ratio']:.3f} "
            f"(goal >= {ld['goal']}: {'met' if ld['goal_met'] else 'MISSED'}; windows "
            f"{', '.join(f'{x:.2f}' for x in ld.get('windows_tiers_vs_neighbours', []))})"
        )
    return lines
