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
- SwapIn first holds the pages still resident, then makes room for all the others (and a
  static budget's spare pages) at once: it gets them all, or fails with ResourceExhausted
  having changed nothing. Until `finish_swap_in` hands the pages over, the ticket holds them;
  `abort_swap_in` (a failure, the call cancelled, the sequence released) gives back exactly
  what it holds, and the sequence stays swapped out, as it was.
"""

from __future__ import annotations

from kvstore.errors import DataLoss, FailedPrecondition, InvariantBroken, ResourceExhausted
from kvstore.memory.pages import Page, PageState
from kvstore.store.sessions import (
    Pin,
    PrivateEntry,
    PrivateRead,
    SealedEntry,
    Sequence,
    SwapInTicket,
    Swapped,
)
from kvstore.store.tiering import private
from kvstore.store.tiering.promote import start
from kvstore.store.tiering.promotion import Promotion
from kvstore.store.tiering.tiers import Tiers
from kvstore.tiers import PageKey


def swap_out(tiers: Tiers | None, seq: Sequence) -> tuple[int, int]:
    """(pages now below the pool, pool pages freed)."""
    ns = seq.ns
    if tiers is None:
        raise FailedPrecondition(
            f"sequence {seq.id}: namespace {ns.name!r} has no tier below the pool to swap to "
            "(server.host_tier_bytes / server.disk_tier_dir); preempt with DROP instead"
        )
    _check_live(seq)
    entries: list[SealedEntry | PrivateEntry | None] = []
    saved: list[PageKey] = []
    try:  # copy everything down first: if that fails, nothing has changed
        for page in seq.pages:
            if page is None:
                entries.append(None)
            elif page.state is PageState.SEALED:
                tiers.demote(ns, page)  # a copy below, unless there is one already
                entries.append(SealedEntry(page.block_hash or b""))
            else:
                key = private.save(tiers, ns, page)
                saved.append(key)
                entries.append(PrivateEntry(key, page.block_hash))
    except ValueError as e:
        for key in saved:
            private.discard(tiers, key)
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


def begin_swap_in(tiers: Tiers | None, seq: Sequence) -> SwapInTicket:
    """Make room and start bringing the pages back; the caller waits for `ticket.waits()` and
    calls `finish_swap_in` (or `abort_swap_in`). ResourceExhausted, with nothing changed, if
    the pool cannot hold them; DataLoss (the caller drops the sequence) if a page is gone."""
    ns, swapped = seq.ns, seq.swapped
    if swapped is None or seq.swap_in is not None:
        what = "being swapped in" if seq.swap_in is not None else "not swapped out"
        raise FailedPrecondition(f"sequence {seq.id} is {what}")
    if tiers is None:
        raise InvariantBroken(f"sequence {seq.id} is swapped out of {ns.name!r}, which has no tier below")
    # Hold the pages still resident first: making room for the others must not evict them.
    resident: dict[int, Page] = {}
    for i, entry in enumerate(swapped.entries):
        if isinstance(entry, SealedEntry):
            page = ns.index.get(entry.block_hash)
            if page is not None:
                ns.ref(page)
                resident[i] = page
    need = swapped.spare + sum(
        1
        for i, e in enumerate(swapped.entries)
        if e is not None
        and i not in resident
        and not (isinstance(e, SealedEntry) and PageKey(ns.name, e.block_hash) in tiers.promoting)
    )
    try:
        ns.make_room(need, f"swap_in of sequence {seq.id} ({need} pages)")
    except ResourceExhausted:
        for page in resident.values():
            ns.unref(page)
        raise
    ticket = SwapInTicket(seq, Pin(0, seq.session_id, ns, [], counted=False))
    ticket.spare = [ns.reserve(seq.id) for _ in range(swapped.spare)]
    seq.swap_in = ticket
    try:
        _bring_back(ticket, swapped, resident, tiers)
    except BaseException:
        for i, page in resident.items():  # (those not yet in ticket.pages)
            if i >= len(ticket.pages):
                ns.unref(page)
        abort_swap_in(ticket)
        raise
    return ticket


def _bring_back(ticket: SwapInTicket, swapped: Swapped, resident: dict[int, Page], tiers: Tiers) -> None:
    """Fill `ticket.pages`, one item per entry (the caller has made room for them all)."""
    seq, ns = ticket.seq, ticket.seq.ns
    parent_page: Page | None = None
    parent_prom: Promotion | None = None
    for i, entry in enumerate(swapped.entries):
        if entry is None:
            ticket.pages.append(None)
            parent_page = parent_prom = None
            continue
        if isinstance(entry, PrivateEntry):
            page = ns.reserve(seq.id)
            page.block_hash = entry.block_hash  # a full page keeps the hash it will be sealed under
            got = private.load(tiers, ns, entry.key, page)
            if not isinstance(got, bool):
                ns.private_reads.add(got)
                got.add_done_callback(ns.private_reads.discard)
            ticket.pages.append(page if isinstance(got, bool) else PrivateRead(page, got))
            if got is False:
                raise _lost(seq, f"page {i} (unsealed, swapped below the pool)")
            parent_page = parent_prom = None
            continue
        page = resident.get(i)
        if page is not None:
            ticket.pages.append(page)
            parent_page, parent_prom = page, None
            continue
        key = PageKey(ns.name, entry.block_hash)
        prom = tiers.promoting.get(key)
        if prom is None:
            source = tiers.holds_key(ns, key)
            if source is None:
                raise _lost(seq, f"page {i} (sealed; evicted from every tier since)")
            prom = start(tiers, ns, entry.block_hash, parent_page, parent_prom, source)
        if prom.ok:
            ns.ref(prom.sealed)  # type: ignore[arg-type]  (ok: sealed is set)
            ticket.pages.append(prom.sealed)
            parent_page, parent_prom = prom.sealed, None
        elif prom.ok is False:
            raise _lost(seq, f"page {i} (failed its checksum or vanished below the pool)")
        else:
            prom.pins.append(ticket.holder)
            ticket.holder.pending.append(prom)
            ticket.pages.append(prom)
            parent_page, parent_prom = None, prom


def finish_swap_in(tiers: Tiers | None, ticket: SwapInTicket) -> None:
    """Once everything in `ticket.waits()` is done: give the sequence its pages back (DataLoss,
    the ticket aborted, if one did not come back). Nothing can fail once pages move."""
    seq = ticket.seq
    if seq.swap_in is not ticket or ticket.aborted:
        raise FailedPrecondition(f"sequence {seq.id} was released while it was being swapped in")
    pages: list[Page | None] = []
    for i, item in enumerate(ticket.pages):
        if isinstance(item, PrivateRead):
            if not item.done.done():
                raise InvariantBroken(f"sequence {seq.id}: swap-in finished before page {i} was read")
            if item.done.cancelled() or item.done.exception() is not None or not item.done.result():
                abort_swap_in(ticket)
                raise _lost(seq, f"page {i} (unsealed, swapped below the pool)")
            item = item.page
        elif isinstance(item, Promotion):
            if item.ok is None:
                raise InvariantBroken(f"sequence {seq.id}: swap-in finished before page {i} came up")
            if not item.ok:
                abort_swap_in(ticket)
                raise _lost(seq, f"page {i} (failed its checksum or vanished below the pool)")
            item = item.sealed  # the holder's reference becomes the sequence's
        pages.append(item)
    swapped = seq.swapped
    if swapped is None or tiers is None:
        raise InvariantBroken(f"sequence {seq.id} is being swapped in but not swapped out")
    for entry in swapped.entries:
        if isinstance(entry, PrivateEntry):
            private.discard(tiers, entry.key)
    tiers.swapped_pages -= sum(e is not None for e in swapped.entries)
    for page in pages:
        if page is not None and page.state is PageState.RESERVED:
            seq.ns.land(page)  # a private page copied up: on a device, its staged bytes go now
    seq.pages = pages
    seq.held = sum(p is not None for p in pages)
    seq.spare, ticket.spare = ticket.spare, []
    ticket.pages.clear()
    ticket.holder.pages.clear()
    seq.swapped = seq.swap_in = None


def abort_swap_in(ticket: SwapInTicket) -> None:
    """Undo a swap-in: give back exactly what the ticket holds; the sequence stays swapped
    out, as before. Idempotent."""
    if ticket.aborted:
        return
    ticket.aborted = True
    seq, ns = ticket.seq, ticket.seq.ns
    for prom in ticket.holder.pending:
        prom.pins.remove(ticket.holder)
    ticket.holder.pending.clear()
    for page in ticket.holder.pages:  # promotions that settled for us: our reference
        ns.unref(page)
    ticket.holder.pages.clear()
    for item in reversed(ticket.pages):
        if isinstance(item, PrivateRead):
            if item.done.done():
                ns.free_reserved(item.page)
            else:  # a reader thread is writing into its slot: give it back once it is done
                item.done.add_done_callback(lambda _, page=item.page: ns.free_reserved(page))
        elif isinstance(item, Page):
            if item.state is PageState.RESERVED:
                ns.free_reserved(item)
            else:
                ns.unref(item)
    ticket.pages.clear()
    for page in ticket.spare:
        ns.free_reserved(page)
    ticket.spare.clear()
    if seq.swap_in is ticket:
        seq.swap_in = None


def discard_swapped(tiers: Tiers | None, seq: Sequence) -> int:
    """Free what a swapped sequence keeps below the pool (its session ended, or it was
    dropped). Returns the pages it had there."""
    swapped = seq.swapped
    if swapped is None or tiers is None:
        return 0
    if seq.swap_in is not None:
        abort_swap_in(seq.swap_in)
    for entry in swapped.entries:
        if isinstance(entry, PrivateEntry):
            private.discard(tiers, entry.key)
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
