"""`kvstore-bench soak`: many client processes doing random work for minutes; no unexpected error, flat RSS, no leak.

One daemon (a small pool, a small host tier and a disk tier below it, so evictions,
demotions, swaps and promotions all happen) and --clients client processes
(kvstore_bench.soak_client: allocate / append / commit / lookup / release / swap out and in /
put / get, random cancellations and session closes, each paced at --rate operations a second,
every byte read back checked). Every --interval seconds: the daemon's RSS (VmRSS, and its
anonymous part) and open fds from /proc, the /dev/shm entries of its pools, its Stats, and
the clients' counts (progress on stderr).

`ok` is true iff: no unexpected error (soak_client says which codes are expected, and why),
no wrong byte read back, every client exited cleanly, the daemon's VmRSS after the warm-up
(the first --warmup fraction of the run) stayed within +-5% of its first sample after it,
its fds did not grow (once the clients are gone it has no more than before they came), the
daemon's sessions, reserved and pinned pages went back to 0, the /dev/shm entries of its pools
went back to the baseline (none) once it stopped, it logged no traceback and stopped cleanly.
"""

from __future__ import annotations

import argparse
import queue
import time
from collections import Counter
from typing import Any

import grpc
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb
from kvstore_proto.kvstore.v1 import kvstore_pb2_grpc as pb_grpc

from .harness import BenchDaemon, BenchError, emit, machine_info, now_iso, progress
from .proof_common import client_context, fd_count, logged_tracebacks, rss_bytes, shm_entries
from .soak_client import client_main

NS = "soak"
NAMESPACE = {
    "name": NS,
    "num_layers": 2,
    "num_kv_heads": 2,
    "head_dim": 16,
    "dtype": "float16",
    "page_tokens": 4,  # 1 KiB pages
    "num_pages": 512,
}
RSS_BAND = 0.05


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--clients", type=int, default=64, help="client processes (default 64)")
    p.add_argument("--minutes", type=float, default=10.0, help="how long they run (default 10)")
    p.add_argument("--rate", type=float, default=3.0, help="operations a second per client (default 3)")
    p.add_argument(
        "--universe",
        type=int,
        default=500,
        help="prompts of 4 pages the clients share (default 500: all of them fit in the disk tier, so it reaches a steady size in the warm-up)",
    )
    p.add_argument("--warmup", type=float, default=0.2, help="fraction of the run before RSS is judged (0.2)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between samples (default 5)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="4 clients for 9 s, 1 s samples (a test's size)")


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.clients, args.minutes, args.interval, args.universe = 4, 0.15, 1.0, 12
    if args.clients < 1 or args.minutes <= 0 or args.rate <= 0 or not 0 <= args.warmup < 1:
        raise SystemExit("soak: --clients >= 1, --minutes > 0, --rate > 0, 0 <= --warmup < 1")
    result = soak(args)
    result["machine"] = machine_info()
    emit(result, args.json, format_text(result))
    return 0 if result["ok"] else 1


class Sampler:
    """The daemon's footprint and Stats, sampled over the run."""

    def __init__(self, daemon: BenchDaemon) -> None:
        self.daemon = daemon
        self.channel = grpc.insecure_channel(daemon.target)
        self.kv = pb_grpc.KVStoreStub(self.channel)
        self.samples: list[dict[str, Any]] = []

    def sample(self, t: float) -> dict[str, Any]:
        pid = self.daemon.pid
        stats = self.kv.Stats(pb.StatsRequest(namespace=NS), timeout=10)
        (ns,) = stats.namespaces
        s = {
            "t": round(t, 1),
            "fds": fd_count(pid),
            "shm": shm_entries(self.daemon.shm_prefix),
            "sessions": stats.sessions,
            "reserved": ns.pages_reserved,
            "pinned": ns.pages_pinned,
            "sealed": ns.pages_sealed,
            "evictions": ns.evictions,
            "demoted": stats.tiers.demoted_pages,
            "promoted": stats.tiers.promoted_pages,
            "swapped": stats.tiers.swapped_pages,
            "internal_errors": stats.internal_errors,
        } | rss_bytes(pid)
        self.samples.append(s)
        return s

    def close(self) -> None:
        self.channel.close()


def soak(args: argparse.Namespace) -> dict[str, Any]:
    # dumpable: the soak counts the daemon's fds in /proc/<pid>/fd, closed to other processes
    # of its user otherwise (docs/security.md, "The pool"; root reads it anyway).
    daemon = BenchDaemon([NAMESPACE], {"host_tier_bytes": 256 << 10, "dumpable": True})
    daemon.server |= {"disk_tier_dir": str(daemon.dir / "disk"), "disk_tier_bytes": 64 << 20}
    shm_global_before = shm_entries()
    duration = args.minutes * 60
    ctx = client_context()
    reports = ctx.Queue()
    latest: dict[int, dict[str, Any]] = {}
    finished: set[int] = set()
    procs = []
    status = None
    try:
        daemon.start()
        sampler = Sampler(daemon)
        base = sampler.sample(0.0)
        progress(
            "baseline: fds %d, VmRSS %.1f MiB, pool entries in /dev/shm %d",
            base["fds"],
            base["VmRSS"] / 2**20,
            base["shm"],
        )
        t0 = time.monotonic()
        stop_at = time.time() + duration
        for cid in range(args.clients):
            p = ctx.Process(
                target=client_main,
                args=(
                    daemon.target,
                    cid,
                    args.seed * 10_000 + cid,
                    args.universe,
                    NS,
                    stop_at,
                    args.rate,
                    reports,
                    args.interval,
                ),
            )
            p.start()
            procs.append(p)
        progress("%d clients started in %.1fs", args.clients, time.monotonic() - t0)
        next_sample = time.monotonic() + args.interval
        while len(finished) < args.clients:
            _drain(reports, latest, finished, timeout=0.2)
            now = time.monotonic()
            if now >= next_sample:
                next_sample += args.interval
                if daemon.proc is None or daemon.proc.poll() is not None:
                    raise BenchError(f"the daemon exited during the soak:\n{daemon.stderr_tail()}")
                s = sampler.sample(now - t0)
                _progress(s, latest, now - t0)
            if now - t0 > duration + 120:
                raise BenchError(
                    f"clients still running 120 s after the end: {args.clients - len(finished)} left"
                )
        for p in procs:
            p.join(30)
        wall = time.monotonic() - t0
        settled = _wait_settled(sampler, base, wall)
        sampler.close()
        tracebacks = logged_tracebacks(daemon.stderr_path.read_text(errors="replace"))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        status = daemon.stop()
    shm_after = shm_entries(daemon.shm_prefix)
    return summary(
        args, wall, sampler.samples, settled, latest, procs, tracebacks, status, shm_after, shm_global_before
    )


def _drain(reports: Any, latest: dict[int, dict[str, Any]], finished: set[int], timeout: float) -> None:
    try:
        while True:
            cid, snap, final = reports.get(timeout=timeout)
            latest[cid] = snap
            if final:
                finished.add(cid)
            timeout = 0
    except queue.Empty:
        pass


def _totals(latest: dict[int, dict[str, Any]]) -> dict[str, Any]:
    t: dict[str, Any] = {k: Counter() for k in ("ops", "expected", "unexpected")}
    t |= {"examples": [], "wrong": [], "pages_verified": 0, "sessions": 0}
    for snap in latest.values():
        for k in ("ops", "expected", "unexpected"):
            t[k].update(snap[k])
        t["examples"] += snap["examples"]
        t["wrong"] += snap["wrong"]
        t["pages_verified"] += snap["pages_verified"]
        t["sessions"] += snap["sessions"]
    return t


def _progress(s: dict[str, Any], latest: dict[int, dict[str, Any]], elapsed: float) -> None:
    t = _totals(latest)
    ops = sum(t["ops"].values())
    progress(
        "%.0fs: %d ops (%.0f/s), %d pages verified, %d wrong, %d unexpected errors, %d expected; daemon VmRSS "
        "%.1f MiB (anon %.1f), fds %d, sessions %d, reserved %d, pinned %d, demoted %d, swapped %d",
        elapsed,
        ops,
        ops / max(elapsed, 1e-9),
        t["pages_verified"],
        len(t["wrong"]),
        sum(t["unexpected"].values()),
        sum(t["expected"].values()),
        s["VmRSS"] / 2**20,
        s["RssAnon"] / 2**20,
        s["fds"],
        s["sessions"],
        s["reserved"],
        s["pinned"],
        s["demoted"],
        s["swapped"],
    )


def _wait_settled(sampler: Sampler, base: dict[str, Any], wall: float) -> dict[str, Any]:
    """The clients are gone: wait (up to 10 s) for their sessions to end and the daemon's
    fds to go back to the baseline; the last sample."""
    deadline = time.monotonic() + 10
    while True:
        s = sampler.sample(wall)
        if (
            s["sessions"] == s["reserved"] == s["pinned"] == 0 and s["fds"] <= base["fds"]
        ) or time.monotonic() > deadline:
            return s
        time.sleep(0.1)


def summary(
    args: argparse.Namespace,
    wall: float,
    samples: list[dict[str, Any]],
    settled: dict[str, Any],
    latest: dict[int, dict[str, Any]],
    procs: list[Any],
    tracebacks: tuple[int, list[str], int],
    status: int | None,
    shm_after: int,
    shm_global_before: int,
) -> dict[str, Any]:
    t = _totals(latest)
    base = samples[0]
    running = [s for s in samples[1:-1] if s["t"] <= wall]
    judged = [s for s in running if s["t"] >= args.warmup * args.minutes * 60]
    ref = judged[0]["VmRSS"] if judged else 0
    dev = max((abs(s["VmRSS"] / ref - 1) for s in judged), default=float("nan"))
    ops = sum(t["ops"].values())
    checks = {
        "no_unexpected_errors": not t["unexpected"],
        "no_wrong_bytes": not t["wrong"] and t["pages_verified"] > 0,
        "clients_exited_cleanly": len(latest) == args.clients and all(p.exitcode == 0 for p in procs),
        "rss_flat_after_warmup": len(judged) >= 2 and dev <= RSS_BAND,
        "fds_not_grown": settled["fds"] <= base["fds"],
        "sessions_and_pages_released": settled["sessions"] == settled["reserved"] == settled["pinned"] == 0,
        "shm_back_to_baseline": shm_after == 0,
        "internal_errors_0": settled["internal_errors"] == 0,
        "no_traceback_logged": tracebacks[0] == 0,
        "clean_exit": status == 0,
    }
    return {
        "benchmark": "soak",
        "when": now_iso(),
        "ok": all(checks.values()),
        "checks": checks,
        "clients": args.clients,
        "minutes": args.minutes,
        "rate_per_client": args.rate,
        "wall_s": round(wall, 1),
        "ops": ops,
        "ops_per_s": round(ops / wall, 1),
        "ops_by_kind": dict(t["ops"].most_common()),
        "sessions_opened": t["sessions"],
        "pages_verified": t["pages_verified"],
        "wrong_bytes": t["wrong"],
        "expected_errors": dict(t["expected"].most_common()),
        "unexpected_errors": dict(t["unexpected"].most_common()),
        "unexpected_examples": t["examples"][:20],
        "rss": {
            "baseline_MiB": round(base["VmRSS"] / 2**20, 1),
            "judged_from_s": round(args.warmup * args.minutes * 60, 1),
            "reference_MiB": round(ref / 2**20, 1),
            "min_MiB": round(min((s["VmRSS"] for s in judged), default=0) / 2**20, 1),
            "max_MiB": round(max((s["VmRSS"] for s in judged), default=0) / 2**20, 1),
            "max_deviation": round(dev, 4),
            # VmRSS = anon (the daemon's heap) + file (LMDB's map of the disk tier) + shmem (pool pages)
            "parts_first_last_MiB": {
                k: [round(judged[0][k] / 2**20, 1), round(judged[-1][k] / 2**20, 1)] if judged else []
                for k in ("RssAnon", "RssFile", "RssShmem")
            },
        },
        "fds": {
            "baseline": base["fds"],
            "max": max(s["fds"] for s in samples),
            "after_clients": settled["fds"],
        },
        "shm": {
            "pool_entries_running": max(s["shm"] for s in samples),
            "pool_entries_after_stop": shm_after,
            "global_before": shm_global_before,
            "global_after": shm_entries(),
        },
        "daemon_end": {
            k: settled[k]
            for k in (
                "sessions",
                "reserved",
                "pinned",
                "sealed",
                "evictions",
                "demoted",
                "promoted",
                "swapped",
                "internal_errors",
            )
        },
        "daemon": {
            "tracebacks_logged": tracebacks[0],
            "tracebacks_first": tracebacks[1],
            "grpc_replies_to_gone_callers_logged": tracebacks[2],
            "exit_status": status,
        },
        "samples": samples,
    }


def format_text(r: dict[str, Any]) -> str:
    failed = [k for k, v in r["checks"].items() if not v]
    rss = r["rss"]
    return "\n".join(
        [
            f"soak: {r['clients']} clients x {r['minutes']:g} min at {r['rate_per_client']:g} ops/s each: "
            f"{r['ops']:,} ops ({r['ops_per_s']:.0f}/s) in {r['wall_s']:.0f}s "
            f"({'ok' if r['ok'] else 'FAILED: ' + ', '.join(failed)})",
            f"  ops: {r['ops_by_kind']}",
            f"  pages read back and verified: {r['pages_verified']:,}; wrong: {len(r['wrong_bytes'])}; "
            f"sessions opened: {r['sessions_opened']}",
            f"  expected errors: {r['expected_errors']}",
            f"  unexpected errors: {r['unexpected_errors']}",
            f"  daemon VmRSS after warm-up: {rss['min_MiB']}-{rss['max_MiB']} MiB, max deviation "
            f"{rss['max_deviation']:.1%} from {rss['reference_MiB']} MiB (band 5%); first/last {rss['parts_first_last_MiB']}",
            f"  daemon fds: baseline {r['fds']['baseline']}, max {r['fds']['max']}, after the clients "
            f"{r['fds']['after_clients']}; pool entries in /dev/shm: {r['shm']['pool_entries_running']} running, "
            f"{r['shm']['pool_entries_after_stop']} after stop",
            f"  daemon at the end: {r['daemon_end']}",
            f"  tracebacks in the daemon's log: {r['daemon']['tracebacks_logged']}; grpc's about good replies to "
            f"callers already gone (not counted): {r['daemon']['grpc_replies_to_gone_callers_logged']}",
            *(f"  FAIL {x}" for x in r["unexpected_examples"] + r["wrong_bytes"]),
            *(f"  daemon logged:\n{t}" for t in r["daemon"]["tracebacks_first"]),
        ]
    )
