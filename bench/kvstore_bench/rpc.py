"""`kvstore-bench rpc`: Lookup of a 64-page prompt over the unix socket vs a bare gRPC echo.

Setup: a daemon (its own process) with a namespace of 16-token pages holding a committed
64-page (1024-token) prefix, so every lookup hits all 64 pages; an echo server
(echo_server.py: grpc.aio on uvloop, generic handler, no protobuf) in its own process
answering with the daemon's real serialized LookupResponse for that prompt.

Client (this process, asyncio on uvloop, one channel per measurement, N tasks each with
one call in flight, so N concurrent calls on the channel). Three sides, measured back to
back at each concurrency, the order alternating between rounds:

- `kvstore`:  `KVStoreStub.Lookup(req)` against the daemon. Client: serialize the
  LookupRequest (1024 token ids, packed in `token_ids_u32` as the client library sends them;
  `--repeated-ids` for the repeated `token_ids` older clients send; the session id), parse the LookupResponse (packed: 64
  slots and the 64 block hashes as one bytes field).
  Daemon: grpc.aio, parse, servicer, store.lookup (session lease renewal, token checks,
  64 chained BLAKE2b hashes (remembered after the first lookup: docs/hashing.md,
  "Remembered hashes"), index probes, LRU touch), build and serialize the reply.
- `echo`:     the same stub, the same request object, the same reply parsing, against
  the echo server: the daemon's side is replaced by "return canned bytes". This is the
  baseline of the ratio: what is left is the daemon's own work per lookup.
- `echo_raw`: raw bytes both ways on `channel.unary_unary` (no protobuf anywhere): the
  floor of grpc.aio itself, for reference.

Reported per side and concurrency: RPC/s, p50/p99 latency (client-side, per call), CPU
time per call of the server process and of this client process (from /proc), which tell
which process is the bottleneck, and the CPUs other processes used meanwhile ('others':
on a 2-core machine anything else running skews every number).

ratio = kvstore RPC/s / echo RPC/s at concurrency 16 (goal >= 0.8); p99 of kvstore at
concurrency 1 (goal < 1 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc
import kvstore_client
import numpy as np
import uvloop
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb
from kvstore_proto.kvstore.v1 import kvstore_pb2_grpc as pb_grpc

from . import echo_server, rpc_lane
from .harness import (
    BenchDaemon,
    BenchError,
    ChildServer,
    emit,
    machine_info,
    median,
    now_iso,
    percentile,
    progress,
    self_cpu_seconds,
    system_busy_seconds,
)

RATIO_GOAL = 0.8
RATIO_AT = 16
P99_GOAL_MS = 1.0
P99_AT = 1
NAMESPACE = "rpc"
PAGE_TOKENS = 16
PROMPT_PAGES = 64
VOCAB = 128256  # Llama-3's: most ids take 3 varint bytes on the wire
SIDES = ("kvstore", "echo", "echo_raw", "kvstore_lane", "echo_lane")
BUSY = 0.2  # CPUs used by other processes above which results are flagged
LEASE_S = 3600  # one session for the whole run; lookups renew it anyway


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument(
        "--repeated-ids", action="store_true", help="token ids in the repeated token_ids (default: packed)"
    )
    p.add_argument("--duration", type=float, default=2.0, help="seconds measured per point (default 2)")
    p.add_argument("--warmup", type=float, default=0.5, help="seconds run before each point (default 0.5)")
    p.add_argument(
        "--concurrency",
        default="1,16,64",
        type=lambda s: [int(x) for x in s.split(",") if x.strip()],
        help="calls in flight, comma separated (default 1,16,64)",
    )
    p.add_argument(
        "--rounds", type=int, default=3, help="rounds over all points, order alternating; medians (default 3)"
    )


def run(args: argparse.Namespace) -> int:
    if args.duration <= 0 or args.warmup < 0 or args.rounds < 1 or not args.concurrency:
        raise SystemExit("rpc: --duration > 0, --warmup >= 0, --rounds >= 1 and a --concurrency list please")
    if min(args.concurrency) < 1:
        raise SystemExit("rpc: every --concurrency must be >= 1")
    ns = namespace()
    tokens = random.Random(0).choices(range(VOCAB), k=PROMPT_PAGES * PAGE_TOKENS)
    with BenchDaemon([ns], server={"lease_ttl_max_s": LEASE_S}) as daemon:
        reply_bytes = prepare(daemon.target, tokens)
        with tempfile.NamedTemporaryFile(prefix="kvsb-reply-", suffix=".bin") as reply_file:
            reply_file.write(reply_bytes)
            reply_file.flush()
            argv = [
                sys.executable,
                "-m",
                "kvstore_bench.echo_server",
                "--socket",
                "{socket}",
                "--reply",
                reply_file.name,
            ]
            with (
                ChildServer("echo", argv) as echo,
                rpc_lane.LaneChild("echo_lane", reply_file.name) as echo_lane,
            ):
                result = uvloop.run(measure_all(args, daemon, echo, echo_lane, tokens, len(reply_bytes)))
    result["machine"] = machine_info(uvloop=uvloop.__version__)
    emit(result, args.json, format_text(result))
    return 0


def namespace() -> dict[str, Any]:
    """The benchmark's namespace: 16-token pages, room for 4 prompts (nothing is evicted)."""
    return {
        "name": NAMESPACE,
        "num_layers": 2,
        "num_kv_heads": 2,
        "head_dim": 16,
        "dtype": "float16",
        "page_tokens": PAGE_TOKENS,
        "num_pages": 4 * PROMPT_PAGES,
        "vocab_size": VOCAB,
    }


def prepare(target: str, tokens: list[int]) -> bytes:
    """Commit the prompt's 64 pages; return the daemon's serialized reply to a lookup of it."""
    progress("committing a %d-page prefix (%d tokens)", PROMPT_PAGES, len(tokens))
    with (
        kvstore_client.connect(target, client_name="bench-rpc-setup") as kv,
        kv.allocate(NAMESPACE) as seq,
    ):
        seq.append(tokens)
        seq.commit()
    # Released: the pages stay sealed and cached (nothing evicts them in this pool).
    # The reply the echo server will send: the daemon's own, as bytes.
    with grpc.insecure_channel(target) as channel:
        reply = pb_grpc.KVStoreStub(channel).Lookup(pb.LookupRequest(namespace=NAMESPACE, token_ids=tokens))
    if reply.hit_tokens != len(tokens):
        raise BenchError(f"setup: lookup hit {reply.hit_tokens} tokens, expected {len(tokens)}")
    return reply.SerializeToString()


Call = Callable[[], Awaitable[Any]]
# (server, N) -> an async context manager of N calls, one for each task
Calls = Callable[[ChildServer, int], AbstractAsyncContextManager[list[Call]]]


async def measure_all(
    args: argparse.Namespace,
    daemon: BenchDaemon,
    echo: ChildServer,
    echo_lane: rpc_lane.LaneChild,
    tokens: list[int],
    reply_len: int,
) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(daemon.target) as ch:
        opened = await pb_grpc.KVStoreStub(ch).OpenSession(
            pb.OpenSessionRequest(client_name="bench-rpc", lease_ttl_ms=LEASE_S * 1000)
        )
    sid = opened.session_id
    if args.repeated_ids:
        request = pb.LookupRequest(session_id=sid, namespace=NAMESPACE, token_ids=tokens)
    else:
        packed = np.asarray(tokens, dtype="<u4").tobytes()
        request = pb.LookupRequest(session_id=sid, namespace=NAMESPACE, token_ids_u32=packed)
    request_bytes = request.SerializeToString()
    want_hit = len(tokens)

    def lookup_call(channel: grpc.aio.Channel) -> Call:
        method = pb_grpc.KVStoreStub(channel).Lookup

        async def call() -> None:
            reply = await method(request, timeout=30)
            if reply.hit_tokens != want_hit:
                raise BenchError(f"lookup hit {reply.hit_tokens} tokens, expected {want_hit}")

        return call

    def raw_call(channel: grpc.aio.Channel) -> Call:
        method = channel.unary_unary(echo_server.ECHO_PATH)  # no serializers: bytes in, bytes out

        async def call() -> None:
            reply = await method(request_bytes, timeout=30)
            if len(reply) != reply_len:
                raise BenchError(f"echo replied {len(reply)} bytes, expected {reply_len}")

        return call

    def on_channel(make_call: Callable[[grpc.aio.Channel], Call]) -> Calls:
        @contextlib.asynccontextmanager
        async def calls(server: ChildServer, n: int) -> AsyncIterator[list[Call]]:
            async with grpc.aio.insecure_channel(server.target) as channel:
                yield [make_call(channel)] * n  # N tasks, one channel

        return calls

    def on_lane(path: str) -> Calls:
        @contextlib.asynccontextmanager
        async def calls(server: ChildServer, n: int) -> AsyncIterator[list[Call]]:
            async with rpc_lane.connections(path, n) as conns:  # N connections, one call each
                yield [rpc_lane.lookup_call(conn, request, want_hit) for conn in conns]

        return calls

    sides: dict[str, tuple[ChildServer, Calls]] = {
        "kvstore": (daemon, on_channel(lookup_call)),
        "echo": (echo, on_channel(lookup_call)),
        "echo_raw": (echo, on_channel(raw_call)),
        "kvstore_lane": (daemon, on_lane(rpc_lane.daemon_lane_path(daemon))),
        "echo_lane": (echo_lane, on_lane(echo_lane.lane_path)),
    }
    await same_answer(daemon, request)
    points: dict[str, dict[int, list[dict[str, Any]]]] = {s: {c: [] for c in args.concurrency} for s in SIDES}
    for rnd in range(args.rounds):
        order = SIDES if rnd % 2 == 0 else tuple(reversed(SIDES))
        for c in args.concurrency:
            for side in order:
                server, calls = sides[side]
                point = await measure_point(server, calls, c, args.duration, args.warmup)
                points[side][c].append(point)
                progress(
                    "round %d/%d  %-12s c=%-3d %8.0f RPC/s  p50 %.3f ms  p99 %.3f ms  server %.0f us/call  "
                    "client %.0f us/call  others' cpu %.2f",
                    rnd + 1,
                    args.rounds,
                    side,
                    c,
                    point["rps"],
                    point["p50_ms"],
                    point["p99_ms"],
                    point["server_cpu_us_per_call"],
                    point["client_cpu_us_per_call"],
                    point["others_cpu_util"],
                )
    async with grpc.aio.insecure_channel(daemon.target) as ch:
        await pb_grpc.KVStoreStub(ch).CloseSession(pb.CloseSessionRequest(session_id=sid))
    return summarize(args, points, len(request_bytes), reply_len)


async def same_answer(daemon: BenchDaemon, request: pb.LookupRequest) -> None:
    """The lane side measures the same call: its Lookup answers what the gRPC one does."""
    async with grpc.aio.insecure_channel(daemon.target) as ch:
        over_grpc = await pb_grpc.KVStoreStub(ch).Lookup(request, timeout=30)
    over_lane = await rpc_lane.lookup(rpc_lane.daemon_lane_path(daemon), request)
    if (over_lane.hit_tokens, over_lane.slots, over_lane.block_hashes) != (
        over_grpc.hit_tokens,
        over_grpc.slots,
        over_grpc.block_hashes,
    ):
        raise BenchError(
            f"the lane's Lookup hit {over_lane.hit_tokens} tokens, slots {list(over_lane.slots)[:8]}..., "
            f"gRPC's {over_grpc.hit_tokens}, slots {list(over_grpc.slots)[:8]}...: not the same call"
        )


async def measure_point(
    server: ChildServer,
    open_calls: Calls,
    concurrency: int,
    duration: float,
    warmup: float,
) -> dict[str, Any]:
    """`concurrency` tasks, each awaiting one call at a time, on fresh connections (one gRPC
    channel; one lane connection a task): `warmup` seconds untimed, then `duration` seconds
    in which each call that both starts and ends counts. CPU times of the server and of this
    process are sampled at the window's edges."""
    async with open_calls(server, concurrency) as calls:
        for call in dict.fromkeys(calls):
            await call()  # connect
        loop = asyncio.get_running_loop()
        clock = time.perf_counter
        t_start = clock() + warmup
        t_end = t_start + duration
        latencies: list[float] = []

        async def worker(call: Call) -> None:
            while True:
                t0 = clock()
                if t0 >= t_end:
                    return
                await call()
                t1 = clock()
                if t0 >= t_start and t1 <= t_end:
                    latencies.append(t1 - t0)

        def cpu() -> tuple[float, float, float]:
            return server.cpu_seconds(), self_cpu_seconds(), system_busy_seconds()

        async def sample_cpu() -> tuple[tuple[float, float, float], tuple[float, float, float]]:
            await asyncio.sleep(max(0.0, t_start - clock()))
            before = cpu()
            await asyncio.sleep(max(0.0, t_end - clock()))
            return before, cpu()

        sampler = loop.create_task(sample_cpu())
        await asyncio.gather(*(worker(call) for call in calls))
        (s0, c0, b0), (s1, c1, b1) = await sampler
    n = len(latencies)
    latencies.sort()
    return {
        "calls": n,
        "rps": n / duration,
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "server_cpu_us_per_call": (s1 - s0) / max(n, 1) * 1e6,
        "client_cpu_us_per_call": (c1 - c0) / max(n, 1) * 1e6,
        "server_cpu_util": (s1 - s0) / duration,
        "client_cpu_util": (c1 - c0) / duration,
        # CPU that processes other than the server and this client took meanwhile (0 on a quiet machine).
        "others_cpu_util": max(0.0, (b1 - b0) - (s1 - s0) - (c1 - c0)) / duration,
    }


def summarize(
    args: argparse.Namespace,
    points: dict[str, dict[int, list[dict[str, Any]]]],
    request_bytes: int,
    reply_bytes: int,
) -> dict[str, Any]:
    keys = (
        "rps",
        "p50_ms",
        "p99_ms",
        "server_cpu_us_per_call",
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
            "prompt_tokens": PROMPT_PAGES * PAGE_TOKENS,
            "prompt_pages": PROMPT_PAGES,
            "token_ids": "repeated" if args.repeated_ids else "packed",
            "page_tokens": PAGE_TOKENS,
            "request_bytes": request_bytes,
            "reply_bytes": reply_bytes,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "rounds": args.rounds,
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
    if str(P99_AT) in results["kvstore"]:
        p99 = results["kvstore"][str(P99_AT)]["p99_ms"]
        out |= {
            "p99_c1_ms": p99,
            "p99_goal_ms": P99_GOAL_MS,
            "p99_goal_met": p99 < P99_GOAL_MS,
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
        f"{'srv us/call':>13}{'cli us/call':>13}{'srv cpu':>9}{'cli cpu':>9}{'others':>8}",
    ]
    for conc in c["concurrency"]:
        for side in SIDES:
            e = r["results"][side][str(conc)]
            lines.append(
                f"  {side:<13}{conc:>5}{e['rps']:>10.0f}{e['p50_ms']:>9.3f}{e['p99_ms']:>9.3f}"
                f"{e['server_cpu_us_per_call']:>13.0f}{e['client_cpu_us_per_call']:>13.0f}"
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
    if "p99_c1_ms" in r:
        lines.append(
            f"  p99 at concurrency {P99_AT} = {r['p99_c1_ms']:.3f} ms; goal < {r['p99_goal_ms']:g} ms: "
            + ("met" if r["p99_goal_met"] else "MISSED")
        )
    if "lane_ratio" in r:
        lines += [
            f"  lane_ratio = kvstore_lane / echo (the grpc.aio echo, the goal's baseline) RPC/s at concurrency "
            f"{RATIO_AT} = {r['lane_ratio']:.3f} (rounds {r['lane_ratio_rounds']}); goal >= {RATIO_GOAL}: "
            + ("met" if r["lane_ratio_goal_met"] else "MISSED"),
            f"  lane_floor_ratio = kvstore_lane / echo_lane (the lane's own floor: canned bytes, no daemon) "
            f"at concurrency {RATIO_AT} = {r['lane_floor_ratio']:.3f} (rounds {r['lane_floor_ratio_rounds']})",
        ]
    if "lane_p99_ms_c1" in r:
        lines.append(
            f"  lane p99 at concurrency {P99_AT} = {r['lane_p99_ms_c1']:.3f} ms; goal < {P99_GOAL_MS:g} ms: "
            + ("met" if r["lane_p99_goal_met"] else "MISSED")
        )
    return "\n".join(lines)
