"""Hostile requests for every method the daemon lists through gRPC server reflection.

Shared by tests/test_e2e_fuzz.py and `kvstore-bench fuzz`. Nothing here uses our generated
code: services, methods and request types come from reflection, so a method added later is
fuzzed without a hand list. `Fuzzer.fill` builds a request with hostile typed values (huge,
negative and odd ints, NaN, long and odd strings, unknown enum numbers, empty and huge
repeated fields, nested messages); `Fuzzer.garbage` bytes that are not a valid message at all
(random, truncated, bad varints, wrong wire types). `call` sends raw bytes either way and
returns the status the daemon answered: UNKNOWN or INTERNAL (`BAD`) is a daemon bug.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

BAD = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
# Services that answer without a token (docs/security.md): health and reflection.
OPEN_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"})

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
    """Seeded by `rng`; `session_ids`: real sessions (half the session_id fields name one, so
    calls get past the session check); `strings`: names worth trying besides STRINGS (the
    daemon's namespaces)."""

    def __init__(self, rng: random.Random, session_ids: Sequence[int], strings: Sequence[str] = ()) -> None:
        self.rng = rng
        self.session_ids = list(session_ids)
        self.strings = [*STRINGS, *strings]

    def int_value(self, field: FieldDescriptor) -> int:
        lo, hi = INT_RANGES[field.type]
        if field.name == "session_id" and self.session_ids and self.rng.random() < 0.5:
            ids = self.session_ids  # (one: no draw, so a seed makes the same calls as before)
            return ids[0] if len(ids) == 1 else self.rng.choice(ids)
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
            return self.rng.choice(self.strings)
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


def method_path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def call(
    channel: grpc.Channel,
    method: MethodDescriptor,
    payload: bytes,
    *,
    timeout: float = 5.0,
    metadata: Sequence[tuple[str, str]] | None = None,
) -> tuple[grpc.StatusCode, str]:
    """Send `payload` (any bytes) to `method`; (the status it answered, its details). For a
    server stream the first reply (or the error) is the answer judged; the stream is then
    cancelled."""
    ident = lambda b: b  # noqa: E731 (raw bytes both ways)
    kinds = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }
    stub = kinds[(method.client_streaming, method.server_streaming)](
        method_path(method), request_serializer=ident, response_deserializer=ident
    )
    request: Any = iter([payload]) if method.client_streaming else payload
    try:
        reply = stub(request, timeout=timeout, metadata=metadata)
        if method.server_streaming:
            next(reply, None)
            reply.cancel()
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""
