"""The store-level part of `kvstore-bench tiers`: TTFT with the prefix on disk (here), 16
clients with tiers vs without (tiers_load.py; both start their own daemons, `BenchDaemon`), and
the store's own cost of the tiers without gRPC (tiers_inproc.py), on the same workload
(tiers_workload.py).

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
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .harness import BenchDaemon, BenchError, median, progress
from .tiers_inproc import store_cost_in_process
from .tiers_load import load_with_and_without_tiers
from .tiers_workload import HOST_RATIO, WARMUP_REQUESTS, host_tier_bytes


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
