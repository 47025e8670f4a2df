"""`kvstore-bench rpc`'s lane sides: kvstore_lane (the same Lookup over the daemon's lane, from
the benchmark's asyncio client) and echo_lane (a bare lane echo in its own process) run next to
the gRPC sides at tiny durations, report sane numbers and their keys, and a lane Lookup gets
the very answer the gRPC one gets."""

from __future__ import annotations

import json
import os
import random
import socket
import tempfile

import grpc
import numpy as np
import pytest
import uvloop
from kvstore_bench import rpc, rpc_lane
from kvstore_bench.cli import main
from kvstore_bench.harness import BenchDaemon
from kvstore_proto import lane as wire
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb
from kvstore_proto.kvstore.v1 import kvstore_pb2_grpc as pb_grpc


def test_tiny_run_reports_the_lane_sides_next_to_the_grpc_ones(capsys):
    argv = ["rpc", "--json", "--duration", "0.1", "--warmup", "0", "--rounds", "2", "--concurrency", "1,16"]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)

    assert set(r["results"]) == {
        *("kvstore", "echo", "echo_same_grpc", "echo_raw", "kvstore_lane", "echo_lane", "kvstore_aio")
    }
    for side, by_c in r["results"].items():
        for c in ("1", "16"):
            e = by_c[c]
            assert e["calls"] > 0 and e["rps"] > 0, (side, c)
            assert 0 < e["p50_ms"] <= e["p99_ms"] < 1000, (side, c)
            assert e["server_cpu_us_per_call"] > 0 and e["client_cpu_us_per_call"] > 0, (side, c)
            # (both from /proc at 10 ms ticks, read a moment apart: at 0.1 s a point one may pass the other)
            assert e["server_loop_cpu_us_per_call"] >= 0, (side, c)
            assert len(e["rps_rounds"]) == 2
            # Only the daemon's gRPC Lookup is timed by its edge: neither echo nor the lane is.
            assert ("handler_us_per_call" in e) == (side == "kvstore"), (side, c)
    res = r["results"]
    # The ratio keeps its meaning; the lane's are against the same run's baselines.
    assert r["ratio"] == pytest.approx(res["kvstore"]["16"]["rps"] / res["echo"]["16"]["rps"], rel=1e-3)
    # And against an echo on the daemon's gRPC configuration (server.grpc_experiments).
    assert r["ratio_same_grpc"] == pytest.approx(
        res["kvstore"]["16"]["rps"] / res["echo_same_grpc"]["16"]["rps"], rel=1e-3
    )
    assert r["config"]["daemon_grpc_experiments"] == os.environ.get(
        "GRPC_EXPERIMENTS", "-event_engine_listener"
    )
    assert r["lane_ratio"] == pytest.approx(
        res["kvstore_lane"]["16"]["rps"] / res["echo"]["16"]["rps"], rel=1e-3
    )
    assert r["lane_floor_ratio"] == pytest.approx(
        res["kvstore_lane"]["16"]["rps"] / res["echo_lane"]["16"]["rps"], rel=1e-3
    )
    assert r["lane_p99_ms_c1"] == res["kvstore_lane"]["1"]["p99_ms"]
    assert len(r["lane_ratio_rounds"]) == len(r["lane_floor_ratio_rounds"]) == 2
    # The library's asyncio lane client (kvstore_client.aio_lane), against the same echo.
    assert r["aio_lane_ratio"] == pytest.approx(
        res["kvstore_aio"]["16"]["rps"] / res["echo"]["16"]["rps"], rel=1e-3
    )
    assert r["aio_lane_p99_ms_c1"] == res["kvstore_aio"]["1"]["p99_ms"]
    # The Lookup's own time in the daemon: more than nothing, less than the whole call.
    for c in ("1", "16"):
        assert 0 < r[f"handler_us_c{c}"] < res["kvstore"][c]["p50_ms"] * 1000
        assert r[f"loop_us_c{c}"]["echo"] == res["echo"][c]["server_loop_cpu_us_per_call"]
    # The daemon's GC over the run, by generation (the young one collects every few hundred calls).
    assert set(r["daemon_gc"]) == {"0", "1", "2"} and r["daemon_gc"]["0"]["pauses"] > 0
    assert r["config"]["pool_pages"] == 4 * rpc.PROMPT_PAGES
    text = rpc.format_text(r)
    for line in (
        "kvstore_lane",
        "echo_lane",
        "lane_ratio = ",
        "lane_floor_ratio = ",
        "lane p99 at concurrency 1",
        "kvstore_aio",
        "aio_lane_ratio = ",
        "ratio_same_grpc = ",
        "the daemon's Lookup handler, timed in place",
        "the daemon's GC, generation 2:",
    ):
        assert line in text


def test_a_lane_lookup_in_the_bench_gets_what_the_grpc_one_gets():
    tokens = random.Random(1).choices(range(rpc.VOCAB), k=rpc.PROMPT_PAGES * rpc.PAGE_TOKENS)
    with BenchDaemon([rpc.namespace()], server={"lease_ttl_max_s": 60}) as daemon:
        rpc.prepare(daemon.target, tokens)
        with grpc.insecure_channel(daemon.target) as ch:
            stub = pb_grpc.KVStoreStub(ch)
            sid = stub.OpenSession(pb.OpenSessionRequest(client_name="t", lease_ttl_ms=60_000)).session_id
            request = pb.LookupRequest(
                session_id=sid, namespace=rpc.NAMESPACE, token_ids_u32=np.asarray(tokens, "<u4").tobytes()
            )
            over_grpc = stub.Lookup(request)
            over_lane = uvloop.run(rpc_lane.lookup(rpc_lane.daemon_lane_path(daemon), request))
            half = pb.LookupRequest(
                session_id=sid, namespace=rpc.NAMESPACE, token_ids=tokens[: 32 * rpc.PAGE_TOKENS]
            )
            half_lane = uvloop.run(rpc_lane.lookup(rpc_lane.daemon_lane_path(daemon), half))
    assert over_grpc.hit_tokens == over_lane.hit_tokens == len(tokens)
    assert len(over_lane.slots) == rpc.PROMPT_PAGES
    assert list(over_lane.slots) == list(over_grpc.slots)
    assert over_lane.block_hashes == over_grpc.block_hashes
    assert (
        half_lane.hit_tokens == 32 * rpc.PAGE_TOKENS and list(half_lane.slots) == list(over_grpc.slots)[:32]
    )


def test_the_lane_echo_answers_the_canned_reply_after_a_hello_and_refuses_anything_else():
    canned = b"\x08\x80\x08 a captured LookupResponse"
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(canned)
        f.flush()
        with rpc_lane.LaneChild("echo_lane", f.name) as echo:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(echo.lane_path)
                s.sendall(wire.hello("") + wire.request(b"Lookup", b"whatever"))
                got = _frames(s, 2)
            assert got == [bytes([0]) + wire.SERVER_HELLO, bytes([0]) + canned]
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(echo.lane_path)
                s.sendall(wire.request(b"Lookup", b"no hello first"))
                (refused,) = _frames(s, 1)
                assert refused[0] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
                assert s.recv(1) == b""  # and the connection closed


def _frames(s: socket.socket, n: int) -> list[bytes]:
    s.settimeout(10)
    buf, out = bytearray(), []
    while len(out) < n:
        buf += s.recv(65536)
        while (body := wire.split(buf)) is not None:
            out.append(body)
    return out
