"""A lookup's walk below the pool (kvstore/store/lookup.py): after the pool's
hits, bring up the blocks a tier holds while the pool can make room; with every full page
hit, prefetch the pages that followed last time. Loop-owned, synchronous, like the store."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import TYPE_CHECKING

from kvstore.errors import ResourceExhausted
from kvstore.memory.pages import Page
from kvstore.store.tiering.promote import begin_reads, end_reads, promote_now, start
from kvstore.store.tiering.promotion import NotNow, Promotion
from kvstore.store.tiering.tiers import Tiers
from kvstore.tiers import PageKey, TierName

if TYPE_CHECKING:
    from kvstore.store.namespace import Namespace


def promote(
    tiers: Tiers,
    ns: Namespace,
    pages: list[Page],
    first_miss: bytes | None,
    rest: Iterable[bytes],
    held_already: bool,
) -> tuple[list[Page], list[Promotion]]:
    """Continue a lookup below the pool: bring up the blocks after the pool hits
    (`first_miss` and then `rest`) while a tier holds them and the pool can make room.
    `held_already`: the caller holds a reference on each of `pages` through this call.

    Returns (pages sealed at once, each with a reference the caller now owns; then the
    promotions the hit continues with: in flight, or settled ok since they started; the
    hit ends before the first that failed)."""
    if first_miss is None and (
        not pages or not tiers.prefetch_pages or tiers.successor(ns.name, pages[-1].block_hash) is None
    ):
        return [], []  # every page hit in the pool and nothing followed them last time
    held = [] if held_already else list(pages)  # resident pages of the chain: kept from
    for page in held:  # eviction while we make room
        ns.ref(page)
    up: list[Page] = []  # sealed at once; their references are the caller's
    proms: list[Promotion] = []
    try:
        with ns.landing_batch():  # the pages sealed here go to the device in one batch
            begin_reads(tiers)
            try:
                parent_page = pages[-1] if pages else None
                parent_prom: Promotion | None = None
                last_hash = pages[-1].block_hash if pages else None
                walk = [] if first_miss is None else itertools.chain([first_miss], rest)
                for block_hash in walk:
                    got = _promote_one(ns, tiers, block_hash, parent_page, parent_prom)
                    if got is None:
                        break
                    if isinstance(got, Page):
                        up.append(got)
                        parent_page, last_hash = got, block_hash
                        continue
                    proms.append(got)
                    parent_page, parent_prom, last_hash = _chain_step(ns, got, held)
                else:
                    # Every full page of the prompt hit: bring up what followed it last time.
                    for _ in range(tiers.prefetch_pages if last_hash is not None else 0):
                        nxt = tiers.successor(ns.name, last_hash)
                        if nxt is None:
                            break
                        resident = ns.index.get(nxt)
                        if resident is not None:
                            ns.ref(resident)
                            held.append(resident)
                            parent_page, parent_prom, last_hash = resident, None, nxt
                            continue
                        got = _promote_one(ns, tiers, nxt, parent_page, parent_prom)
                        if got is None:
                            break
                        tiers.counters["prefetched"] += 1
                        if isinstance(got, Page):  # not part of the hit: held only while we walk
                            held.append(got)
                            parent_page, parent_prom, last_hash = got, None, nxt
                            continue
                        parent_page, parent_prom, last_hash = _chain_step(ns, got, held)
            finally:
                end_reads(tiers)  # (reads from the page cache settle their promotions here)
                for page in held:
                    ns.unref(page)
    except BaseException:  # (a failed landing too: its pages were never handed out)
        for page in up:
            ns.unref(page)
        raise
    for i, prom in enumerate(proms):
        if prom.ok is False:  # settled as failed already: never filed as still in flight
            del proms[i:]
            break
    return up, proms


def _chain_step(
    ns: Namespace, prom: Promotion, held: list[Page]
) -> tuple[Page | None, Promotion | None, bytes]:
    if prom.sealed is not None:  # settled already: resident from here on
        ns.ref(prom.sealed)
        held.append(prom.sealed)
        return prom.sealed, None, prom.key.block_hash
    return None, prom, prom.key.block_hash


def _promote_one(
    ns: Namespace, tiers: Tiers, block_hash: bytes, parent_page: Page | None, parent_prom: Promotion | None
) -> Page | Promotion | None:
    """One block below the pool: the page sealed at once (promote.promote_now), a promotion
    in flight, or None (no tier holds it, the pool cannot make room, or it failed)."""
    key = PageKey(ns.name, block_hash)
    prom = tiers.promoting.get(key)
    if prom is not None:
        return prom if prom.ok is not False else None  # another lookup is bringing it up: join it
    source = tiers.holds_key(ns, key)
    if source is None:
        return None
    try:
        ns.make_room(1, "promotion")
    except ResourceExhausted:
        return None  # the pool is full of pinned pages: the hit ends here
    if source is TierName.HOST and key not in tiers.quant.encoding and key not in tiers.host:  # type: ignore[operator]
        source = tiers.holds_key(ns, key)  # the demotions that made room pushed it to disk
        if source is None:
            return None
    if parent_prom is None:  # (a page in flight before it: this one waits for it too)
        page = promote_now(tiers, ns, key, parent_page, source)
        if page is NotNow.FAILED:
            return None
        if isinstance(page, Page):
            return page
    prom = start(tiers, ns, block_hash, parent_page, parent_prom, source)
    return prom if prom.ok is not False else None
