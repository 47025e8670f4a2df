"""A request's token ids: the repeated `token_ids` or the packed `token_ids_u32` (little-endian
uint32, 4 bytes an id; docs/api.md). The packed form is read in place as an array, so the
store's checks (count, range, vocabulary) and hashing see the same ids either way, with no
per-id Python work."""

from __future__ import annotations

from typing import Any

import numpy as np

from kvstore.errors import InvalidArgument

_LE_U32 = np.dtype("<u4")


def request_tokens(request: Any) -> Any:
    """`request.token_ids`, or the packed ids as a read-only little-endian uint32 array."""
    packed = request.token_ids_u32
    if not packed:
        return request.token_ids
    if request.token_ids:
        raise InvalidArgument("token_ids and token_ids_u32 are both set: give the token ids in one of them")
    if len(packed) % 4:
        raise InvalidArgument(
            f"token_ids_u32 has {len(packed)} bytes, not a multiple of 4 (little-endian uint32 ids)"
        )
    # As uint32: the store's one range check (validate.token_array) then names a too-big id by
    # its value, and views the bytes as int32 once they are all in range.
    return np.frombuffer(packed, dtype=_LE_U32)
