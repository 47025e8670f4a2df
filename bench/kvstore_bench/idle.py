"""`kvstore-bench idle`: what an idle daemon costs, its event loop's CPU and its threads'.

A sidecar sits next to the workers all day, mostly waiting: what it burns then is taken from
them. This starts a daemon with the `rpc` benchmark's namespace (16-token pages of 4 KiB) at
each `--pool-pages`, commits one 64-page prompt (so the scrubber has sealed pages to re-read),
waits `--settle` seconds, then reads every thread's CPU time (/proc schedstat, ns) over
`--seconds` with no call made. Each pool is measured twice in the same run, the order
alternating: as configured (`--set`, else the defaults: checksums, the 64 MiB/s scrubber,
zeroing freed pages, metrics served), and with that background work off (`scrub_bytes_per_s
= 0`, `page_checksums = false`, `zero_freed_pages = false`): the baseline, what the loop's
timers alone cost (lease checks, the integrity tick, the metrics snapshot).

    kvstore-bench idle --json                               # pools of 256 and 32,768 pages
    kvstore-bench idle --pool-pages 4096 --set scrub_bytes_per_s=0

Reported a pool: `loop_ms_per_s` (the main thread: the asyncio loop), `threads_ms_per_s`
(all threads) and `pages_scrubbed` (sealed pages the scrubber re-verified in the window, from
Stats read just before and just after it: the background work itself, not its CPU), for
`configured` and `baseline`; `loop_over_baseline` their loop's ratio.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any

import grpc
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb
from kvstore_proto.kvstore.v1 import kvstore_pb2_grpc as pb_grpc

from . import rpc
from .harness import BenchDaemon, BenchError, emit, progress, server_settings

BACKGROUND_OFF = {"scrub_bytes_per_s": 0, "page_checksums": False, "zero_freed_pages": False}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--pool-pages", default="256,32768", help="comma separated pool sizes (pages)")
    p.add_argument("--seconds", type=float, default=10.0, help="the measured window (default 10)")
    p.add_argument("--settle", type=float, default=2.0, help="wait after the prompt is committed")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a server key (repeatable)"
    )


def run(args: argparse.Namespace) -> int:
    try:
        pools = [int(x) for x in args.pool_pages.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"idle: --pool-pages takes integers, not {args.pool_pages!r}") from None
    if not pools or min(pools) < 2 * rpc.PROMPT_PAGES or args.seconds <= 0:
        raise SystemExit(f"idle: pools of at least {2 * rpc.PROMPT_PAGES} pages and --seconds > 0")
    configured = server_settings(args.set, "idle")
    tokens = random.Random(0).choices(range(rpc.VOCAB), k=rpc.PROMPT_PAGES * rpc.PAGE_TOKENS)
    out: dict[str, Any] = {"benchmark": "idle", "seconds": args.seconds, "set": configured, "pools": {}}
    for i, pages in enumerate(pools):
        sides = {"configured": configured, "baseline": configured | BACKGROUND_OFF}
        order = list(sides) if i % 2 == 0 else list(sides)[::-1]
        result = {side: measure(pages, side, sides[side], tokens, args) for side in order}
        base = result["baseline"]["loop_ms_per_s"]
        result["loop_over_baseline"] = (
            round(result["configured"]["loop_ms_per_s"] / base, 3) if base else None
        )
        out["pools"][str(pages)] = result
    emit(out, args.json, text(out))
    return 0


def measure(
    pages: int, side: str, server: dict[str, Any], tokens: list[int], args: argparse.Namespace
) -> dict[str, Any]:
    ns = rpc.namespace() | {"num_pages": pages}
    config = {"lease_ttl_max_s": rpc.LEASE_S, "metrics": f"127.0.0.1:{rpc.free_port()}"} | server
    progress("idle: %d pages, %s", pages, side)
    with BenchDaemon([ns], config) as daemon:
        pid = daemon.pid
        rpc.prepare(daemon.target, tokens)
        time.sleep(args.settle)
        scrubbed = pages_scrubbed(daemon.target)  # (outside the CPU window, as is the read after it)
        before, t0 = threads_cpu(pid), time.monotonic()
        time.sleep(args.seconds)
        after, elapsed = threads_cpu(pid), time.monotonic() - t0
        scrubbed = pages_scrubbed(daemon.target) - scrubbed
    if str(pid) not in after:
        raise BenchError("idle: the daemon's main thread was not found in /proc")
    used = {tid: ns_ - before.get(tid, 0) for tid, ns_ in after.items()}
    return {
        "loop_ms_per_s": round(used[str(pid)] / 1e6 / elapsed, 3),
        "threads_ms_per_s": round(sum(used.values()) / 1e6 / elapsed, 3),
        "threads": len(after),
        "pages_scrubbed": scrubbed,
    }


def pages_scrubbed(target: str) -> int:
    """The namespace's Stats `pages_scrubbed` (a Stats call opens no session)."""
    with grpc.insecure_channel(target) as channel:
        reply = pb_grpc.KVStoreStub(channel).Stats(pb.StatsRequest(namespace=rpc.NAMESPACE), timeout=10)
    (ns,) = reply.namespaces
    return ns.pages_scrubbed


def threads_cpu(pid: int) -> dict[str, int]:
    """CPU ns so far of each of the process's threads, by thread id (/proc schedstat)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[task.name] = int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            continue  # (a thread that ended meanwhile)
    return out


def text(out: dict[str, Any]) -> str:
    lines = []
    for pages, r in out["pools"].items():
        c, b = r["configured"], r["baseline"]
        lines.append(
            f"{pages} pages: loop {c['loop_ms_per_s']} ms/s (baseline {b['loop_ms_per_s']}), "
            f"all threads {c['threads_ms_per_s']} ms/s (baseline {b['threads_ms_per_s']}), "
            f"pages scrubbed {c['pages_scrubbed']} (baseline {b['pages_scrubbed']})"
        )
    return "\n".join(lines)
