"""The store's calls that wait for pages coming up from a tier: Lookup, WaitPages, SwapIn.

The store stays synchronous (no critical section spans an `await`); these await between
its calls. Whatever ends a wait early (the client's deadline, a cancel, the daemon
stopping) lands here as CancelledError at the one `await`, and each undoes what its call
holds so far: a cancelled call leaves no state behind. They wait with `asyncio.wait`, which
never cancels what it waits for: a promotion or a disk read goes on and settles (or frees its
page) on its own."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence as Seq

from kvstore.errors import InvariantBroken, KVStoreError
from kvstore.store.store import Store
from kvstore.store.types import LookupResult, SequenceView


async def lookup(
    store: Store,
    sid: int,
    namespace: str,
    token_ids: Seq[int],
    extra_keys: bytes,
    pin: bool,
    model_fingerprint: str = "",
    return_in_flight: bool = False,
) -> LookupResult:
    """`Store.lookup`; unless `return_in_flight`, answered once the pages coming up from disk
    are in the pool (or failed). Cancelled while waiting: its pin is released."""
    r = store.lookup(sid, namespace, token_ids, extra_keys, pin, model_fingerprint, return_in_flight)
    if not r.promotions or return_in_flight:
        return r
    return await settled(store, sid, r)


async def settled(store: Store, sid: int, r: LookupResult) -> LookupResult:
    """`r` (a lookup with promotions) once they are in the pool or failed. Cancelled while
    waiting: its pin is released."""
    waiting = [p.future() for p in r.promotions if p.ok is None]  # (host reads settled already)
    if waiting:
        try:
            await asyncio.wait(waiting)
        except BaseException:
            if r.pin_id:  # nobody will ever learn its id: release it now
                with contextlib.suppress(KVStoreError):  # (the session ended meanwhile)
                    store.release_pin(sid, r.pin_id)
            raise
    return store.settle_lookup(r)


async def wait_pages(store: Store, sid: int, pin_id: int, pages: int) -> tuple[list[int], int]:
    """Wait until the pin's first `pages` pages (0: all) are ready or failed: (their slots,
    pages in the pin). Holds nothing of its own: cancelled, it leaves the pin as it is."""
    slots, total, first = store.pin_progress(sid, pin_id)
    want = pages or total
    while first is not None and len(slots) < want:
        if first.ok is not None:  # (waiting on it would return at once, forever)
            raise InvariantBroken(f"pin {pin_id}: promotion of {first.key} settled but is still pending")
        await first.future()
        slots, total, first = store.pin_progress(sid, pin_id)
        want = min(want, total)
    return slots, total


async def swap_in(store: Store, sid: int, seq_id: int) -> SequenceView:
    """Bring a swapped-out sequence's pages back. Cancelled while waiting: everything taken
    for it is given back and the sequence stays swapped out, as before."""
    ticket = store.begin_swap_in(sid, seq_id)
    waiting = ticket.waits()
    if waiting:
        try:
            await asyncio.wait(waiting)
        except BaseException:
            store.abort_swap_in(ticket)
            raise
    return store.finish_swap_in(ticket)
