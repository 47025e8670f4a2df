"""Lookup and pins (docs/api.md): the longest cached prefix of a prompt, from the pool and,
through kvstore/store/tiering/walk.py, from the tiers below it; a pin holds the pages found
(and those still coming up) until it is released. Loop-owned, synchronous; the waiting is
in kvstore/store/waits.py."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq

from kvstore.errors import InvariantBroken
from kvstore.hashing import iter_block_hashes
from kvstore.memory.pages import Page
from kvstore.store import page_runs, quotas, validate
from kvstore.store.live_mrc import remember_lookup
from kvstore.store.namespace import Namespace
from kvstore.store.sessions import Pin, Session
from kvstore.store.tiering import walk
from kvstore.store.tiering.promotion import Promotion
from kvstore.store.tiering.tiers import Tiers
from kvstore.store.types import LookupResult, ReleaseResult, StoreLimits


def lookup(
    session: Session | None,
    ns: Namespace,
    tiers: Tiers | None,
    limits: StoreLimits,
    new_id: Callable[[], int],
    token_ids: Seq[int],
    extra_keys: bytes,
    pin: bool,
) -> LookupResult:
    """The caller checked the request's flags, the session and the model; `new_id` names
    the pin, if one is taken."""
    tokens_le = validate.token_bytes(
        token_ids, field="token_ids", vocab_size=ns.spec.vocab_size, limits=limits
    )
    extra = validate.extra_keys(extra_keys, limits)
    T = ns.spec.page_tokens
    found, pages = ns.index.probe(tokens_le, T, extra)
    if pin:  # (its resident pages; those promoted from a tier come on top)
        quotas.check_session_pages(session, ns, len(pages), f"a pinned lookup of {len(pages)} pages")
    first_miss = found[-1] if len(found) > len(pages) else None
    touched = len(pages) + (first_miss is not None)
    if touched:
        ns.mrc.add(touched, found)  # (the blocks this lookup touches; `found` is not changed below)
        if session is not None:
            first = pages[0].block_hash if pages else first_miss
            remember_lookup(session.mrc_lookups, first or b"", touched)
    # A pin's references on the resident pages are taken first: they also keep those
    # pages from being evicted while promotions make room (no second hold to take and
    # drop, each a trip through the policy).
    pinning = pin and bool(pages)
    if pinning:
        page_runs.ref_all(ns, pages)
    proms: list[Promotion] = []
    up: list[Page] = []
    if tiers is not None:
        # Below the pool the walk goes on from the first miss, hashing lazily again.
        rest = tokens_le[4 * T * len(found) :]
        hashes = iter_block_hashes(found[-1], rest, T, extra) if found else iter(())
        try:
            up, proms = walk.promote(tiers, ns, pages, first_miss, hashes, held_already=pinning)
        except BaseException:
            if pinning:
                page_runs.unref_all(ns, pages)
            raise
        if up:  # sealed from a tier just now: resident pages of the hit from here on
            pages += up
            if not pin:
                for page in up:
                    ns.unref(page)  # (the reference _promote handed over; a pin keeps it)
    hit = (len(pages) + len(proms)) * T
    ns.lookups += 1
    ns.hit_tokens += hit
    ns.miss_tokens += len(tokens_le) // 4 - hit
    slots = ns.touch(pages) if pages else []
    ready = len(pages)
    for prom in proms:
        if not prom.ok:
            break
        ready += 1
    pin_id = 0
    if pin and hit:
        if session is None:
            raise InvariantBroken("a pin without a session")
        pinned = Pin(new_id(), session.id, ns, list(pages))
        for prom in proms:
            if prom.sealed is not None:  # settled since it started
                ns.ref(prom.sealed)
                pinned.pages.append(prom.sealed)
            else:  # in flight: joins pinned.pages when sealed (Pin.settled)
                prom.pins.append(pinned)
                pinned.pending.append(prom)
        pin_id = pinned.id
        session.pins[pin_id] = pinned
    # The resident pages of the hit are the probe's first hashes (unless some came up from a tier).
    block_hashes = found[: len(pages)] if not up else [p.block_hash or b"" for p in pages]
    if proms:
        slots += [(p.sealed or p.page).slot for p in proms]
        block_hashes += [p.key.block_hash for p in proms]
    return LookupResult(hit, slots, block_hashes, pin_id, ready, proms, ns.name)


def settle(ns: Namespace, r: LookupResult) -> LookupResult:
    """The lookup once its promotions have settled: the hit ends before the first that
    failed (a page whose bytes did not verify is never served). A pin's hit counters
    were corrected as they failed (Pin.settled)."""
    n = len(r.slots) - len(r.promotions)
    slots, hashes = r.slots[:n], r.block_hashes[:n]
    for prom in r.promotions:
        if not prom.ok:
            break
        slots.append(prom.sealed.slot)
        hashes.append(prom.key.block_hash)
    lost = (len(r.slots) - len(slots)) * ns.spec.page_tokens
    if not r.pin_id:
        ns.hit_tokens -= lost
        ns.miss_tokens += lost
    return LookupResult(r.hit_tokens - lost, slots, hashes, r.pin_id, len(slots), [], r.namespace)


def pin_progress(pin: Pin) -> tuple[list[int], int, Promotion | None]:
    """(slots of the pages ready, pages in the pin, the first page still in flight or None)."""
    first = pin.pending[0] if pin.pending else None
    return [p.slot for p in pin.pages], len(pin.pages) + len(pin.pending), first


def release_pin(pin: Pin) -> ReleaseResult:
    """Drop the pin's references (and its place in the promotions it waits for); the caller
    forgets it."""
    for prom in pin.pending:
        prom.pins.remove(pin)  # it is sealed unpinned, or freed, when it settles
    pin.pending.clear()
    page_runs.unref_all(pin.ns, pin.pages[::-1])
    return ReleaseResult(0, len(pin.pages))
