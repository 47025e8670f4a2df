"""kvstore/store/validate.py `token_array` on what reaches it: a request's repeated int32 (the
RPCs) and plain lists or arrays (in-process callers), at the edges of the int32 range."""

from __future__ import annotations

import re

import numpy as np
import pytest
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

from kvstore.errors import InvalidArgument
from kvstore.store.types import StoreLimits
from kvstore.store.validate import MAX_TOKEN_ID, token_array

LIMITS = StoreLimits()


def ids(values: list[int]) -> list:
    """The same ids as each kind of input."""
    return [values, pb.LookupRequest(token_ids=values).token_ids, np.array(values, dtype=np.int32)]


@pytest.mark.parametrize("vocab", [0, 1000])
def test_valid_ids_come_back_as_little_endian_int32(vocab: int) -> None:
    top = vocab - 1 if vocab else MAX_TOKEN_ID
    for given in ids([0, 7, top]):
        arr = token_array(given, field="token_ids", vocab_size=vocab, limits=LIMITS)
        assert arr.dtype == np.dtype("<i4") and arr.tolist() == [0, 7, top]


@pytest.mark.parametrize(
    ("values", "vocab", "message"),
    [
        ([5, -1, 3], 0, "token_ids[1]=-1 is out of range"),
        ([-(2**31), 1], 0, f"token_ids[0]={-(2**31)} is out of range"),
        (
            [1, 2, 1000, -4],
            1000,
            "token_ids[2]=1000 is out of range: token ids must be >= 0 and < vocab_size=1000 (2 bad ids in all)",
        ),
    ],
)
def test_an_id_out_of_range_is_named_whatever_the_input(values: list[int], vocab: int, message: str) -> None:
    for given in ids(values):
        with pytest.raises(InvalidArgument, match=re.escape(message)):
            token_array(given, field="token_ids", vocab_size=vocab, limits=LIMITS)


def test_what_is_not_an_int32_id_is_refused() -> None:
    for given in ([2**31], [2**70], ["a"]):
        with pytest.raises(InvalidArgument, match="token_ids"):
            token_array(given, field="token_ids", vocab_size=0, limits=LIMITS)
