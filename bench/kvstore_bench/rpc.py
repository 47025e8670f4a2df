"""`kvstore-bench rpc`: Lookup of a 64-page prompt over the unix socket vs a bare gRPC echo,
and over the daemon's lane vs the same echo and a bare lane echo.

Setup: a daemon (its own process) with a namespace of 16-token pages holding a committed
64-page (1024-token) prefix, so every lookup hits all 64 pages; an echo server
(echo_server.py: grpc.aio on uvloop, generic handler, no protobuf) in its own process
answering with the daemon's real serialized LookupResponse for that prompt. The pool holds
4 prompts (`--pool-pages` for more: a node's pool is larger, and the daemon's MRC samples and
its GC work with the pool's size); the daemon serves its metrics endpoint, read for the
Lookup's time (below) and, at the end, its GC collections (`daemon_gc`: by generation, how
many, their seconds, the longest).

Client (this process, asyncio on uvloop, one channel per measurement, N tasks each with
one call in flight, so N concurrent calls on the channel). Seven sides, measured back to
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
  baseline of the ratio, the issue's bare grpc.aio echo: it runs on gRPC's own defaults
  (GRPC_EXPERIMENTS empty, whatever the caller's shell sets), the daemon on its own gRPC
  setting, so the ratio is the daemon's own work and its transport's difference together.
- `echo_same_grpc`: the same echo server run with the daemon's GRPC_EXPERIMENTS (its
  `server.grpc_experiments`, `-event_engine_listener` by default, or the caller's
  GRPC_EXPERIMENTS, which the daemon inherits and which wins): the same transport as the
  daemon's, so kvstore over it is what the daemon's own work leaves (`ratio_same_grpc`).
- `echo_raw`: raw bytes both ways on `channel.unary_unary` (no protobuf anywhere): the
  floor of grpc.aio itself, for reference.
- `kvstore_lane`: the same LookupRequest (same prompt, packed ids, session), serialized and
  its LookupResponse parsed on every call, over the daemon's lane (`<socket>.lane`,
  docs/api.md "The lane"; its framing from kvstore_proto/lane.py) from an asyncio client in
  this process (rpc_lane.py). The lane serves one call at a time per connection, so N calls
  in flight are N connections with one call each. Before measuring, one lane Lookup must
  answer the same hit, slots and hashes as the gRPC one, or the run stops.
- `echo_lane`: the same lane client against lane_echo.py (asyncio on uvloop, its own
  process, the same framing, answering the daemon's real serialized reply; no protobuf):
  the lane's own floor, as `echo` is gRPC's.
- `kvstore_aio`: the same Lookup through the library's asyncio lane client
  (`kvstore_client.aio_lane.AsyncLane.call`, what `kvstore_client.aio` sends its put/get calls
  with: a pool of connections, a call taking one, its deadline, the request serialized and the
  reply parsed), one client shared by the N tasks.

Reported per side and concurrency: RPC/s, p50/p99 latency (client-side, per call), CPU
time per call of the server process and of this client process (from /proc), which tell
which process is the bottleneck, and the CPUs other processes used meanwhile ('others':
on a 2-core machine anything else running skews every number). Where a server's call time
goes: `server_loop_cpu_us_per_call`, the CPU of its main thread alone (its asyncio loop:
grpc.aio's Python side and the handler; gRPC's own threads are the rest), and for `kvstore`
`handler_us_per_call`, the daemon's own time inside a Lookup as it ran under this load (the
edge's `kvstore_rpc_duration_seconds` for KVStore/Lookup, sum over count in the window,
scraped from the daemon's metrics endpoint: request parsed to reply encoded).

ratio = kvstore RPC/s / echo RPC/s at concurrency 16 (goal >= 0.8); p99 of kvstore at
concurrency 1 (goal < 1 ms); ratio_same_grpc = kvstore / echo_same_grpc at 16 (no goal of
its own: the daemon's work alone, its gRPC configuration the same on both sides). For the
lane, against the same run's baselines: lane_ratio = kvstore_lane RPC/s / echo RPC/s at
concurrency 16 (the issue's baseline, the grpc.aio echo; goal >= 0.8), lane_floor_ratio =
kvstore_lane / echo_lane at 16 (how close the daemon's lane is to a lane that does nothing),
lane_p99_ms_c1 = p99 of kvstore_lane at concurrency 1 (goal < 1 ms). aio_lane_ratio = kvstore_aio RPC/s / echo RPC/s at 16 and
aio_lane_p99_ms_c1 (no goals of their own): what an asyncio engine using the library gets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import socket
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc
import kvstore_client
import numpy as np
import uvloop
from kvstore_client import aio_lane
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb
from kvstore_proto.kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

from kvstore.config import ServerConfig

from . import echo_server, rpc_lane
from .harness import (
    BenchDaemon,
    BenchError,
    ChildServer,
    emit,
    machine_info,
    percentile,
    progress,
    self_cpu_seconds,
    system_busy_seconds,
)
from .rpc_report import SIDES, format_text, summarize

NAMESPACE = "rpc"
PAGE_TOKENS = 16
PROMPT_PAGES = 64
VOCAB = 128256  # Llama-3's: most ids take 3 varint bytes on the wire
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
    p.add_argument(
        "--pool-pages",
        type=int,
        default=4 * PROMPT_PAGES,
        help=f"pages in the daemon's pool (default {4 * PROMPT_PAGES}: nothing is evicted either way)",
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(args: argparse.Namespace) -> int:
    if args.duration <= 0 or args.warmup < 0 or args.rounds < 1 or not args.concurrency:
        raise SystemExit("rpc: --duration > 0, --warmup >= 0, --rounds >= 1 and a --concurrency list please")
    if min(args.concurrency) < 1:
        raise SystemExit("rpc: every --concurrency must be >= 1")
    if args.pool_pages < PROMPT_PAGES:
        raise SystemExit(f"rpc: --pool-pages must hold the {PROMPT_PAGES}-page prompt")
    ns = namespace() | {"num_pages": args.pool_pages}
    tokens = random.Random(0).choices(range(VOCAB), k=PROMPT_PAGES * PAGE_TOKENS)
    metrics = f"127.0.0.1:{free_port()}"  # the Lookup's own time, from the edge's histogram
    with BenchDaemon([ns], server={"lease_ttl_max_s": LEASE_S, "metrics": metrics}) as daemon:
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
            echo = ChildServer("echo", argv)
            echo.env["GRPC_EXPERIMENTS"] = ""  # (bare: gRPC's own defaults, whatever this shell sets)
            same_grpc = ChildServer("echo_same_grpc", argv)
            same_grpc.env["GRPC_EXPERIMENTS"] = daemon_grpc_experiments()
            with (
                echo,
                same_grpc,
                rpc_lane.LaneChild("echo_lane", reply_file.name) as echo_lane,
            ):
                result = uvloop.run(
                    measure_all(args, daemon, echo, same_grpc, echo_lane, tokens, len(reply_bytes), metrics)
                )
        result["config"]["daemon_grpc_experiments"] = daemon_grpc_experiments()
        result["daemon_gc"] = gc_pauses(metrics)  # the whole run's, the daemon still serving
    result["machine"] = machine_info(uvloop=uvloop.__version__)
    emit(result, args.json, format_text(result))
    return 0


def daemon_grpc_experiments() -> str:
    """What the benchmark's daemon runs gRPC with: GRPC_EXPERIMENTS from this environment
    (which the daemon inherits and which wins), else `server.grpc_experiments`'s default."""
    return os.environ.get("GRPC_EXPERIMENTS", ServerConfig().grpc_experiments)


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
    same_grpc: ChildServer,
    echo_lane: rpc_lane.LaneChild,
    tokens: list[int],
    reply_len: int,
    metrics: str,
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

    def on_library_lane(path: str) -> Calls:
        @contextlib.asynccontextmanager
        async def calls(server: ChildServer, n: int) -> AsyncIterator[list[Call]]:
            lane = aio_lane.AsyncLane(path, "")  # its pool: a connection per call in flight

            async def call() -> None:
                reply = await lane.call("Lookup", request, 30)
                if reply.hit_tokens != want_hit:
                    raise BenchError(
                        f"library lane lookup hit {reply.hit_tokens} tokens, expected {want_hit}"
                    )

            try:
                yield [call] * n
            finally:
                lane.close()

        return calls

    sides: dict[str, tuple[ChildServer, Calls]] = {
        "kvstore": (daemon, on_channel(lookup_call)),
        "echo": (echo, on_channel(lookup_call)),
        "echo_same_grpc": (same_grpc, on_channel(lookup_call)),
        "echo_raw": (echo, on_channel(raw_call)),
        "kvstore_lane": (daemon, on_lane(rpc_lane.daemon_lane_path(daemon))),
        "echo_lane": (echo_lane, on_lane(echo_lane.lane_path)),
        "kvstore_aio": (daemon, on_library_lane(rpc_lane.daemon_lane_path(daemon))),
    }
    await same_answer(daemon, request)
    points: dict[str, dict[int, list[dict[str, Any]]]] = {s: {c: [] for c in args.concurrency} for s in SIDES}
    for rnd in range(args.rounds):
        order = SIDES if rnd % 2 == 0 else tuple(reversed(SIDES))
        for c in args.concurrency:
            for side in order:
                server, calls = sides[side]
                timed = (lambda: lookup_seconds(metrics)) if side == "kvstore" else None
                point = await measure_point(server, calls, c, args.duration, args.warmup, timed)
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
    return summarize(args, points, len(request_bytes), reply_len, PROMPT_PAGES, PAGE_TOKENS)


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


def scrape(metrics: str) -> list[Any]:
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as r:
        return list(text_string_to_metric_families(r.read().decode()))


def gc_pauses(metrics: str) -> dict[str, dict[str, float]]:
    """The daemon's cyclic-GC collections so far, by generation: how many, seconds, longest ms."""
    out: dict[str, dict[str, float]] = {}
    names = {
        "kvstore_gc_pauses_total": "pauses",
        "kvstore_gc_pause_seconds_total": "seconds",
        "kvstore_gc_pause_max_seconds": "max_ms",
    }
    for family in scrape(metrics):
        for sample in family.samples:
            if sample.name in names:
                value = sample.value * 1e3 if names[sample.name] == "max_ms" else sample.value
                out.setdefault(sample.labels["generation"], {})[names[sample.name]] = round(value, 4)
    return out


def lookup_seconds(metrics: str) -> tuple[float, float]:
    """(seconds, calls) of the daemon's Lookups so far, from its edge's latency histogram."""
    found: dict[str, float] = {}
    for family in scrape(metrics):
        for sample in family.samples:
            if sample.labels.get("method") == "KVStore/Lookup" and sample.name in (
                "kvstore_rpc_duration_seconds_sum",
                "kvstore_rpc_duration_seconds_count",
            ):
                found[sample.name] = sample.value
    if len(found) != 2:
        raise BenchError(f"the daemon's metrics at {metrics} have no Lookup latency histogram")
    return found["kvstore_rpc_duration_seconds_sum"], found["kvstore_rpc_duration_seconds_count"]


async def measure_point(
    server: ChildServer,
    open_calls: Calls,
    concurrency: int,
    duration: float,
    warmup: float,
    handler_seconds: Callable[[], tuple[float, float]] | None = None,
) -> dict[str, Any]:
    """`concurrency` tasks, each awaiting one call at a time, on fresh connections (one gRPC
    channel; one lane connection a task): `warmup` seconds untimed, then `duration` seconds
    in which each call that both starts and ends counts. CPU times of the server (all of it,
    and its main thread) and of this process, and `handler_seconds()` (the server's own
    (seconds, calls) in its handler, where it reports them), are sampled at the window's edges."""
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

        def cpu() -> tuple[float, float, float, float]:
            return (
                server.cpu_seconds(),
                self_cpu_seconds(),
                system_busy_seconds(),
                server.main_thread_cpu_seconds(),
            )

        async def handler() -> tuple[float, float]:
            # (a scrape of the daemon's metrics: off this loop, so the workers keep calling)
            return await asyncio.to_thread(handler_seconds) if handler_seconds else (0.0, 0.0)

        async def sample_cpu() -> tuple[
            tuple[float, ...], tuple[float, ...], tuple[float, float], tuple[float, float]
        ]:
            await asyncio.sleep(max(0.0, t_start - clock()))
            before, h0 = cpu(), await handler()
            await asyncio.sleep(max(0.0, t_end - clock()))
            return before, cpu(), h0, await handler()

        sampler = loop.create_task(sample_cpu())
        await asyncio.gather(*(worker(call) for call in calls))
        (s0, c0, b0, m0), (s1, c1, b1, m1), h0, h1 = await sampler
    n = len(latencies)
    latencies.sort()
    timed = {}
    if h1[1] > h0[1]:  # the calls the handler timed meanwhile (the window's, give or take a few)
        timed["handler_us_per_call"] = (h1[0] - h0[0]) / (h1[1] - h0[1]) * 1e6
    return timed | {
        "calls": n,
        "rps": n / duration,
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "server_cpu_us_per_call": (s1 - s0) / max(n, 1) * 1e6,
        "server_loop_cpu_us_per_call": (m1 - m0) / max(n, 1) * 1e6,
        "client_cpu_us_per_call": (c1 - c0) / max(n, 1) * 1e6,
        "server_cpu_util": (s1 - s0) / duration,
        "client_cpu_util": (c1 - c0) / duration,
        # CPU that processes other than the server and this client took meanwhile (0 on a quiet machine).
        "others_cpu_util": max(0.0, (b1 - b0) - (s1 - s0) - (c1 - c0)) / duration,
    }
