"""A request's token ids: the repeated `token_ids` or the packed `token_ids_u32` (little-endian
uint32, 4 bytes an id; docs/api.md). The packed form is read in place as an int32 array, so
the store's checks (count, vocabulary) and hashing see the same ids either way, with no
per-id Python work."""

from __future__ import annotations

from typing import Any

import numpy as np

from kvstore.errors import InvalidArgument
from kvstore.store.validate import MAX_TOKEN_ID

_LE_U32 = np.dtype("<u4")
_LE_I32 = np.dtype("<i4")


def request_tokens(request: Any) -> Any:
    """`request.token_ids`, or the packed ids as a read-only little-endian int32 array."""
    packed = request.token_ids_u32
    if not packed:
        return request.token_ids
    if request.token_ids:
        raise InvalidArgument("token_ids and token_ids_u32 are both set: give the token ids in one of them")
    if len(packed) % 4:
        raise InvalidArgument(
            f"token_ids_u32 has {len(packed)} bytes, not a multiple of 4 (little-endian uint32 ids)"
        )
    ids = np.frombuffer(packed, dtype=_LE_U32)
    # Over int32 cannot be an id (the repeated field is int32): say so before the int32 view
    # would show it negative. The vocabulary and max_request_tokens are the store's checks.
    if ids.size and int(ids.max()) > MAX_TOKEN_ID:
        i = int(np.flatnonzero(ids > MAX_TOKEN_ID)[0])
        raise InvalidArgument(
            f"token_ids_u32[{i}]={int(ids[i])} is out of range: token ids must be <= {MAX_TOKEN_ID}"
        )
    return ids.view(_LE_I32)
