"""Budgets of a sequence (options.mode sliding_window or importance; docs/api.md): which
pages an append drops, and dropping them. Called by kvstore/store/sequences.py's append."""

from __future__ import annotations

import math

from kvstore.memory.pages import PageState
from kvstore.store.sessions import Sequence
from kvstore.store.types import SLIDING_WINDOW


def drops(seq: Sequence, total_tokens: int) -> list[int]:
    """The page indices the sequence's budget drops when it grows to `total_tokens`."""
    o = seq.options
    T = seq.ns.spec.page_tokens
    npages = -(-total_tokens // T)
    sinks = -(-o.sink_tokens // T)
    if o.mode == SLIDING_WINDOW:
        # Every index in [max(sinks, window_lo), lo) is held or new: earlier ones are gone.
        lo = max(0, total_tokens - o.window_tokens) // T  # <= npages - 1: the last page stays
        return list(range(max(sinks, seq.window_lo), lo))
    old = len(seq.pages)
    candidates = [i for i, p in enumerate(seq.pages) if p is not None]
    candidates.extend(range(old, npages))
    excess = len(candidates) - o.budget_pages
    if excess <= 0:
        return []
    # Never a sink, never the last page; unscored pages rank highest; ties: oldest first.
    # budget_pages >= sinks + 1 guarantees enough candidates.
    pool = [i for i in candidates if sinks <= i < npages - 1]
    pool.sort(key=lambda i: (seq.scores.get(i, math.inf), i))
    return sorted(pool[:excess])


def drop_pages(seq: Sequence, drops: list[int], cut: int) -> None:
    """Release the held pages among `drops` and make the pages above `cut` private."""
    ns = seq.ns
    for i in reversed(drops):  # leaves first
        if i < len(seq.pages):
            page = seq.pages[i]
            if page is not None:
                if page.state is PageState.RESERVED:
                    ns.free_reserved(page)
                else:
                    ns.unref(page)  # stays cached for others
                    if page.refcount == 0 and page.children:
                        ns.held_up.add(page)  # may sit under this sequence's later pages
                seq.pages[i] = None
                seq.held -= 1
        seq.scores.pop(i, None)
    ns.budget_dropped_pages += len(drops)
    if seq.options.mode == SLIDING_WINDOW:
        seq.window_lo = max(seq.window_lo, drops[-1] + 1)
    # Reserved pages above the new cut lose their hash: they can never be sealed. Those
    # above an older cut lost it then.
    upper = len(seq.pages) if seq.cut is None else seq.cut
    for i in range(cut + 1, upper):
        page = seq.pages[i]
        if page is not None and page.state is PageState.RESERVED:
            page.block_hash = None
    seq.cut = cut
