"""A black-box fuzzer of the daemon's wire, driven by server reflection.

Every service and method, and every request's message type, is discovered through gRPC
server reflection (no hand list, none of our generated code): each method gets hostile typed
values (huge, negative and odd ints, NaN, long and odd strings, unknown enum numbers, empty
and huge repeated fields, nested messages) and garbage bytes (random, truncated, bad varints,
wrong wire types). The answer must never be UNKNOWN or INTERNAL; afterwards the daemon is
SERVING, counted no internal error, and the pages process A stored read back unchanged
(bytes, through A's own mapping and through /dev/shm). Seeded: the same calls every run;
KVSTORE_FUZZ_SEED and KVSTORE_FUZZ_TYPED (calls a method, 40) to hunt further.
"""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from daemon import SERVING, SMALL_NAMESPACE, DaemonProcess
from e2e_helpers import Raw, Worker, page_content_bytes, page_tokens_of, prompt, shm_read_page
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

SEED = int(os.environ.get("KVSTORE_FUZZ_SEED", 14))
TYPED_PER_METHOD = int(os.environ.get("KVSTORE_FUZZ_TYPED", 40))  # per method; more to hunt
GARBAGE_PER_METHOD = 12
CALL_TIMEOUT_S = 5.0
HELD = prompt(24, seed=141, vocab=1000)
BAD = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)

INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
STRINGS = ["", "test", "nope", "a" * 16384, "\x00", "é" * 300, "../../etc/passwd", "%s%n{}", "test\n", " "]
FLOATS = [0.0, -1.0, math.nan, math.inf, -math.inf, 1e308, 5e-324, 3.4e38]


class Fuzzer:
    def __init__(self, rng: random.Random, session_id: int) -> None:
        self.rng = rng
        self.session_id = session_id  # a real session, so calls get past the session check

    def int_value(self, field: FieldDescriptor) -> int:
        lo, hi = INT_RANGES[field.type]
        if field.name == "session_id" and self.rng.random() < 0.5:
            return self.session_id
        edges = [0, 1, 2, 3, 4, 7, 64, 65, 255, 4096, hi, hi - 1, lo, lo + 1, 2**31 - 1, -1, -(2**31)]
        value = self.rng.choice([*edges, self.rng.randint(lo, hi), self.rng.randint(0, 100)])
        return min(max(value, lo), hi)

    def scalar(self, field: FieldDescriptor) -> Any:
        t = field.type
        if t in INT_RANGES:
            return self.int_value(field)
        if t == FieldDescriptor.TYPE_BOOL:
            return self.rng.random() < 0.5
        if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return self.rng.choice(FLOATS)
        if t == FieldDescriptor.TYPE_STRING:
            return self.rng.choice(STRINGS)
        if t == FieldDescriptor.TYPE_BYTES:
            return self.rng.choice([b"", b"\x00" * 16, self.rng.randbytes(16), self.rng.randbytes(70_000)])
        if t == FieldDescriptor.TYPE_ENUM:
            known = [v.number for v in field.enum_type.values]
            return self.rng.choice([*known, -1, 99, 2**31 - 1, -(2**31)])  # open enums keep unknowns
        raise AssertionError(f"unhandled field type {t} of {field.full_name}")

    def fill(self, msg: Any, depth: int = 0) -> Any:
        oneofs_set: set[str] = set()
        for field in msg.DESCRIPTOR.fields:
            oneof = field.containing_oneof
            if oneof is not None:
                if oneof.name in oneofs_set or self.rng.random() < 0.4:
                    continue
                oneofs_set.add(oneof.name)
            elif self.rng.random() < 0.25:
                continue  # left unset
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                if depth >= 3:
                    continue
                if field.is_repeated:
                    for _ in range(self.rng.choice([0, 1, 3])):
                        self.fill(getattr(msg, field.name).add(), depth + 1)
                else:
                    self.fill(getattr(msg, field.name), depth + 1)
                    getattr(msg, field.name).SetInParent()
            elif field.is_repeated:
                n = self.rng.choice([0, 1, 5, 300, 50_000])
                first = self.scalar(field)
                values = [first] * n if n > 300 else [self.scalar(field) for _ in range(n)]
                getattr(msg, field.name).extend(values)
            else:
                setattr(msg, field.name, self.scalar(field))
        return msg

    def garbage(self, valid: bytes) -> bytes:
        r = self.rng
        return r.choice(
            [
                r.randbytes(r.randint(1, 64)),
                valid[: max(1, len(valid) // 2)] + b"\xff",  # truncated, then a dangling byte
                b"\x08" + b"\xff" * 11,  # a varint longer than 10 bytes
                b"\x0a\xff\xff\xff\xff\x0f",  # a length far past the end
                b"\x0b" * 20,  # start-group tags with no end
                b"\x12\x04\xff\xfe\xfd\xfc",  # field 2 as bytes that are not UTF-8 (a string field)
                b"\x0d\x00",  # a fixed32 cut short
                b"\x78" + b"\x01" * 5,  # field 15, varint, then more junk
                bytes([0x0A, 0x7F]) + b"\x00" * 3,
                b"\x00",  # field number 0
            ]
        )


def discover(channel: grpc.Channel) -> list[tuple[MethodDescriptor, Any]]:
    """Every method of every service the daemon lists, with its request class."""
    db = ProtoReflectionDescriptorDatabase(channel)
    pool = descriptor_pool.DescriptorPool(db)
    methods = []
    for name in sorted(db.get_services()):
        for method in pool.FindServiceByName(name).methods:
            methods.append((method, message_factory.GetMessageClass(method.input_type)))
    return methods


def call(channel: grpc.Channel, method: MethodDescriptor, payload: bytes) -> grpc.StatusCode:
    path = f"/{method.containing_service.full_name}/{method.name}"
    ident = lambda b: b  # noqa: E731 (raw bytes both ways)
    kinds = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }
    stub = kinds[(method.client_streaming, method.server_streaming)](
        path, request_serializer=ident, response_deserializer=ident
    )
    request: Any = iter([payload]) if method.client_streaming else payload
    try:
        reply = stub(request, timeout=CALL_TIMEOUT_S)
        if method.server_streaming:  # the first reply (or the error) is the answer to judge
            next(reply, None)
            reply.cancel()
    except grpc.RpcError as e:
        if e.code() in BAD:
            raise AssertionError(f"{path} answered {e.code().name}: {e.details()}") from None
        return e.code()
    return grpc.StatusCode.OK


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
        fuzz = Fuzzer(rng, session_id)
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
            assert shm_read_page(pool, slot) == page_content_bytes(i, tokens, pool.page_shape), f"page {i}"
        stats = raw.kv.Stats(pb.StatsRequest(), timeout=5)
    assert stats.internal_errors == 0
    assert stats.malformed_requests > 0
