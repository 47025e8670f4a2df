"""`kvstore-bench peers`: kvstore vs Mooncake Store and Redis on the same pages, one run.

The pages: `--pages` pages of 737,280 B (one 16-token SmolLM2-135M page: 30 layers x K,V x 16
tokens x 3 KV heads x 64 dims, float32), the same bytes for every system. Requests of 1, 16,
64 and 256 pages (`--sizes`). A pass puts every page, k pages a request, then gets every page
back; a put has returned when the pages are visible to any other client, a get has returned
when the bytes are in a preallocated buffer of the client (copy-out). kvstore's zero-copy get
(pinned views of the pool, no copy) is reported apart. Every pass checks the bytes read back.

- kvstore: a daemon of its own (BenchDaemon), today's client API (peers_kvstore.py), this process.
- kvstore-integrity-off (reported, no goal): the same on a second daemon with
  `page_checksums = false` and `zero_freed_pages = false`, the guarantees of docs/security.md
  ("Sealed pages") that the peers do not give: a checksum read of every page sealed and a
  zeroing write of every page freed. What they cost is the difference to `kvstore` in the
  same run; `integrity_off` in the JSON holds its ratios to the peers.
- Mooncake Store (peers_worker.py, in the peers venv): embedded client holding the data in its
  own segment, protocol tcp on one host (local memcpy), mooncake_master started by the worker;
  batch_put_from / batch_get_into with registered buffers: one call a request.
- Redis over a unix socket and over loopback TCP: redis-server started by the worker, redis-py
  with hiredis, one pipeline of k SET / k GET a request.
- LMCache's MP server: only when its package imports in the peers venv; otherwise skipped.
- Baseline: warm memcpy of the same bytes (k pages a copy into a preallocated buffer).

A peer that cannot run is skipped with the reason in the output; ratios against it are null.
Both orders run (`--rounds`, default 2): kvstore first, then peers first, so a warm-up or
ordering bias shows as a difference between `by_order` entries (each with its round's own
GB/s, `gbps`, to tell which side moved). GB/s = pages x page bytes /
seconds of a pass, median of the passes of a round (`--repeat`), mean over the rounds.
`make peers` installs the peers (build/peers-venv, Debian packages) and runs this.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import kvstore_client
import torch

from . import peers_kvstore as kvside
from .harness import (
    BenchDaemon,
    emit,
    machine_info,
    now_iso,
    progress,
    self_cpu_seconds,
    system_busy_seconds,
)

PEERS = ("mooncake", "mooncake-standalone", "redis-unix", "redis-tcp", "lmcache")
# kvstore without the integrity work the peers do not do (docs/security.md, "Sealed pages").
INTEGRITY_OFF = "kvstore-integrity-off"
INTEGRITY_OFF_SERVER = {"page_checksums": False, "zero_freed_pages": False}
INTEGRITY_COUNTS = (
    "pages_checksummed",
    "pages_unchecked",
    "pages_zeroed",
    "pages_zeroed_inline",
    "replies_waited_zeroing",
    "pages_sums_given",
)
GOALS = {"mooncake": {1: 1.0, 16: 1.25, 64: 1.25}, "redis": {16: 10.0, 64: 10.0}}
BUSY = 0.2  # CPUs used by other processes above which results are flagged
WORKER = Path(__file__).with_name("peers_worker.py")
DEFAULT_PYTHON = Path(__file__).resolve().parents[2] / "build" / "peers-venv" / "bin" / "python"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--pages", type=int, default=1024, help="pages stored by every system (default 1024)")
    p.add_argument(
        "--sizes",
        default=[1, 16, 64, 256],
        type=lambda s: [int(x) for x in s.split(",") if x.strip()],
        help="pages a request, comma separated (default 1,16,64,256)",
    )
    p.add_argument("--repeat", type=int, default=2, help="timed passes per size and round (default 2)")
    p.add_argument("--rounds", type=int, default=2, help="rounds, order alternating (default 2)")
    p.add_argument(
        "--peers-python",
        default=os.environ.get("KVSTORE_BENCH_PEERS_PYTHON", str(DEFAULT_PYTHON)),
        help="python of the venv with the peers' clients (default build/peers-venv/bin/python)",
    )
    p.add_argument("--peers", default=",".join(PEERS), help=f"peers to run (default {','.join(PEERS)})")


def run(args: argparse.Namespace) -> int:
    if args.pages < 1 or args.repeat < 1 or args.rounds < 1 or not args.sizes or min(args.sizes) < 1:
        raise SystemExit("peers: --pages, --repeat, --rounds and every --sizes must be >= 1")
    peers = [p for p in args.peers.split(",") if p]
    unknown = set(peers) - set(PEERS)
    if unknown:
        raise SystemExit(f"peers: unknown peer(s) {sorted(unknown)}; known: {', '.join(PEERS)}")
    torch.set_num_threads(1)
    progress("generating %d pages of %d B", args.pages, kvside.PAGE_BYTES)
    src = kvside.page_data(0, args.pages)
    ns = kvside.namespace_spec(args.pages, max(args.sizes))
    rounds: list[dict[str, Any]] = []
    cpu0 = (time.perf_counter(), system_busy_seconds(), self_cpu_seconds())
    server = {"max_pool_bytes": "64GiB"}
    with (
        BenchDaemon([ns], server=server) as daemon,
        BenchDaemon([ns], server=server | INTEGRITY_OFF_SERVER) as bare_daemon,
    ):
        d0 = daemon.cpu_seconds() + bare_daemon.cpu_seconds()
        with (
            kvstore_client.connect(daemon.target, client_name="bench-peers") as kv,
            kvstore_client.connect(bare_daemon.target, client_name="bench-peers-integrity-off") as bare,
        ):
            sides = {"kvstore": kvside.KvstoreSide(kv), INTEGRITY_OFF: kvside.KvstoreSide(bare)}
            transport = "lane" if kv.lane else "grpc"  # (KVSTORE_LANE=0: gRPC, for an A/B)
            # (KVSTORE_PUT_FOLLOW=0: each put copies, then calls; docs/api.md "A put in one round trip")
            put_follow = kv.pipelines_puts
            for r in range(args.rounds):
                ours = ["kvstore", INTEGRITY_OFF]
                order = [*ours, *peers] if r % 2 == 0 else [*peers, *ours[::-1]]
                rounds.append(run_round(args, order, sides, src, random.Random(r)))
            # What each daemon's integrity work did over the run (docs/security.md): the
            # proof that one checked and zeroed pages and the other did neither.
            integrity = {
                name: {f: getattr(side.kv.stats(kvside.NAMESPACE).namespaces[0], f) for f in INTEGRITY_COUNTS}
                for name, side in sides.items()
            }
        daemon_cpu = daemon.cpu_seconds() + bare_daemon.cpu_seconds() - d0
    wall = time.perf_counter() - cpu0[0]
    busy = system_busy_seconds() - cpu0[1]
    # Ours: this process, its waited-for children (workers and their servers) and the daemon.
    mine = self_cpu_seconds() - cpu0[2] + sum(os.times()[2:4]) + daemon_cpu
    result = summarize(args, rounds, peers)
    result["others_cpu_util"] = round(max(0.0, busy - mine) / wall, 3)
    result["kvstore_transport"] = transport
    result["kvstore_put_follow"] = put_follow
    result["integrity_counts"] = integrity
    result["machine"] = machine_info(torch=torch.__version__)
    emit(result, args.json, format_text(result))
    return 0


def run_round(
    args: argparse.Namespace,
    order: list[str],
    sides: dict[str, kvside.KvstoreSide],
    src: torch.Tensor,
    rng: random.Random,
) -> dict[str, Any]:
    progress("round: %s", " -> ".join(order))
    systems: dict[str, Any] = {"memcpy": {"copy_s": kvside.measure_memcpy(src, args.sizes, args.repeat)}}
    for name in order:
        progress("  %s", name)
        if name in sides:
            systems[name] = kvside.measure_kvstore(sides[name], src, args.sizes, args.repeat, rng)
        else:
            systems[name] = run_worker(args, name)
    return {"order": order, "systems": systems}


def run_worker(args: argparse.Namespace, name: str) -> dict[str, Any]:
    if not Path(args.peers_python).exists():
        return {"available": False, "reason": f"no peers venv: {args.peers_python} is missing (make peers)"}
    argv = [args.peers_python, str(WORKER), name, "--pages", str(args.pages)]
    argv += ["--page-bytes", str(kvside.PAGE_BYTES), "--sizes", ",".join(map(str, args.sizes))]
    argv += ["--repeat", str(args.repeat)]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=1800, env=os.environ | {"GLOG_minloglevel": "2"}
    )
    try:
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        tail = done.stderr.strip().splitlines()[-5:]
        return {"available": False, "reason": f"worker exited {done.returncode}: {' | '.join(tail)}"}


# ---------------------------------------------------------------- results


def gbps(pages: int, seconds: list[float] | None) -> float | None:
    return None if not seconds else round(pages * kvside.PAGE_BYTES / statistics.median(seconds) / 1e9, 3)


def rates(pages: int, system: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    if system.get("available") is False:
        return {}
    return {
        op.removesuffix("_s") + "_gbps": {k: gbps(pages, ts) for k, ts in by_size.items()}
        for op, by_size in system.items()
        if op.endswith("_s")
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else round(a / b, 3)


def mean(values: list[float | None]) -> float | None:
    return (
        None
        if not values or None in values
        else round(statistics.fmean(v for v in values if v is not None), 3)
    )


def summarize(args: argparse.Namespace, rounds: list[dict[str, Any]], peers: list[str]) -> dict[str, Any]:
    per_round = [{n: rates(args.pages, s) for n, s in r["systems"].items()} for r in rounds]
    names = ["memcpy", "kvstore", INTEGRITY_OFF, *peers]
    sizes = [str(k) for k in args.sizes]
    systems: dict[str, Any] = {}
    for n in names:
        skipped = [r["systems"][n] for r in rounds if r["systems"][n].get("available") is False]
        if skipped:
            systems[n] = {"available": False, "reason": skipped[0]["reason"]}
            continue
        ops = per_round[0][n].keys()
        systems[n] = {"available": True} | {
            op: {k: mean([pr[n][op].get(k) for pr in per_round]) for k in sizes} for op in ops
        }

    def ratios(view: dict[str, Any], ours: str = "kvstore") -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        kv = view[ours]
        for peer in peers:
            tag = "mooncake" if peer == "mooncake" else peer.replace("-", "_")
            pv = view.get(peer) or {}
            for op in ("put", "get"):
                # The sizes the goals name are always keys (null when not measured).
                for k in sorted({*sizes, *map(str, GOALS["mooncake"])}, key=int):
                    their = pv.get(f"{op}_gbps", {}).get(k)
                    out[f"{op}_vs_{tag}_{k}"] = ratio(kv[f"{op}_gbps"].get(k), their)
        redis = [v for key, v in out.items() if "_vs_redis_" in key and key.rsplit("_", 1)[1] in ("16", "64")]
        out["vs_redis_min"] = None if not redis or None in redis else min(v for v in redis if v is not None)
        return out

    headline = ratios(systems)
    # Each round's own GB/s too: an order bias shows as which side moved between the orders.
    by_order = [
        {"order": r["order"]} | ratios(pr) | {"gbps": {n: v for n, v in pr.items() if v}}
        for r, pr in zip(rounds, per_round, strict=True)
    ]
    goals = {}
    for k, g in GOALS["mooncake"].items():
        for op in ("put", "get"):
            v = headline.get(f"{op}_vs_mooncake_{k}")
            goals[f"{op}_vs_mooncake_{k}"] = {"goal": g, "met": None if v is None else v >= g}
    v = headline.get("vs_redis_min")
    goals["vs_redis_min"] = {
        "goal": GOALS["redis"][16],
        "met": None if v is None else v >= GOALS["redis"][16],
    }
    return {
        "benchmark": "peers",
        "when": now_iso(),
        "config": {
            "pages": args.pages,
            "page_bytes": kvside.PAGE_BYTES,
            "geometry": kvside.GEOMETRY,
            "sizes": args.sizes,
            "repeat": args.repeat,
            "rounds": args.rounds,
        },
        **headline,
        # The same ratios without the integrity work the peers do not do (no goal: the goals
        # are the defaults'); its cost to kvstore is the two systems' put/get_gbps.
        "integrity_off": ratios(systems, INTEGRITY_OFF),
        "systems": systems,
        "by_order": by_order,
        "goals": goals,
        "ratio_definition": "kvstore GB/s / peer GB/s, same pages, same run; GB/s mean over rounds of "
        "the median pass; get = copy-out into a preallocated buffer",
    }


def format_text(r: dict[str, Any]) -> str:
    c, s = r["config"], r["systems"]
    lines = [
        f"peers: {c['pages']} pages x {c['page_bytes']} B, {c['rounds']} rounds (orders alternate), "
        f"median of {c['repeat']} passes; GB/s put / get; kvstore's calls over {r.get('kvstore_transport', '?')}, puts pipelined {r.get('kvstore_put_follow', '?')}",
        f"  others (CPUs other processes used meanwhile): {r['others_cpu_util']}"
        + (
            "  -- warning: a loaded machine, numbers are less reliable" if r["others_cpu_util"] > BUSY else ""
        ),
        "",
        "  " + f"{'system':<24}" + "".join(f"{k + ' pages':>18}" for k in map(str, c["sizes"])),
    ]
    for name, v in s.items():
        if not v["available"]:
            lines.append(f"  {name:<24}skipped: {v['reason']}")
            continue
        for op in [o for o in v if o.endswith("_gbps")]:
            label = f"{name} {op.removesuffix('_gbps')}"
            cells = "".join(f"{v[op][str(k)] or 0:>18.3f}" for k in c["sizes"])
            lines.append(f"  {label:<24}" + cells)
    lines.append("")
    for key, g in r["goals"].items():
        v = r.get(key)
        met = (
            "n/a (a peer skipped or a size not measured)"
            if g["met"] is None
            else ("met" if g["met"] else "MISSED")
        )
        lines.append(f"  {key:<22} {v if v is not None else 'null':>8}  goal >= {g['goal']}: {met}")
    off = r.get("integrity_off") or {}
    keys = ("put_vs_mooncake_16", "get_vs_mooncake_16", "put_vs_mooncake_64", "vs_redis_min")
    lines.append(f"  {INTEGRITY_OFF} (no goal): " + ", ".join(f"{k} {off.get(k)}" for k in keys))
    for o in r["by_order"]:
        first = "kvstore first" if o["order"][0] == "kvstore" else "peers first"
        pairs = ", ".join(
            f"{k} {o.get(k)}" for k in ("put_vs_mooncake_16", "get_vs_mooncake_16", "vs_redis_min")
        )
        lines.append(f"  {first}: {pairs}")
    return "\n".join(lines)
