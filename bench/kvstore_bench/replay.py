"""`kvstore-bench replay`: replay a prefix-cache trace through the real store, index and policy.

The trace is Mooncake-schema JSONL: one request a line with `hash_ids` (one id per block of
`--block-size` tokens; equal ids = equal prefix up to and including that block),
`input_length` and `timestamp`; other fields are ignored. Each request runs through a real
`Namespace` of the store (replay_store.py, which also says what each run reports: hit rate,
Belady's, the ceiling, compute saved). `--mrc` also estimates LRU's miss-ratio curve with
kvstore.mrc (spatially hashed sampling) and reports its absolute error against the exact LRU
replays.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kvstore.policy import policy_names

from .harness import BenchError, machine_info, now_iso, progress
from .replay_store import RunResult, run_one
from .trace import Trace, belady_hits, ceiling_hits, compute_weights, load_trace

MRC_FRACS = (0.01, 0.05, 0.10, 0.25)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True, help="Mooncake-schema JSONL trace")
    p.add_argument("--block-size", type=int, default=512, help="tokens per hash id (default 512)")
    p.add_argument(
        "--capacity-blocks",
        action="append",
        default=[],
        metavar="N",
        help="cache size in blocks (repeatable, N,M,...)",
    )
    p.add_argument(
        "--capacity-frac",
        action="append",
        default=[],
        metavar="F",
        help="cache size as a fraction of the trace's distinct blocks (repeatable, F,G,...)",
    )
    p.add_argument(
        "--policy", default="default", help=f"{'|'.join(policy_names())}|all|default (default: default)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per run on stdout, one a line")
    p.add_argument(
        "--plot", metavar="FILE.png", help="hit rate vs capacity per policy, Belady and the ceiling"
    )
    p.add_argument(
        "--mrc", action="store_true", help="check kvstore.mrc's LRU estimate against exact LRU replays"
    )
    p.add_argument(
        "--mrc-rate", type=float, default=0.1, help="sampling rate of the MRC estimate (default 0.1)"
    )
    p.add_argument(
        "--mrc-keys",
        type=int,
        default=1 << 14,
        help="most distinct sampled blocks; the rate halves beyond (default 16384)",
    )
    p.add_argument(
        "--d-model", type=int, default=4096, help="model width for compute_saved's C (default 4096)"
    )
    p.add_argument(
        "--host-tier-bytes",
        metavar="SIZE",
        help="a host tier of this many bytes below the pool (e.g. 2GiB): the hit rate at each --tier-dtypes",
    )
    p.add_argument(
        "--tier-dtypes",
        default="fp,int8,int4",
        help="the host tier's precisions to compare (default fp,int8,int4)",
    )
    p.add_argument(
        "--kv-geometry",
        default="30,3,64,float16",
        metavar="LAYERS,KV_HEADS,HEAD_DIM,DTYPE",
        help="the KV of a block, for the host tier's page sizes (default 30,3,64,float16: SmolLM2-135M)",
    )


def _split(values: list[str], kind: type) -> list[Any]:
    out = []
    for v in values:
        for part in v.split(","):
            if part.strip():
                try:
                    out.append(kind(part))
                except ValueError:
                    raise BenchError(f"not a {kind.__name__}: {part!r}") from None
    return out


def _policies(arg: str) -> list[str]:
    if arg == "all":
        return policy_names()
    if arg == "default":
        from kvstore.config import ServerConfig

        return [ServerConfig().default_policy]
    names = [a.strip() for a in arg.split(",") if a.strip()]
    for name in names:
        if name not in policy_names():
            raise BenchError(f"unknown policy {name!r}; known: {', '.join(policy_names())}, all, default")
    return names


def _capacities(args: argparse.Namespace, distinct: int) -> list[tuple[int, float]]:
    caps = [(max(1, round(f * distinct)), f) for f in _split(args.capacity_frac, float)]
    caps += [(n, n / max(1, distinct)) for n in _split(args.capacity_blocks, int)]
    if args.mrc:
        caps += [(max(1, round(f * distinct)), f) for f in MRC_FRACS]
    if not caps:
        caps = [(max(1, round(f * distinct)), f) for f in MRC_FRACS]
    for n, _ in caps:
        if n < 1:
            raise BenchError(f"capacity must be at least 1 block, got {n}")
    return sorted(set(caps))


class _Bar:
    """A one-line progress counter on stderr (\\r-updated)."""

    def __init__(self, total_runs: int, requests: int) -> None:
        self.total_runs, self.requests, self.run = total_runs, requests, 0
        self.tty = sys.stderr.isatty()

    def start(self, label: str) -> None:
        self.run += 1
        self.label = label

    def __call__(self, r: int) -> None:
        if self.tty:
            pct = 100 * r / max(1, self.requests)
            print(
                f"\r[{self.run}/{self.total_runs}] {self.label}: {pct:5.1f}%",
                end="",
                file=sys.stderr,
                flush=True,
            )

    def done(self, text: str) -> None:
        if self.tty:
            print("\r" + " " * 70 + "\r", end="", file=sys.stderr)
        progress("[%d/%d] %s: %s", self.run, self.total_runs, self.label, text)


def run(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    trace = load_trace(args.trace)
    if not trace.accesses:
        raise BenchError(f"{args.trace}: no blocks in the trace")
    progress(
        "%s: %d requests, %d block accesses, %d distinct blocks (loaded in %.2fs)",
        Path(args.trace).name,
        len(trace.requests),
        trace.accesses,
        trace.distinct,
        time.monotonic() - t0,
    )
    policies = _policies(args.policy)
    if args.mrc and "lru" not in policies:
        policies.append("lru")
    caps = _capacities(args, trace.distinct)
    if args.host_tier_bytes:
        from .replay_tiers import run_tiered

        run_tiered(trace, policies, caps, args)
        return 0
    weights = compute_weights(trace, args.block_size, args.d_model)
    ceiling = ceiling_hits(trace)
    bar = _Bar(len(policies) * len(caps), len(trace.requests))
    results: list[RunResult] = []
    for capacity, frac in caps:
        t1 = time.monotonic()
        belady = belady_hits(trace, capacity)
        progress(
            "Belady at %d blocks: %.4f (%.2fs)", capacity, sum(belady) / trace.accesses, time.monotonic() - t1
        )
        for policy in policies:
            bar.start(f"{policy} @ {capacity} blocks")
            res = run_one(
                trace,
                policy,
                capacity,
                frac,
                block_size=args.block_size,
                weights=weights,
                belady=belady,
                ceiling=ceiling,
                tick=bar,
            )
            bar.done(
                f"hit rate {res.hit_rate:.4f} ({res.ratio_to_belady:.2f}x Belady), {res.accesses_per_s:,.0f} acc/s"
            )
            results.append(res)
            if args.json:
                print(json.dumps(asdict(res) | {"trace": trace.path}), flush=True)
    mrc_rows = _mrc(trace, results, args.mrc_rate, args.mrc_keys) if args.mrc else []
    if args.json:
        for row in mrc_rows:
            print(json.dumps(row), flush=True)
    else:
        _print_table(trace, results, mrc_rows)
    if args.plot:
        _plot(args.plot, trace, results)
    return 0


def _mrc(trace: Trace, results: list[RunResult], rate: float, max_keys: int) -> list[dict[str, Any]]:
    from kvstore.mrc import MrcSampler

    sampler = MrcSampler(rate=rate, max_keys=max_keys)
    for chain in trace.requests:
        sampler.record_request([trace.keys[n] for n in chain])
    lru = sorted((r for r in results if r.policy == "lru"), key=lambda r: r.capacity_blocks)
    est = sampler.curve([r.capacity_blocks for r in lru])
    rows = []
    for r, (_, e) in zip(lru, est, strict=True):
        rows.append(
            {
                "mrc": "lru",
                "sample_rate": sampler.rate,
                "samples": sampler.samples,
                "capacity_blocks": r.capacity_blocks,
                "capacity_frac": r.capacity_frac,
                "exact_hit_rate": r.hit_rate,
                "estimated_hit_rate": e,
                "abs_error": abs(e - r.hit_rate),
            }
        )
        progress("MRC at %d blocks: estimate %.4f vs exact LRU %.4f", r.capacity_blocks, e, r.hit_rate)
    return rows


def _print_table(trace: Trace, results: list[RunResult], mrc_rows: list[dict[str, Any]]) -> None:
    m = machine_info()
    print(f"# kvstore-bench replay {trace.path} ({now_iso()}, {m.get('cpu_model', '?')})")
    print(
        f"# {len(trace.requests)} requests, {trace.accesses} block accesses, {trace.distinct} distinct blocks"
    )
    print(
        f"{'policy':<10} {'capacity':>9} {'frac':>6} {'hit_rate':>9} {'belady':>7} {'ratio':>6} "
        f"{'ceiling':>8} {'saved':>6} {'acc/s':>9}"
    )
    for r in results:
        print(
            f"{r.policy:<10} {r.capacity_blocks:>9} {r.capacity_frac:>6.3f} {r.hit_rate:>9.4f} "
            f"{r.belady_hit_rate:>7.4f} {r.ratio_to_belady:>6.2f} {r.ceiling:>8.4f} {r.compute_saved:>6.3f} "
            f"{r.accesses_per_s:>9,.0f}"
        )
    if mrc_rows:
        print(f"\n# LRU miss-ratio curve estimate (kvstore.mrc, sample rate {mrc_rows[0]['sample_rate']:g})")
        print(f"{'capacity':>9} {'exact':>7} {'estimate':>9} {'abs_err':>8}")
        for row in mrc_rows:
            print(
                f"{row['capacity_blocks']:>9} {row['exact_hit_rate']:>7.4f} "
                f"{row['estimated_hit_rate']:>9.4f} {row['abs_error']:>8.4f}"
            )


def _plot(path: str, trace: Trace, results: list[RunResult]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress("--plot skipped: matplotlib is not installed (pip install -e '.[model]')")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_cap: dict[int, RunResult] = {}
    for policy in dict.fromkeys(r.policy for r in results):
        rs = sorted((r for r in results if r.policy == policy), key=lambda r: r.capacity_blocks)
        ax.plot([r.capacity_frac for r in rs], [r.hit_rate for r in rs], marker="o", label=policy)
        by_cap.update({r.capacity_blocks: r for r in rs})
    refs = sorted(by_cap.values(), key=lambda r: r.capacity_blocks)
    ax.plot(
        [r.capacity_frac for r in refs], [r.belady_hit_rate for r in refs], "k--", marker="s", label="Belady"
    )
    ax.axhline(refs[0].ceiling, color="grey", linestyle=":", label="infinite cache")
    ax.set_xscale("log")
    ax.set_xlabel("capacity (fraction of distinct blocks)")
    ax.set_ylabel("block hit rate (prefix semantics)")
    ax.set_title(f"trace replay: {Path(trace.path).name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    progress("wrote %s", path)
