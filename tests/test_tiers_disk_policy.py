"""The disk tier evicts through the pool's policy interface (kvstore/policy), leaves first,
on a real LMDB in tmp_path: LRU gives the old order, LFU keeps a hot page, a prefix chain goes
child before parent (also after a restart), and a bad policy name is refused."""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from pathlib import Path

import pytest

from kvstore.policy import policy_names
from kvstore.tiers import DiskTier, PageKey, PageRecord, make_meta

PAGE = 64 << 10
CAPACITY = 4 << 20  # soft limit 3 MiB: about 45 pages


def h(i: int) -> bytes:
    return i.to_bytes(16, "little")


def key(i: int) -> PageKey:
    return PageKey("ns", h(i))


def rec(i: int, parent: int | None = None, created: int | None = None) -> PageRecord:
    meta = make_meta("ns", h(i), b"" if parent is None else h(parent), 16, PAGE, "g", created_ns=created)
    return PageRecord.build(meta, hashlib.shake_128(h(i)).digest(PAGE))


def put(disk: DiskTier, *records: PageRecord) -> None:
    assert disk.put_async(records).result(10) == []


def fits(disk: DiskTier) -> int:
    """How many of our pages fit under the soft limit (each page costs the same)."""
    put(disk, rec(10**6))
    cost = disk.stats()["bytes_used"]
    assert disk.remove_async([key(10**6)]).result(10) == 1
    return disk.soft_limit_bytes // cost


def open_tier(path: Path, policy: str, evicted: list[PageKey]) -> DiskTier:
    return DiskTier.open(path, CAPACITY, batch_records=8, on_evict=evicted.extend, policy=policy)


def test_lru_evicts_in_the_old_lru_order(tmp_path: Path) -> None:
    """Random puts (batches with rewrites), hits and touches against a model of the LRU the
    tier had before (an OrderedDict, the batch being written excluded from victims)."""
    rng = random.Random(7)
    evicted: list[PageKey] = []
    with open_tier(tmp_path / "d", "lru", evicted) as disk:
        n = fits(disk)
        model: OrderedDict[PageKey, None] = OrderedDict()
        expected: list[PageKey] = []
        next_id = 0
        for _ in range(150):
            op = rng.random()
            if op < 0.6 or not model:  # a batch of new pages, sometimes with a rewrite
                keys = [key(i) for i in range(next_id, next_id + rng.randint(1, 4))]
                next_id += len(keys)
                if model and rng.random() < 0.5:
                    keys.insert(rng.randrange(len(keys) + 1), rng.choice(list(model)))
                over = len(model) + sum(k not in model for k in keys) - n
                for k in [k for k in model if k not in keys][: max(0, over)]:
                    del model[k]
                    expected.append(k)
                for k in keys:
                    model.pop(k, None)
                    model[k] = None
                put(disk, *(rec(int.from_bytes(k.block_hash, "little")) for k in keys))
            elif op < 0.8:
                k = rng.choice(list(model))
                assert disk.get(k) is not None  # a hit touches
                model.move_to_end(k)
            else:
                ks = rng.sample(list(model), min(3, len(model)))
                disk.touch(ks)
                for k in ks:
                    model.move_to_end(k)
        assert disk.stats()["map_full_errors"] == 0
        assert evicted == expected and len(expected) > 50
        assert len(disk) == len(model) and all(k in disk for k in model)
        assert disk.stats()["policy"] == "lru"


@pytest.mark.parametrize(("policy", "survives"), [("lfu", True), ("lru", False)])
def test_lfu_keeps_a_frequently_read_page(tmp_path: Path, policy: str, survives: bool) -> None:
    evicted: list[PageKey] = []
    with open_tier(tmp_path / "d", policy, evicted) as disk:
        n = fits(disk)
        for i in range(n):
            put(disk, rec(i))
        for _ in range(8):
            assert disk.get(key(0)) is not None
        for i in range(n, 2 * n + 5):  # more than a full turnover
            put(disk, rec(i))
        assert all(key(i) in evicted for i in range(1, n))
        assert (key(0) in disk) is survives and (key(0) not in evicted) is survives


def _chain_first(evicted: list[PageKey], parents: dict[PageKey, PageKey]) -> None:
    """Every evicted parent's child (all were on disk together) was evicted before it."""
    at = {k: i for i, k in enumerate(evicted)}
    for child, parent in parents.items():
        if parent in at:
            assert child in at and at[child] < at[parent], (child, parent, evicted)


@pytest.mark.parametrize("policy", policy_names())
@pytest.mark.parametrize("children_first", [False, True])
def test_a_chain_goes_leaf_first(tmp_path: Path, policy: str, children_first: bool) -> None:
    a, b, c = 1, 2, 3
    chain = [rec(a), rec(b, parent=a), rec(c, parent=b)]
    evicted: list[PageKey] = []
    with open_tier(tmp_path / "d", policy, evicted) as disk:
        n = fits(disk)
        # The pool demotes leaves first, so a parent often reaches disk after its child.
        for r in reversed(chain) if children_first else chain:
            put(disk, r)
        for i in range(100, 100 + 2 * n):
            put(disk, rec(i))
            # A parent gone means its child is gone: never the other way round.
            assert (key(b) in disk or key(c) not in disk) and (key(a) in disk or key(b) not in disk)
        _chain_first(evicted, {key(b): key(a), key(c): key(b)})
        assert {key(a), key(b), key(c)} <= set(evicted)
        assert not any(key(i) in disk for i in (a, b, c))
        if policy == "lru":  # the chain is the oldest: it goes first, leaf to root
            assert evicted[:3] == [key(c), key(b), key(a)]


def test_a_parent_is_offered_in_the_same_eviction_pass(tmp_path: Path) -> None:
    """Only the chain's tip is a candidate; one pass that needs 5 pages takes the tip, then
    its parent, and so on."""
    evicted: list[PageKey] = []
    calls: list[int] = []
    with DiskTier.open(
        tmp_path / "d",
        CAPACITY,
        policy="lru",
        on_evict=lambda ks: (calls.append(len(ks)), evicted.extend(ks)),
    ) as disk:
        n = fits(disk)
        for i in range(n):
            put(disk, rec(i, parent=i - 1 if i else None))
        assert not evicted
        put(disk, *(rec(i) for i in range(1000, 1005)))
        assert evicted == [key(n - 1 - j) for j in range(5)] and calls == [5]
        assert all(key(i) in disk for i in range(1000, 1005))
        assert all(key(i) in disk for i in range(n - 5))


@pytest.mark.parametrize("policy", ["lru", "horizon"])
def test_after_reopen_eviction_is_leaf_first_then_oldest_created(tmp_path: Path, policy: str) -> None:
    # Hashes sort c < b < a, so the re-index finds children before their parents.
    a, b, c = 30, 20, 10
    roots = list(range(100, 110))
    with open_tier(tmp_path / "d", policy, []) as disk:
        n = fits(disk)
        put(disk, rec(a, created=1), rec(b, parent=a, created=2), rec(c, parent=b, created=3))
        # Created in the reverse of key order (the re-index's scan order) and of put order:
        # only created_ns can give the order after the restart.
        for i in roots:
            put(disk, rec(i, created=1000 - i))
        disk.flush_sync(10)
    evicted: list[PageKey] = []
    with open_tier(tmp_path / "d", policy, evicted) as disk:
        assert len(list(disk.reindex())) == 13 and len(disk) == 13
        for i in range(1000, 1000 + n):
            put(disk, rec(i))
        _chain_first(evicted, {key(b): key(a), key(c): key(b)})
        assert evicted[:13] == [key(c), key(b), key(a), *map(key, reversed(roots))]
        assert all(key(i) in disk for i in range(1000, 1000 + n))


def test_unknown_policy_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"disk tier policy: unknown eviction policy 'nope'; known: .*lru"):
        DiskTier.open(tmp_path / "d", CAPACITY, policy="nope")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("policy", ["lru", "horizon"])
def test_a_namespace_at_its_share_gives_up_its_own_records_leaf_first(policy: str) -> None:
    """DiskIndex.victims(namespace=...): only that namespace's cached records (not another
    namespace's, not its swapped sequences'), its least recently used leaves each with the
    ancestors it leaves childless; the policy still offers the rest afterwards."""
    from kvstore.tiers.disk_index import DiskIndex

    index = DiskIndex(policy)

    def k(ns: str, i: int) -> PageKey:
        return PageKey(ns, h(i))

    # b's records are the oldest: a policy-order walk would meet them first.
    index.committed({k("b", i): (100, b"", 100) for i in range(5)})
    index.committed({k("a", 1): (100, b"", 100), k("a", 2): (100, h(1), 100)})  # a chain 1 <- 2
    index.committed({k("a", 3): (100, b"", 100), k("a\x00swap", 4): (100, b"", 100)})
    index.touch([k("a", 1), k("a", 2)])  # the chain is used again: 3 is a's least recent
    assert index.owned == {"b": 500, "a": 400}
    out, freed = index.victims(250, [], namespace="a")
    assert (out, freed) == ([k("a", 3), k("a", 2), k("a", 1)], 300)
    index.restore(out)
    out, _ = index.victims(100, [k("a", 3)], namespace="a")
    assert out == [k("a", 2)]  # 1 has a child until 2 goes; 3 excluded
    index.discard(out)
    assert index.owned == {"b": 500, "a": 300}
    everyone, _ = index.victims(10**6, [])  # the policy still has every other record
    assert set(everyone) == {k("b", i) for i in range(5)} | {k("a", 1), k("a", 3), k("a\x00swap", 4)}
