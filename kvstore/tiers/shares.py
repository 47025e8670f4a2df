"""Whose a page below the pool is, for the per-namespace shares of the host and disk tiers
(NamespaceSpec.tier_share; docs/tiers.md, "Shares"): the namespace of its key, a swapped-out
sequence's records (keyed "<namespace>" SWAP_SEPARATOR "swap": kvstore/store/tiering/tiers.py)
counted with their namespace's."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from .record import PageKey

SWAP_SEPARATOR = "\x00"


def owner(key: PageKey) -> str:
    return key.namespace.partition(SWAP_SEPARATOR)[0]


class DiskShares:
    """The disk tier's per-namespace shares: the caps (bytes, or None: no share) the loop sets
    as each namespace begins (Tiers.admit: one dict assignment), read by the writer thread."""

    def __init__(self, index: Any) -> None:
        self.index = index  # the tier's DiskIndex: owned bytes per namespace, under its lock
        self.caps: dict[str, int | None] = {}
        self.evicted: Counter[str] = Counter()  # records evicted because their namespace was at it

    def owned_bytes(self, namespace: str) -> int:
        return self.index.owned.get(namespace, 0)  # (one dict lookup: atomic under the GIL)

    def over(self, costs: Mapping[PageKey, int]) -> dict[str, int]:
        """On the writer's thread, before committing `costs` (key -> bytes): for each namespace
        with a share that they would take past it, by how many bytes. The writer evicts that
        much of the namespace's own records first (DiskIndex.victims(namespace=...))."""
        index = self.index
        incoming: dict[str, int] = {}
        with index.lock:
            for key, cost in costs.items():
                name = owner(key)
                incoming[name] = incoming.get(name, 0) + cost - index.entries.get(key, 0)
            held = {name: index.owned.get(name, 0) for name in incoming}
        out = {}
        for name, n in incoming.items():
            limit = self.caps.get(name)
            if limit is not None and held[name] + n > limit:
                out[name] = held[name] + n - limit
        return out
