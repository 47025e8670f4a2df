"""A Lookup request read in one C pass (kvstore/server/request_scan.py, kvstore/_reqscan.c)
is the message protobuf parses from the same bytes, field for field; bytes the scan does not
take are parsed by protobuf as before (the same message, the same INVALID_ARGUMENT), on
generated requests and on damaged, reordered, repeated and unknown-field bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

from kvstore.server import edge, request_scan

pytestmark = pytest.mark.skipif(
    request_scan.scan_fields is None, reason="the C module is not built (make native)"
)

NAMES = [f.name for f in pb.LookupRequest.DESCRIPTOR.fields]
new_parse = edge._guarded(pb.LookupRequest.FromString, scanned=True)
old_parse = edge._guarded(pb.LookupRequest.FromString)  # protobuf, the edge's checks


def u(bits: int) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([0, 1, 127, 128, 2**bits - 1]), st.integers(0, 2**bits - 1))


text = st.one_of(st.text(max_size=12), st.text(min_size=250, max_size=300), st.just("é" * 200))
requests = st.builds(
    pb.LookupRequest,
    session_id=u(64),
    namespace=text,
    token_ids=st.one_of(st.just([]), st.lists(st.integers(-(2**31), 2**31 - 1), max_size=5)),
    extra_keys=st.binary(max_size=300),
    pin=st.booleans(),
    model_fingerprint=text,
    return_in_flight=st.booleans(),
    pin_ttl_ms=st.integers(-(2**63), 2**63 - 1),
    release_pin_ids=st.lists(u(64), max_size=5),
    token_ids_u32=st.binary(max_size=64),
)


def same(data: bytes) -> bool:
    """Whether the scan took `data`; asserts the edge answers what protobuf's path answers."""
    old, new = old_parse(data), new_parse(data)
    if isinstance(old, edge.Malformed) or isinstance(new, edge.Malformed):
        assert new == old
        return False
    if isinstance(new, pb.LookupRequest):
        assert new == old
        return False
    for name in NAMES:
        want, got = getattr(old, name), getattr(new, name)
        if isinstance(want, int | str | bytes):  # (bool is an int)
            assert type(got) is type(want) and got == want, name
        else:  # a repeated field: a tuple of the same values
            assert type(got) is tuple and list(got) == list(want), name
    return True


@settings(max_examples=400, deadline=None, derandomize=True)
@given(request=requests, cut=st.integers(0, 2000), flip=st.integers(0, 2000), byte=st.integers(0, 255))
def test_the_scan_reads_what_protobuf_parses(
    request: pb.LookupRequest, cut: int, flip: int, byte: int
) -> None:
    data = request.SerializeToString()
    took = same(data)
    usual = (
        not request.token_ids
        and len(request.namespace.encode()) <= 256
        and (len(request.model_fingerprint.encode()) <= 256)
    )
    assert took == usual  # (it takes what clients send, and only that)
    same(data[: cut % (len(data) + 1)])  # cut short
    if data:
        damaged = bytearray(data)
        damaged[flip % len(data)] = byte
        same(bytes(damaged))
    same(data + data)  # every field twice
    same(data + b"\x98\x06\x01")  # an unknown field (99, varint)
    same(b"\x08\x05" + data)  # session_id twice when the message has one


def test_the_wire_forms_it_leaves_to_protobuf() -> None:
    base = pb.LookupRequest(session_id=3, namespace="t", token_ids_u32=b"\x01\x00\x00\x00")
    data = base.SerializeToString()
    assert same(data)
    unpacked = data + b"\x48\x07\x48\x09"  # release_pin_ids 7 and 9, one varint each (not packed)
    assert not same(unpacked) and old_parse(unpacked).release_pin_ids == [7, 9]
    assert same(data + b"\x4a\x02\x07\x09")  # the same ids packed
    assert not same(b"\x12\x02\xc3\x28" + data)  # a namespace that is not UTF-8: protobuf's refusal
    assert isinstance(new_parse(b"\x12\x02\xc3\x28"), edge.Malformed)
    over = pb.LookupRequest(namespace="n" * 257).SerializeToString()
    assert not same(over)
    assert "namespace has 257 characters" in new_parse(over).message
    assert not same(b"\x08" + b"\xff" * 10 + b"\x01")  # a varint past 64 bits
    assert not same(b"\x0a\x01\x00")  # session_id as bytes (another wire type)
    assert same(b"")  # every field absent: the defaults
    assert new_parse(b"").token_ids_u32 == b"" and new_parse(b"").release_pin_ids == ()
