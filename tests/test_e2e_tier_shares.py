"""A namespace's share of the tiers below the pools (issue 19, leftovers of item 5: the host
and disk tiers are shared by every tenant). A real daemon, real host tier / LMDB disk tier:
tenant B stores pages that go below its pool, then tenant A, with `tier_share = 0.5`, floods
far past both its pool and the tier; B's pages survive in the tier and read back
byte-identical, because A's demotions push out A's own pages once it is at its share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kvstore_client
import pytest
from daemon import SMALL_NAMESPACE
from e2e_helpers import prompt_bytes
from kvstore_client.errors import InvalidArgument

T = SMALL_NAMESPACE["page_tokens"]


def tokens_of(seed: int) -> list[int]:
    return [seed * 1000 + j for j in range(4 * T)]  # 4 pages


def namespaces(**geometry: Any) -> list[dict[str, Any]]:
    ns = SMALL_NAMESPACE | {"num_pages": 16} | geometry
    return [ns | {"name": "a", "tier_share": 0.5}, ns | {"name": "b"}]


def flood_and_check(d: Any, tier: str, floods: int) -> None:
    with kvstore_client.connect(d.target) as kv:
        shape = kv.namespace("b").page_shape
        mine = [tokens_of(seed) for seed in (1, 2)]
        for t in mine:
            kv.put("b", t, prompt_bytes(t, shape, T))
        assert kv.evict("b", all=True).pages_evicted == 8  # B's 8 pages are below its pool now
        settle = kv.flush if tier == "disk" else lambda: None  # (the disk writer commits later)
        settle()
        b_below = getattr(kv.stats("b").namespaces[0], f"{tier}_bytes")
        assert b_below >= 8 * kv.namespace("b").pool.page_bytes

        page = kv.namespace("a").pool.page_bytes
        for seed in range(100, 100 + floods):  # A: pages through its 16-page pool, and on down
            kv.put("a", tokens_of(seed), bytes([seed % 251]) * 4 * page)
        settle()
        stats = kv.stats()
        a, b = (next(ns for ns in stats.namespaces if ns.name == name) for name in ("a", "b"))
        capacity = stats.tiers.host_capacity_bytes if tier == "host" else _disk_soft_limit(stats)
        assert getattr(b, f"{tier}_bytes") == b_below and b.share_evictions == 0, b  # all still there
        assert a.tier_share == 0.5 and a.share_evictions > 0, a
        assert getattr(a, f"{tier}_bytes") <= capacity // 2, (a, capacity)
        for t in mine:  # promoted back from the tier, byte for byte
            assert kv.get("b", t).data.numpy().tobytes() == prompt_bytes(t, shape, T)
    assert d.proc.poll() is None


def _disk_soft_limit(stats: Any) -> int:
    # The share is of what the writer fills the map to: its capacity less the headroom (1 MiB here).
    return stats.tiers.disk_capacity_bytes - (1 << 20)


def test_a_flooding_tenant_cannot_push_anothers_pages_out_of_the_host_tier(daemon_factory: Any) -> None:
    # 64 slots of 1 KiB, no disk below: a page pushed out of the host tier is gone.
    d = daemon_factory(server={"host_tier_bytes": 64 << 10}, namespaces=namespaces()).start()
    flood_and_check(d, "host", floods=30)  # 120 pages of A: far past its pool and the tier
    # A share is set at CreateNamespace too, and must be a fraction.
    geometry = {k: v for k, v in SMALL_NAMESPACE.items() if k != "name"}
    with kvstore_client.connect(d.target) as kv:
        with pytest.raises(InvalidArgument, match=r"tier_share=1.5 must be in \[0, 1\]"):
            kv.create_namespace("c", **geometry, tier_share=1.5)
        kv.create_namespace("c", **geometry, tier_share=0.25)
        assert kv.namespace("c").info.tier_share == 0.25
        assert kv.stats("c").namespaces[0].tier_share == 0.25


def test_a_flooding_tenant_cannot_push_anothers_pages_out_of_the_disk_tier(
    daemon_factory: Any, tmp_path: Path
) -> None:
    # A 2 MiB map with 1 MiB of headroom: pages of 4 KiB (8 KiB a record) fill it after ~120.
    server = {"disk_tier_dir": str(tmp_path / "disk"), "disk_tier_bytes": 2 << 20}
    d = daemon_factory(server=server, namespaces=namespaces(head_dim=64)).start()
    flood_and_check(d, "disk", floods=60)  # 240 pages of A
