"""A request's token ids: the repeated `token_ids` or the packed `token_ids_u32` (little-endian
uint32, 4 bytes an id; docs/api.md). The packed form is handed on as its bytes
(`PackedIds`): the store's checks (count, range, vocabulary) read them in place, and once
they are in range they are the bytes hashing takes, with no per-id Python work and no copy."""

from __future__ import annotations

from typing import Any

from kvstore.errors import InvalidArgument
from kvstore.store.validate import PackedIds


def request_tokens(request: Any) -> Any:
    """`request.token_ids`, or the packed ids as a `PackedIds` (kvstore/store/validate.py)."""
    packed = request.token_ids_u32
    if not packed:
        return request.token_ids
    if request.token_ids:
        raise InvalidArgument("token_ids and token_ids_u32 are both set: give the token ids in one of them")
    if len(packed) % 4:
        raise InvalidArgument(
            f"token_ids_u32 has {len(packed)} bytes, not a multiple of 4 (little-endian uint32 ids)"
        )
    # As they came: the store's one range check (validate.token_bytes) names a too-big id by
    # its value, and hashes these bytes once they are all in range.
    return PackedIds(packed)
