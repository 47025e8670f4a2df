"""What bounds one batch call (BatchLookup, BatchReserve, BatchSeal): at most MAX_BATCH_ITEMS
items, and, a batch being one request, server.max_request_tokens bounds the token ids of all
its items together, not each item alone (docs/security.md, "Quotas"). Otherwise a client sends
1,024 items each just under the limit: a thousand times the hashing, index walks and reply
that the quota is there to bound, in one call.

Checked before any item runs, so a refused batch changes nothing: the whole call fails
(INVALID_ARGUMENT for too many items; RESOURCE_EXHAUSTED naming the quota and its limit for
too many tokens, counted with the other quota refusals: Stats.quotas.refused).
"""

from __future__ import annotations

from typing import Any

from kvstore.errors import InvalidArgument, QuotaExceeded
from kvstore.store.types import StoreLimits

MAX_BATCH_ITEMS = 1024  # one batch is one engine step's requests, not a bulk load


def item_tokens(item: Any) -> int:
    """The token ids an item carries (repeated or packed), or for a Reserve the tokens it
    reserves room for (`max_tokens`) if more: what the item alone counts against the quota."""
    n = len(item.token_ids) + len(item.token_ids_u32) // 4
    return max(n, getattr(item, "max_tokens", 0))


def check(method: str, items: Any, limits: StoreLimits | None) -> None:
    """Raise if a batch has too many items, or (given `limits`: the batches that carry token
    ids) if its items carry more than max_request_tokens in all."""
    if len(items) > MAX_BATCH_ITEMS:
        raise InvalidArgument(f"items has {len(items)} entries; a batch takes at most {MAX_BATCH_ITEMS}")
    if limits is None:
        return
    total = sum(item_tokens(item) for item in items)
    if total > limits.max_request_tokens:
        raise QuotaExceeded(
            "max_request_tokens",
            f"{method}: its {len(items)} items carry {total} token ids in all; the quota is "
            f"max_request_tokens={limits.max_request_tokens} for one request, a batch's items "
            "together (split the batch)",
        )
