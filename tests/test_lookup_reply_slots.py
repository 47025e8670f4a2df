"""A Lookup reply's slots go in as one packed field encoded in C (kvstore/server/convert.py
`with_slots`, kvstore/_chainhash.c `packed_uint32`): the reply's bytes are the ones protobuf
writes for the same slots handed over as a list, whatever their size."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

from kvstore import hashing
from kvstore.server import convert

FIELDS = {"hit_tokens": 64, "block_hashes": b"h" * 32, "pin_id": 7, "ready_pages": 2, "pool_epoch": 3}
EDGES = [0, 1, 127, 128, 16383, 16384, 2**21 - 1, 2**21, 2**28 - 1, 2**28, 2**32 - 1]


@settings(max_examples=200, deadline=None, derandomize=True)
@given(slots=st.lists(st.one_of(st.sampled_from(EDGES), st.integers(0, 2**32 - 1)), max_size=300))
def test_the_reply_is_what_protobuf_writes_for_the_list(slots: list[int]) -> None:
    got = convert.with_slots(pb.LookupResponse(**FIELDS), slots)
    assert got.SerializeToString() == pb.LookupResponse(slots=slots, **FIELDS).SerializeToString()
    assert list(got.slots) == slots


@pytest.mark.skipif(not hashing.NATIVE, reason="the C module is not built (make native)")
def test_packed_uint32_refuses_what_is_not_a_uint32() -> None:
    from kvstore._chainhash import packed_uint32

    for bad in (2**32, -1):
        with pytest.raises(ValueError, match=r"ints\[1\] is not a uint32"):
            packed_uint32(4, [1, bad])
    with pytest.raises(ValueError, match="not a field number"):
        packed_uint32(0, [1])
    assert packed_uint32(4, [300]) == b"\x22\x02\xac\x02"  # tag 4/LEN, length 2, varint 300
