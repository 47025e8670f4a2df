"""A namespace's share of the tiers below the pools (NamespaceSpec.tier_share; docs/tiers.md,
"Shares"; docs/security.md). The host and disk tiers serve every namespace, so without a
share one tenant's demotions fill them and push every other tenant's pages out. With
`tier_share` = f (0 < f <= 1), the namespace's pages hold at most f of each tier's capacity:
a page of a namespace at its share goes in only after the namespace's own least recently used
pages there move down (host -> disk) or out, never another namespace's. 0 = no share (the
tier's LRU / policy alone decides, as before).

Host tier: here, on the loop, before a demotion (or a swap-out) takes a slot. Disk tier: on
the disk writer's thread, before it commits a batch (kvstore/tiers/shares.py `DiskShares.over`,
with the caps Tiers.admit hands the disk tier as each namespace begins).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvstore.tiers import HostTier, PageKey
from kvstore.tiers.host import slot_size

if TYPE_CHECKING:
    from kvstore.store.namespace import Namespace


def cap(share: float, capacity_bytes: int) -> int | None:
    """The bytes a share of a tier is; None for no share."""
    return int(share * capacity_bytes) if share > 0 else None


def host_room(
    host: HostTier,
    ns: Namespace,
    page_bytes: int,
    move_down: Callable[[list[PageKey]], None],
    moved: Counter[str],
) -> bool:
    """Make room within `ns`'s share of the host tier for one more page of `page_bytes` by
    moving its own least recently used pages down; False if there can be none (the page is
    larger than the share, or what fills it is its swapped-out sequences')."""
    limit = cap(ns.spec.tier_share, host.capacity_bytes)
    if limit is None:
        return True
    need = slot_size(page_bytes)
    while host.owned_bytes(ns.name) + need > limit:
        victims = host.victims_of(ns.name, 8)
        if not victims:
            return False
        move_down(victims)
        moved[ns.name] += len(victims)
    return True
