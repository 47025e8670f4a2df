"""`kvstore-bench rpc`'s results: medians over the rounds, the ratios against the same run's
baselines (the goals: docs in rpc.py) and the text report."""

from __future__ import annotations

import argparse
from typing import Any

from .harness import median, now_iso

RATIO_GOAL = 0.8
RATIO_AT = 16
P99_GOAL_MS = 1.0
P99_AT = 1
SIDES = ("kvstore", "echo", "echo_same_grpc", "echo_raw", "kvstore_lane", "echo_lane", "kvstore_aio")
BUSY = 0.2  # CPUs used by other processes above which results are flagged


def summarize(
    args: argparse.Namespace,
    points: dict[str, dict[int, list[dict[str, Any]]]],
    request_bytes: int,
    reply_bytes: int,
    prompt_pages: int,
    page_tokens: int,
) -> dict[str, Any]:
    keys = (
        "rps",
        "p50_ms",
        "p99_ms",
        "server_cpu_us_per_call",
        "server_loop_cpu_us_per_call",
        "client_cpu_us_per_call",
        "server_cpu_util",
        "client_cpu_util",
        "others_cpu_util",
    )
    results: dict[str, dict[str, Any]] = {}
    for side, by_c in points.items():
        results[side] = {}
        for c, rounds in by_c.items():
            entry: dict[str, Any] = {k: round(median([r[k] for r in rounds]), 4) for k in keys}
            if all("handler_us_per_call" in r for r in rounds):  # (kvstore over gRPC: the edge times it)
                entry["handler_us_per_call"] = round(median([r["handler_us_per_call"] for r in rounds]), 2)
            entry["rps_rounds"] = [round(r["rps"]) for r in rounds]
            entry["p99_ms_rounds"] = [round(r["p99_ms"], 4) for r in rounds]
            entry["others_cpu_util_max"] = round(max(r["others_cpu_util"] for r in rounds), 4)
            entry["calls"] = sum(r["calls"] for r in rounds)
            results[side][str(c)] = entry
    out: dict[str, Any] = {
        "benchmark": "rpc",
        "when": now_iso(),
        "config": {
            "transport": "unix socket",
            "prompt_tokens": prompt_pages * page_tokens,
            "prompt_pages": prompt_pages,
            "token_ids": "repeated" if args.repeated_ids else "packed",
            "page_tokens": page_tokens,
            "request_bytes": request_bytes,
            "reply_bytes": reply_bytes,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "rounds": args.rounds,
            "pool_pages": args.pool_pages,
            "concurrency": args.concurrency,
            "client": "grpc.aio on uvloop, 1 channel, N tasks with 1 call in flight each; lane sides: "
            "asyncio on uvloop, N connections with 1 call in flight each",
        },
        "results": results,
    }
    if str(RATIO_AT) in results["kvstore"]:
        kv, ec = results["kvstore"][str(RATIO_AT)], results["echo"][str(RATIO_AT)]
        per_round = sorted(k / e for k, e in zip(kv["rps_rounds"], ec["rps_rounds"], strict=True))
        ratio = kv["rps"] / ec["rps"]
        out |= {
            "ratio": round(ratio, 4),
            "ratio_definition": f"kvstore Lookup RPC/s / echo RPC/s at concurrency {RATIO_AT}",
            "ratio_rounds": [round(r, 4) for r in per_round],
            "ratio_goal": RATIO_GOAL,
            "ratio_goal_met": ratio >= RATIO_GOAL,
        }
    if str(RATIO_AT) in results.get("echo_same_grpc", {}):
        kv, same = results["kvstore"][str(RATIO_AT)], results["echo_same_grpc"][str(RATIO_AT)]
        out |= {
            "ratio_same_grpc": round(kv["rps"] / same["rps"], 4),
            "ratio_same_grpc_definition": f"kvstore Lookup RPC/s / echo_same_grpc RPC/s at concurrency {RATIO_AT} "
            "(the echo run with the daemon's GRPC_EXPERIMENTS: what the daemon's own work leaves)",
            "ratio_same_grpc_rounds": sorted(
                round(k / e, 4) for k, e in zip(kv["rps_rounds"], same["rps_rounds"], strict=True)
            ),
        }
    if str(P99_AT) in results["kvstore"]:
        p99 = results["kvstore"][str(P99_AT)]["p99_ms"]
        out |= {
            "p99_c1_ms": p99,
            "p99_goal_ms": P99_GOAL_MS,
            "p99_goal_met": p99 < P99_GOAL_MS,
        }
    # Where the daemon's time a gRPC Lookup goes, against echo's: its loop thread, and of that
    # the Lookup's own work (the edge-timed handler) at each concurrency.
    for c, e in results["kvstore"].items():
        if "handler_us_per_call" in e:
            out[f"handler_us_c{c}"] = e["handler_us_per_call"]
            out[f"loop_us_c{c}"] = {"kvstore": e["server_loop_cpu_us_per_call"]} | {
                "echo": results["echo"][c]["server_loop_cpu_us_per_call"]
            }
    return out | lane_keys(results)


def lane_keys(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The lane's numbers against the same run's baselines: the issue's (the grpc.aio echo)
    and the lane's own floor (echo_lane)."""
    out: dict[str, Any] = {}
    at = str(RATIO_AT)
    if at in results["kvstore_lane"]:
        lane = results["kvstore_lane"][at]
        for key, base, what in (
            ("lane_ratio", "echo", "grpc.aio echo"),
            ("lane_floor_ratio", "echo_lane", "lane echo"),
        ):
            rounds = zip(lane["rps_rounds"], results[base][at]["rps_rounds"], strict=True)
            out |= {
                key: round(lane["rps"] / results[base][at]["rps"], 4),
                f"{key}_definition": f"kvstore_lane Lookup RPC/s / {base} ({what}) RPC/s at concurrency {RATIO_AT}",
                f"{key}_rounds": sorted(round(k / e, 4) for k, e in rounds),
            }
        out["lane_ratio_goal_met"] = out["lane_ratio"] >= RATIO_GOAL
    if str(P99_AT) in results["kvstore_lane"]:
        p99 = results["kvstore_lane"][str(P99_AT)]["p99_ms"]
        out |= {"lane_p99_ms_c1": p99, "lane_p99_goal_met": p99 < P99_GOAL_MS}
    # The library's asyncio client on the lane (kvstore_client.aio_lane), against the same echo.
    aio = results.get("kvstore_aio", {})
    if at in aio:
        rounds = zip(aio[at]["rps_rounds"], results["echo"][at]["rps_rounds"], strict=True)
        out |= {
            "aio_lane_ratio": round(aio[at]["rps"] / results["echo"][at]["rps"], 4),
            "aio_lane_ratio_definition": f"kvstore_aio Lookup RPC/s / echo (grpc.aio echo) RPC/s at concurrency {RATIO_AT}",
            "aio_lane_ratio_rounds": sorted(round(k / e, 4) for k, e in rounds),
        }
    if str(P99_AT) in aio:
        out["aio_lane_p99_ms_c1"] = aio[str(P99_AT)]["p99_ms"]
    return out


def format_text(r: dict[str, Any]) -> str:
    c, m = r["config"], r["machine"]
    lines = [
        f"rpc: Lookup of a {c['prompt_pages']}-page ({c['prompt_tokens']}-token) prompt over a "
        f"unix socket vs a bare grpc.aio echo",
        f"  machine: {m['cpu_count']} cpus, {m['cpu_model']}, grpcio {m['grpcio']}, uvloop {m['uvloop']}",
        f"  request {c['request_bytes']} B, reply {c['reply_bytes']} B; {c['duration_s']:g}s per point "
        f"after {c['warmup_s']:g}s warmup, {c['rounds']} round(s), medians",
        "",
        f"  {'side':<13}{'conc':>5}{'RPC/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'srv us/call':>13}{'loop us':>9}{'handler us':>12}{'cli us/call':>13}{'srv cpu':>9}{'cli cpu':>9}"
        f"{'others':>8}",
    ]
    for conc in c["concurrency"]:
        for side in SIDES:
            e = r["results"][side][str(conc)]
            lines.append(
                f"  {side:<13}{conc:>5}{e['rps']:>10.0f}{e['p50_ms']:>9.3f}{e['p99_ms']:>9.3f}"
                f"{e['server_cpu_us_per_call']:>13.0f}{e['server_loop_cpu_us_per_call']:>9.0f}"
                + (f"{e['handler_us_per_call']:>12.1f}" if "handler_us_per_call" in e else f"{'-':>12}")
                + f"{e['client_cpu_us_per_call']:>13.0f}"
                f"{e['server_cpu_util']:>9.2f}{e['client_cpu_util']:>9.2f}{e['others_cpu_util']:>8.2f}"
            )
    lines.append("")
    busiest = max(e["others_cpu_util_max"] for side in r["results"].values() for e in side.values())
    if busiest > BUSY:
        lines.append(
            f"  warning: other processes used up to {busiest:.2f} CPUs during some rounds (column "
            "'others' is the median); those rounds are unreliable on a small machine"
        )
    if "ratio" in r:
        lines.append(
            f"  ratio = kvstore / echo RPC/s at concurrency {RATIO_AT} = {r['ratio']:.3f} "
            f"(rounds {r['ratio_rounds']}); goal >= {r['ratio_goal']}: "
            + ("met" if r["ratio_goal_met"] else "MISSED")
        )
    if "ratio_same_grpc" in r:
        lines.append(
            f"  ratio_same_grpc = kvstore / echo_same_grpc (echo on the daemon's gRPC experiments, "
            f"{c.get('daemon_grpc_experiments', '')!r}) at concurrency {RATIO_AT} = {r['ratio_same_grpc']:.3f} "
            f"(rounds {r['ratio_same_grpc_rounds']})"
        )
    if "p99_c1_ms" in r:
        lines.append(
            f"  p99 at concurrency {P99_AT} = {r['p99_c1_ms']:.3f} ms; goal < {r['p99_goal_ms']:g} ms: "
            + ("met" if r["p99_goal_met"] else "MISSED")
        )
    for conc in c["concurrency"]:
        if f"handler_us_c{conc}" in r:
            loop = r[f"loop_us_c{conc}"]
            lines.append(
                f"  at concurrency {conc}: the server's loop thread {loop['kvstore']:.0f} us a call (echo's "
                f"{loop['echo']:.0f}); the daemon's Lookup handler, timed in place, {r[f'handler_us_c{conc}']:.1f} us"
            )
    for g, p in sorted(r.get("daemon_gc", {}).items()):
        lines.append(
            f"  the daemon's GC, generation {g}: {p['pauses']:.0f} collections in the run, "
            f"{p['seconds'] * 1e3:.1f} ms in all, the longest {p['max_ms']:.2f} ms"
        )
    if "lane_ratio" in r:
        lines += [
            f"  lane_ratio = kvstore_lane / echo (the grpc.aio echo, the goal's baseline) RPC/s at concurrency "
            f"{RATIO_AT} = {r['lane_ratio']:.3f} (rounds {r['lane_ratio_rounds']}); goal >= {RATIO_GOAL}: "
            + ("met" if r["lane_ratio_goal_met"] else "MISSED"),
            f"  lane_floor_ratio = kvstore_lane / echo_lane (the lane's own floor: canned bytes, no daemon) "
            f"at concurrency {RATIO_AT} = {r['lane_floor_ratio']:.3f} (rounds {r['lane_floor_ratio_rounds']})",
        ]
    if "aio_lane_ratio" in r:
        lines.append(
            f"  aio_lane_ratio = kvstore_aio (the library's asyncio client on the lane) / echo RPC/s at "
            f"concurrency {RATIO_AT} = {r['aio_lane_ratio']:.3f} (rounds {r['aio_lane_ratio_rounds']}); "
            f"its p99 at concurrency {P99_AT} = {r.get('aio_lane_p99_ms_c1', float('nan')):.3f} ms"
        )
    if "lane_p99_ms_c1" in r:
        lines.append(
            f"  lane p99 at concurrency {P99_AT} = {r['lane_p99_ms_c1']:.3f} ms; goal < {P99_GOAL_MS:g} ms: "
            + ("met" if r["lane_p99_goal_met"] else "MISSED")
        )
    return "\n".join(lines)
