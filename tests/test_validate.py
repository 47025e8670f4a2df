"""kvstore/store/validate.py `token_array` on what reaches it: a request's repeated int32 (the
RPCs) and plain lists or arrays (in-process callers), at the edges of the int32 range."""

from __future__ import annotations

import re

import numpy as np
import pytest
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

from kvstore.errors import InvalidArgument, QuotaExceeded
from kvstore.store import validate
from kvstore.store.types import StoreLimits
from kvstore.store.validate import MAX_TOKEN_ID, PackedIds, token_array, token_bytes

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


def packed(values: list[int]) -> PackedIds:
    """A request's token_ids_u32, as kvstore/server/tokens.py hands it on."""
    return PackedIds(np.asarray(values, dtype="<u4").tobytes())


@pytest.mark.parametrize(
    ("values", "vocab", "message"),
    [
        ([5, 2**32 - 1, 3], 0, f"token_ids[1]={2**32 - 1} is out of range: token ids must be >= 0 and <= {MAX_TOKEN_ID}"),
        ([1, 2**31, 1], 0, f"token_ids[1]={2**31} is out of range"),
        ([0, 999, 1000, 5000], 1000, "token_ids[2]=1000 is out of range: token ids must be >= 0 and < vocab_size=1000 (2 bad ids in all)"),
        ([1000] + [1] * 4095, 1000, "token_ids[0]=1000 is out of range"),
        ([1] * 4095 + [1000], 1000, "token_ids[4095]=1000 is out of range"),
    ],
)  # fmt: skip
def test_a_packed_id_out_of_range_is_named_by_its_value(values: list[int], vocab: int, message: str) -> None:
    for check in (token_array, token_bytes):
        with pytest.raises(InvalidArgument, match=re.escape(message)):
            check(packed(values), field="token_ids", vocab_size=vocab, limits=LIMITS)


@pytest.mark.parametrize("vocab", [0, 1000])
def test_packed_ids_in_range_are_read_in_place_not_copied(vocab: int) -> None:
    top = vocab - 1 if vocab else MAX_TOKEN_ID
    given = packed([0, top, 7, top])
    arr = token_array(given, field="token_ids", vocab_size=vocab, limits=LIMITS)
    assert arr.dtype == np.dtype("<i4") and arr.tolist() == [0, top, 7, top]
    assert np.shares_memory(arr, np.frombuffer(given.data, dtype=np.uint8))
    data = token_bytes(given, field="token_ids", vocab_size=vocab, limits=LIMITS)
    assert data == arr.tobytes() and (data is given.data or not validate.first_over)


def test_packed_ids_over_the_quota_are_refused_before_their_range_is_read() -> None:
    small = StoreLimits(max_request_tokens=3)
    for check in (token_array, token_bytes):
        with pytest.raises(
            QuotaExceeded, match=re.escape("token_ids has 4 ids; the quota is max_request_tokens=3")
        ):
            check(packed([1, 2, 3, 2**32 - 1]), field="token_ids", vocab_size=0, limits=small)


def test_every_form_gives_the_same_bytes() -> None:
    values = [3, 0, 1000, 7]
    want = np.asarray(values, dtype="<i4").tobytes()
    for given in [*ids(values), packed(values)]:
        assert token_bytes(given, field="token_ids", vocab_size=1001, limits=LIMITS) == want


def test_the_native_range_check_agrees_with_numpy() -> None:
    first_over = pytest.importorskip("kvstore._chainhash").first_over  # (built by CI: setup.py)
    rng = np.random.default_rng(0)
    for n in (0, 1, 3, 64, 1024):
        for top in (0, 999, 2**31 - 1, 2**32 - 1):
            ids = rng.integers(0, 2**32, size=n, dtype=np.uint64).astype("<u4")
            ids[: n // 2] = ids[: n // 2] % np.uint64(
                top + 1
            )  # (a prefix in range: the first bad id is not always 0)
            bad = np.flatnonzero(ids > top)
            assert first_over(ids, top) == (int(bad[0]) if bad.size else -1)
            assert first_over(ids.tobytes(), top) == first_over(ids, top)
    with pytest.raises(ValueError, match="multiple of 4"):
        first_over(b"\x01\x02\x03", 5)
