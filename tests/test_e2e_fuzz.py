"""A black-box fuzzer of the daemon's wire, driven by server reflection.

Every service and method, and every request's message type, is discovered through gRPC
server reflection (no hand list, none of our generated code): each method gets hostile typed
values (huge, negative and odd ints, NaN, long and odd strings, unknown enum numbers, empty
and huge repeated fields, nested messages) and garbage bytes (random, truncated, bad varints,
wrong wire types). The answer must never be UNKNOWN or INTERNAL; afterwards the daemon is
SERVING, counted no internal error, and the pages process A stored read back unchanged
(bytes, through A's own mapping and through a descriptor from the pool socket). Seeded: the same calls every run;
KVSTORE_FUZZ_SEED and KVSTORE_FUZZ_TYPED (calls a method, 40) to hunt further. The generator
is kvstore_bench.fuzz_gen, shared with `kvstore-bench fuzz` (the same at 100,000 requests).
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from daemon import SERVING, SMALL_NAMESPACE, DaemonProcess
from e2e_helpers import Raw, Worker, page_content_bytes, page_tokens_of, prompt
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from kvstore_bench.fuzz_gen import BAD, Fuzzer, discover, method_path
from kvstore_bench.fuzz_gen import call as raw_call
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

SEED = int(os.environ.get("KVSTORE_FUZZ_SEED", 14))
TYPED_PER_METHOD = int(os.environ.get("KVSTORE_FUZZ_TYPED", 40))  # per method; more to hunt
GARBAGE_PER_METHOD = 12
CALL_TIMEOUT_S = 5.0
HELD = prompt(24, seed=141, vocab=1000)


def call(channel: grpc.Channel, method: MethodDescriptor, payload: bytes) -> grpc.StatusCode:
    code, details = raw_call(channel, method, payload, timeout=CALL_TIMEOUT_S)
    if code in BAD:
        raise AssertionError(f"{method_path(method)} answered {code.name}: {details}")
    return code


@pytest.fixture
def stored(tmp_path: Path) -> Iterator[tuple[DaemonProcess, Worker, list[int]]]:
    server = {
        "max_pool_bytes": 16 << 20,
        "max_request_tokens": 4096,
        "host_tier_bytes": 1 << 20,
        "disk_tier_dir": str(tmp_path / "disk"),
        "disk_tier_bytes": 64 << 20,
    }
    with DaemonProcess(server=server, namespaces=[SMALL_NAMESPACE]) as d:
        d.start()
        with Worker("A") as a:
            a.call("connect", target=d.target, client_name="A")
            held = a.call("write_prompt", namespace="test", tokens=HELD)
            yield d, a, held["slots"]


def test_fuzz_every_method_found_by_reflection(stored: tuple[DaemonProcess, Worker, list[int]]) -> None:
    daemon, a, slots = stored
    rng = random.Random(SEED)
    seen: Counter[str] = Counter()
    with grpc.insecure_channel(daemon.target) as channel:
        methods = discover(channel)
        names = {f"{m.containing_service.full_name}/{m.name}" for m, _ in methods}
        assert {
            "kvstore.v1.KVStore/Lookup",
            "kvstore.v1.Admin/CreateNamespace",
            "grpc.health.v1.Health/Check",
        } <= names
        open_method, open_request = next((m, cls) for m, cls in methods if m.name == "OpenSession")
        opened = channel.unary_unary(f"/{open_method.containing_service.full_name}/OpenSession")(
            open_request(client_name="fuzzer").SerializeToString(), timeout=5
        )
        session_id = message_factory.GetMessageClass(open_method.output_type).FromString(opened).session_id
        fuzz = Fuzzer(rng, [session_id])
        for method, request_cls in methods:
            for _ in range(TYPED_PER_METHOD):
                payload = fuzz.fill(request_cls()).SerializeToString()
                seen[call(channel, method, payload).name] += 1
            valid = fuzz.fill(request_cls()).SerializeToString()
            for _ in range(GARBAGE_PER_METHOD):
                seen[call(channel, method, fuzz.garbage(valid)).name] += 1

    assert seen["INVALID_ARGUMENT"] > 0 and seen["OK"] > 0, seen
    assert daemon.proc.poll() is None, daemon.stderr_text()
    assert daemon.health() == SERVING
    assert "Traceback" not in daemon.stderr_text()
    # A's pages: the same bytes through A's mapping and in the daemon's segment.
    assert a.call("verify", namespace="test", tokens=HELD, slots=slots)["mismatched"] == []
    with Raw(daemon.target) as raw:
        pool = raw.pool("test")
        for i, slot in enumerate(slots):
            tokens = page_tokens_of(HELD, i, SMALL_NAMESPACE["page_tokens"])
            assert raw.read_page("test", slot) == page_content_bytes(i, tokens, pool.page_shape), f"page {i}"
        stats = raw.kv.Stats(pb.StatsRequest(), timeout=5)
    assert stats.internal_errors == 0
    assert stats.malformed_requests > 0
