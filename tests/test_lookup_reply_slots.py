"""A Lookup reply is encoded in C and parsed by protobuf's C code (kvstore/server/convert.py
`lookup_response`, kvstore/_replyenc.c `encode_fields`): the message is the one protobuf
builds from the same fields as keyword arguments, whatever their values and sizes, and the
bytes the Lookup RPC sends (`lookup_reply_bytes`) are protobuf's serialization of it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

from kvstore import hashing
from kvstore.server import convert

EDGES = [0, 1, 127, 128, 16383, 16384, 2**21 - 1, 2**21, 2**28 - 1, 2**28, 2**32 - 1]


def u(bits: int) -> st.SearchStrategy[int]:
    return st.one_of(
        st.sampled_from([e for e in EDGES if e < 2**bits] + [2**bits - 1]), st.integers(0, 2**bits - 1)
    )


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    hit=u(32),
    hashes=st.lists(st.binary(min_size=16, max_size=16), max_size=40),
    pin_id=u(64),
    ready=u(32),
    epoch=u(64),
    ttl=st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, 1, -1, 5000])),
    deadline=u(64),
    slots=st.lists(u(32), max_size=300),
)
def test_the_reply_is_what_protobuf_builds(hit, hashes, pin_id, ready, epoch, ttl, deadline, slots) -> None:
    got = convert.lookup_response(hit, pin_id, slots, hashes, ready, epoch, ttl, deadline)
    want = pb.LookupResponse(
        hit_tokens=hit, block_hashes=b"".join(hashes), pin_id=pin_id, ready_pages=ready, pool_epoch=epoch,
        pin_ttl_ms=ttl, pin_deadline_ns=deadline, slots=slots,
    )  # fmt: skip
    assert got == want
    assert got.SerializeToString() == want.SerializeToString()
    # The Lookup RPC's reply as sent (no message built): protobuf's own bytes for it.
    fields = (hit, pin_id, slots, hashes, ready, epoch, ttl, deadline)
    assert convert.lookup_reply_bytes(*fields) == want.SerializeToString()
    assert convert._lookup_reply_bytes_py(*fields) == want.SerializeToString()  # (no C module)


@pytest.mark.skipif(not hashing.NATIVE, reason="the C module is not built (make native)")
def test_encode_fields_refuses_what_its_field_cannot_hold() -> None:
    from kvstore._chainhash import encode_fields

    layout = ((1, 0), (4, 5))  # uint32, packed uint32
    for bad in ((2**32, []), (-1, []), (1, [1, 2**32]), (1, [-1])):
        with pytest.raises(ValueError, match="out of its field's range"):
            encode_fields(layout, *bad)
    with pytest.raises(TypeError, match="a value for each field"):
        encode_fields(layout, 1)
    with pytest.raises(TypeError, match="not an int"):
        encode_fields(layout, "1", [])
    with pytest.raises(TypeError, match="not bytes"):
        encode_fields(((5, 4),), [b"ab", "cd"])
    with pytest.raises(ValueError, match=r"not a \(field number, kind\)"):
        encode_fields(((0, 0),), 1)
    assert encode_fields(layout, 0, []) == b""  # proto3: zeros and empties are left out
    assert encode_fields(((4, 5),), [300]) == b"\x22\x02\xac\x02"  # tag 4/LEN, length 2, varint 300
    assert encode_fields(((7, 3),), 1) == b"\x39" + (1).to_bytes(8, "little")  # fixed64
    assert encode_fields(((8, 2),), -1) == b"\x40" + b"\xff" * 9 + b"\x01"  # int64: ten bytes
