"""Eviction through the daemon: a full pool makes room for new appends by evicting unpinned
sealed pages leaf-first in LRU order, never a pinned page and never a parent before its
children; the Evict RPC drops all / a prefix subtree / a byte budget under the same rules.

"Leaf-first" is checked from the outside: after eviction every chain's lookup returns a
prefix of its original slots (it can only shrink from the tail, whole pages, never a hole),
and the sealed-page count equals the pages those lookups reach (no orphan below a hole).
"""

from __future__ import annotations

import grpc
import kvstore_client
import pytest
from e2e_helpers import Raw, assert_status, page_content, page_tokens_of, prompt
from kvstore_client.errors import ResourceExhausted

T = 4
PAGES = 16
NAMESPACE = {
    "name": "ev",
    "num_layers": 2,
    "num_kv_heads": 2,
    "head_dim": 16,
    "dtype": "float16",
    "page_tokens": T,
    "num_pages": PAGES,
    "policy": "lru",
}


@pytest.fixture
def ev(daemon_factory):
    d = daemon_factory(namespaces=[NAMESPACE]).start()
    with kvstore_client.connect(d.target, client_name="eviction") as kv, Raw(d.target) as raw:
        yield kv, raw


def write_chain(kv: kvstore_client.Client, tokens: list[int], *, hold: bool = False):
    """Allocate, append, write page_content, commit. Returns (slots, the sequence if held)."""
    seq = kv.allocate("ev")
    res = seq.append(tokens)
    for p in res.writable_pages:
        seq.namespace.page(p.slot).copy_(
            page_content(p.index, page_tokens_of(tokens, p.index, T), seq.namespace.page_shape)
        )
    seq.commit()
    slots = seq.slots
    if not hold:
        seq.release()
        return slots, None
    return slots, seq


def resident(kv: kvstore_client.Client, raw: Raw, chains: dict[str, tuple[list[int], list[int]]]) -> dict:
    """Pages of each chain still hit; checks each hit is a prefix of the chain's original
    slots (no hole) and that no sealed page is left outside those prefixes."""
    hits = {}
    for name, (tokens, slots) in chains.items():
        found = kv.lookup("ev", tokens)
        assert found.hit_tokens % T == 0
        n = found.hit_tokens // T
        assert found.slots == slots[:n], f"chain {name}: hit {found.slots} is not a prefix of {slots}"
        hits[name] = n
    distinct = {s for name, (_, slots) in chains.items() for s in slots[: hits[name]]}
    assert raw.stats("ev")[0].pages_sealed == len(distinct), (
        f"sealed pages outside the chains' prefixes: {hits}"
    )
    return hits


def test_pool_pressure_evicts_lru_leaves_first_and_never_a_pinned_page(ev) -> None:
    kv, raw = ev
    chains = {}
    for i in range(4):  # 4 chains x 4 pages fill the pool
        tokens = prompt(4 * T, seed=40 + i)
        chains[f"c{i}"] = (tokens, write_chain(kv, tokens)[0])
    assert raw.counts("ev")["pages_free"] == 0
    pin = kv.lookup("ev", chains["c0"][0], pin=True)
    assert pin.hit_tokens == 16
    # Recency, oldest first: c2 (sealed, never looked up since), c1, c3, then c0 (pinned anyway).
    kv.lookup("ev", chains["c1"][0])
    kv.lookup("ev", chains["c3"][0])
    before = raw.stats("ev")[0]

    # A new 3-page sequence: the pool is full, so three pages must be evicted.
    new_tokens = prompt(3 * T, seed=50)
    new_slots, held = write_chain(kv, new_tokens, hold=True)
    after = raw.stats("ev")[0]
    assert after.evictions - before.evictions == 3
    chains["new"] = (new_tokens, new_slots)
    hits = resident(kv, raw, chains)
    # c2's tail went first, leaf by leaf: one page of it is left; nothing else was touched.
    assert hits == {"c0": 4, "c1": 4, "c2": 1, "c3": 4, "new": 3}
    assert set(new_slots) == set(chains["c2"][1][1:]), "the new pages are c2's evicted ones"

    # More than free + unpinned can give: refused with the numbers, and nothing is evicted.
    pinned = 4 + 3  # c0's lookup pin + the held new sequence
    unpinned = PAGES - pinned
    with kv.allocate("ev") as seq, pytest.raises(ResourceExhausted) as failed:
        seq.append(prompt((unpinned + 1) * T, seed=51))
    assert_status(
        failed.value,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"needs {unpinned + 1} free pages",
        f"{unpinned} sealed unpinned",
    )
    assert raw.stats("ev")[0].evictions == after.evictions
    assert resident(kv, raw, chains) == hits

    # Exactly what unpinned pages can give: every unpinned page goes, pinned ones all stay.
    big_tokens = prompt(unpinned * T, seed=52)
    big_slots, _ = write_chain(kv, big_tokens)
    assert raw.stats("ev")[0].evictions == after.evictions + unpinned
    chains["big"] = (big_tokens, big_slots)
    hits = resident(kv, raw, chains)
    assert hits["c0"] == 4 and hits["new"] == 3, "a pinned page was evicted"
    assert hits["big"] == unpinned
    # The pinned chain's bytes are untouched.
    for i, view in enumerate(pin.views()):
        assert view.equal(page_content(i, page_tokens_of(chains["c0"][0], i, T), view.shape))
    pin.release()
    held.release()


def test_evict_rpc_by_prefix_bytes_and_all(ev) -> None:
    kv, raw = ev
    page_bytes = raw.stats("ev")[0].page_bytes
    chains = {}
    for i in range(3):
        tokens = prompt(4 * T, seed=60 + i)
        chains[f"c{i}"] = (tokens, write_chain(kv, tokens)[0])
    # A branch off c1 after its second page.
    branch = [*chains["c1"][0][: 2 * T], *prompt(2 * T, seed=63)]
    chains["c1b"] = (branch, write_chain(kv, branch)[0])
    assert chains["c1b"][1][:2] == chains["c1"][1][:2]
    assert raw.stats("ev")[0].pages_sealed == 14
    pin = kv.lookup("ev", chains["c0"][0], pin=True)
    evictions = raw.stats("ev")[0].evictions

    # Prefix: c1's second page and everything extending it, on both branches.
    r = kv.evict("ev", prefix=chains["c1"][0][: 2 * T])
    assert (r.pages_evicted, r.bytes_freed, r.pages_skipped_pinned) == (5, 5 * page_bytes, 0)
    assert resident(kv, raw, chains) == {"c0": 4, "c1": 1, "c2": 4, "c1b": 1}
    # A pinned prefix: nothing evicted, every page of the subtree reported as skipped.
    r = kv.evict("ev", prefix=chains["c0"][0][:T])
    assert (r.pages_evicted, r.pages_skipped_pinned) == (0, 4)
    # A prefix that is not resident: nothing to do.
    assert kv.evict("ev", prefix=prompt(2 * T, seed=64)).pages_evicted == 0

    # Bytes: the policy's choice, leaves first, exactly enough whole pages.
    r = kv.evict("ev", nbytes=2 * page_bytes - 1)
    assert (r.pages_evicted, r.bytes_freed) == (2, 2 * page_bytes)
    hits = resident(kv, raw, chains)
    assert hits["c0"] == 4
    assert sum(hits.values()) - hits["c1b"] == 4 + 1 + 4 - 2  # c1b's page is c1's

    # All: every unpinned page; the pinned chain stays and still reads back.
    r = kv.evict("ev", all=True)
    assert r.pages_skipped_pinned == 4
    assert resident(kv, raw, chains) == {"c0": 4, "c1": 0, "c2": 0, "c1b": 0}
    stats = raw.stats("ev")[0]
    assert stats.evictions - evictions == 14 - 4
    assert (stats.pages_sealed, stats.pages_free) == (4, PAGES - 4)
    pin.release()
    assert kv.evict("ev", all=True).pages_evicted == 4
    assert raw.counts("ev")["pages_free"] == PAGES
