"""Preemption of a live sequence: swap out (its pages move below the pool and its pool
pages are freed), swap in (brought back, new slots) and drop (freed; the engine recomputes).

Called by kvstore/store/store.py after it has checked ownership; loop-owned. A swapped
sequence keeps everything but its pages (tokens, hashes, budget state), so after SwapIn it
goes on as if nothing happened. Its state hangs on the session like its pages did: a dead
client's swapped sequences are freed with it (`discard_swapped`).

- Sealed pages are shared: swap-out makes sure a copy is below the pool (the same record a
  demotion makes, keyed by block hash), then unpins; if nobody else holds the page, the
  pool frees it (the policy's eviction path, which finds the copy already there). Swap-in
  finds it again by hash: in the pool if still there, else promoted.
- Unsealed pages (the partial last page, pages not committed yet, a budget's private pages)
  belong to the sequence alone: copied below under keys of their own, checksummed.
- A page that cannot be brought back (evicted from a full tier, or failing its checksum)
  makes SwapIn fail with DataLoss; the sequence is then dropped (emptied), so the engine
  recomputes instead of reading wrong KV.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvstore.errors import DataLoss, FailedPrecondition, ResourceExhausted
from kvstore.memory.pages import Page, PageState
from kvstore.store.sessions import Pin, Sequence
from kvstore.store.tiering import Promotion
from kvstore.tiers import PageKey


@dataclass
class Swapped:
    """Where a swapped-out sequence's pages went, by page index (None: dropped by its budget)."""

    # ("sealed", block_hash) | ("private", key, block_hash or None: what the unsealed page had)
    entries: list[tuple[Any, ...] | None]
    spare: int  # preallocated pages it held (static budget): reserved again at swap-in


@dataclass
class SwapInTicket:
    """A swap-in under way: pages [i] are a Page (resident, ref'd or reserved) or a Promotion
    (in flight, held through `holder`)."""

    seq: Sequence
    pages: list[Page | Promotion | None]
    holder: Pin
    pending: list[Promotion] = field(default_factory=list)


def swap_out(seq: Sequence) -> tuple[int, int]:
    """(pages now below the pool, pool pages freed)."""
    ns = seq.ns
    tiers = ns.tiers
    if tiers is None:
        raise FailedPrecondition(
            f"sequence {seq.id}: namespace {ns.name!r} has no tier below the pool to swap to "
            "(server.host_tier_bytes / server.disk_tier_dir); preempt with DROP instead"
        )
    _check_live(seq)
    entries: list[tuple[Any, ...] | None] = []
    saved: list[PageKey] = []
    try:  # copy everything down first: if that fails, nothing has changed
        for page in seq.pages:
            if page is None:
                entries.append(None)
            elif page.state is PageState.SEALED:
                tiers.demote(ns, page)  # a copy below, unless there is one already
                entries.append(("sealed", page.block_hash or b""))
            else:
                key = tiers.save_private(ns, page)
                saved.append(key)
                entries.append(("private", key, page.block_hash))
    except ValueError as e:
        for key in saved:
            tiers.discard_private(key)
        raise ResourceExhausted(f"swap_out of sequence {seq.id}: {e}") from None
    freed = 0
    for page in reversed(seq.pages):  # leaves first
        if page is None:
            continue
        if page.state is PageState.RESERVED:
            ns.free_reserved(page)
            freed += 1
        else:
            ns.unref(page)
            if page.evictable:
                ns.drop(page)  # nobody else holds it; its copy is below already
                freed += 1
    for page in seq.spare:
        ns.free_reserved(page)
        freed += 1
    seq.swapped = Swapped(entries, len(seq.spare))
    seq.pages, seq.spare, seq.held = [], [], 0
    moved = sum(e is not None for e in entries)
    tiers.swapped_pages += moved
    return moved, freed


def begin_swap_in(seq: Sequence) -> SwapInTicket:
    """Make room and start bringing the pages back; the caller awaits `ticket.pending` and
    calls `finish_swap_in`. ResourceExhausted (nothing changed) if the pool cannot hold them."""
    ns, swapped = seq.ns, seq.swapped
    if swapped is None or seq.swap_in is not None:
        what = "being swapped in" if seq.swap_in is not None else "not swapped out"
        raise FailedPrecondition(f"sequence {seq.id} is {what}")
    tiers = ns.tiers
    assert tiers is not None
    need = swapped.spare + sum(
        1
        for e in swapped.entries
        if e is not None and not (e[0] == "sealed" and ns.index.get(e[1]) is not None)
    )
    ns.make_room(need, f"swap_in of sequence {seq.id} ({need} pages)")
    holder = Pin(0, seq.session_id, ns, [])
    ticket = SwapInTicket(seq, [], holder)
    seq.swap_in = ticket
    parent_page: Page | None = None
    parent_prom: Promotion | None = None
    for entry in swapped.entries:
        if entry is None:
            ticket.pages.append(None)
            parent_page = parent_prom = None
            continue
        kind, ref = entry[0], entry[1]
        if kind == "private":
            page = ns.reserve(seq.id)
            page.block_hash = entry[2]  # a full page keeps the hash it will be sealed under
            ticket.pages.append(page)
            if not tiers.load_private(ns, ref, page):  # type: ignore[arg-type]
                abort_swap_in(ticket)
                raise _lost(seq, f"page {len(ticket.pages) - 1} (unsealed, swapped below the pool)")
            parent_page = parent_prom = None
            continue
        resident = ns.index.get(ref)  # type: ignore[arg-type]
        if resident is not None:
            ns.ref(resident)
            ticket.pages.append(resident)
            parent_page, parent_prom = resident, None
            continue
        prom = tiers.promoting.get(PageKey(ns.name, ref))  # type: ignore[arg-type]
        if prom is None:
            source = tiers.holds(ns, ref)  # type: ignore[arg-type]
            if source is None:
                abort_swap_in(ticket)
                raise _lost(seq, f"page {len(ticket.pages)} (sealed; evicted from every tier since)")
            prom = tiers.promote(ns, ref, parent_page, parent_prom, source)  # type: ignore[arg-type]
        if prom.ok:
            ns.ref(prom.sealed)
            ticket.pages.append(prom.sealed)
            parent_page, parent_prom = prom.sealed, None
        elif prom.ok is False:
            abort_swap_in(ticket)
            raise _lost(seq, f"page {len(ticket.pages)} (failed its checksum or vanished below the pool)")
        else:
            prom.pins.append(holder)
            holder.pending.append(prom)
            ticket.pending.append(prom)
            ticket.pages.append(prom)
            parent_page, parent_prom = None, prom
    return ticket


def finish_swap_in(ticket: SwapInTicket) -> None:
    """Once every pending promotion has settled: give the sequence its pages back."""
    seq, ns = ticket.seq, ticket.seq.ns
    if seq.swap_in is not ticket:
        raise FailedPrecondition(f"sequence {seq.id} was released while it was being swapped in")
    pages: list[Page | None] = []
    for i, item in enumerate(ticket.pages):
        if isinstance(item, Promotion):
            if not item.ok:
                abort_swap_in(ticket)
                raise _lost(seq, f"page {i} (failed its checksum or vanished below the pool)")
            item = item.sealed  # the holder's reference becomes the sequence's
        pages.append(item)
    swapped = seq.swapped
    assert swapped is not None and ns.tiers is not None
    for entry in swapped.entries:
        if entry is not None and entry[0] == "private":
            ns.tiers.discard_private(entry[1])  # type: ignore[arg-type]
    ns.tiers.swapped_pages -= sum(e is not None for e in swapped.entries)
    seq.pages = pages
    seq.held = sum(p is not None for p in pages)
    seq.spare = [ns.reserve(seq.id) for _ in range(swapped.spare)]
    seq.swapped = seq.swap_in = None


def abort_swap_in(ticket: SwapInTicket) -> None:
    """Undo a swap-in: every page it got back is released; the sequence stays swapped."""
    seq, ns = ticket.seq, ticket.seq.ns
    for prom in ticket.holder.pending:
        prom.pins.remove(ticket.holder)
    ticket.holder.pending.clear()
    for page in ticket.holder.pages:  # promotions that settled for us: our reference
        ns.unref(page)
    for item in reversed(ticket.pages):
        if isinstance(item, Page):
            if item.state is PageState.RESERVED:
                ns.free_reserved(item)
            else:
                ns.unref(item)
    ticket.pages.clear()
    if seq.swap_in is ticket:
        seq.swap_in = None


def discard_swapped(seq: Sequence) -> int:
    """Free what a swapped sequence keeps below the pool (its session ended, or it was
    dropped). Returns the pages it had there."""
    swapped, tiers = seq.swapped, seq.ns.tiers
    if swapped is None or tiers is None:
        return 0
    if seq.swap_in is not None:
        abort_swap_in(seq.swap_in)
    for entry in swapped.entries:
        if entry is not None and entry[0] == "private":
            tiers.discard_private(entry[1])  # type: ignore[arg-type]
    moved = sum(e is not None for e in swapped.entries)
    tiers.swapped_pages -= moved
    seq.swapped = None
    return moved


def _check_live(seq: Sequence) -> None:
    if seq.swapped is not None:
        raise FailedPrecondition(f"sequence {seq.id} is swapped out; SwapIn first")


def _lost(seq: Sequence, what: str) -> DataLoss:
    return DataLoss(
        f"sequence {seq.id}: {what} cannot be brought back; the sequence has been dropped "
        "(emptied): recompute it"
    )
