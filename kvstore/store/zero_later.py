"""Dirty pages a call takes, zeroed off the loop before its reply (docs/security.md, "Zero on
free"). A freed page is zeroed by the integrity thread in batches; one taken before its turn
used to be zeroed on the loop as it was taken (~40 us a 737,280 B page), and one taken while
the thread's batch held it made the loop wait for that whole batch (up to 32 MiB: ~3 ms, 0.46
ms a 16-page put on average in `peers-profile`), every other call waiting too. Within
`deferred()` (the fast path's Reserve, Seal and Put: their pages reach the client only in the
reply) the dirty pages are zeroed on the zeroing threads instead, a share each, and `settle`
waits for those jobs and for any batch already zeroing one of the pages before the reply is
sent: the reply waits, the loop does not. Until then the pages are marked with their job
(`Page.zeroing`), so a page freed and taken again meanwhile waits for it as it would for the
integrity thread's batch.

The collector is a module global set around synchronous code only (no await inside), so
calls interleaving on the loop never see each other's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from typing import Any

from kvstore.memory.pages import FREE
from kvstore.store.integrity_jobs import Batch, tracked, work

THREADS = max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))

_current: list[tuple[Any, Any, list[Any]]] | None = None  # (guard, job, its pages) of the call now


@contextlib.contextmanager
def deferred() -> Iterator[list[tuple[Any, Any, list[Any]]]]:
    """Collect the zeroing jobs of the synchronous code inside: hand them to `settle`."""
    global _current
    outer, _current = _current, []
    try:
        yield _current
    finally:
        _current = outer


def collect(guard: Any, pages: list[Any], busy: set[Any]) -> bool:
    """NamespaceGuard.zero_now, for `pages` being taken, `busy` the jobs zeroing some of them
    now: if a call collects (True), its reply will wait for those jobs and for new ones
    zeroing the other dirty pages off the loop; else False (the loop does it all)."""
    if _current is None:
        return False
    for batch in busy:
        _current.append((guard, batch, [p for p in pages if p.zeroing is batch]))
    dirty = [p for p in pages if p.dirty and p.zeroing is None]
    if dirty:
        _current.extend((guard, batch, batch.pages) for batch in zero_off_loop(guard, dirty))
    return True


def zero_off_loop(guard: Any, pages: list[Any]) -> list[Batch]:
    """Submit jobs zeroing `pages` (dirty: taken by a call, or freed ahead of a credit,
    zero_ahead.py) on the zeroing threads, a share each; the pages stay dirty, marked with
    their job, until `guard.zeroed` (when the job is done)."""
    pool = guard.service.zero_pool
    shares = min(THREADS, len(pages))
    batches = []
    for i in range(shares):
        batch = Batch()
        batch.pages = pages[i::shares]
        views = [guard.view(p) for p in batch.pages]
        try:
            batch.future = pool.submit(work, [], views, [])
        except RuntimeError:  # (closed: the daemon is stopping) zeroed on the loop
            for view in views:
                view.release()
            guard.zero_inline(batch.pages)
            continue
        for page in batch.pages:
            page.zeroing = batch
        tracked(guard.ns, batch.future).add_done_callback(lambda _, b=batch: guard.zeroed(b, wait=True))
        batches.append(batch)
    return batches


async def settle(jobs: list[tuple[Any, Any, list[Any]]]) -> None:
    """Wait for `jobs` (guard, job, the call's pages in it); a page of the call's that a failed
    job left dirty is zeroed on the loop then: never handed out dirty. Counted once a reply
    per namespace (`replies_waited_zeroing`: the zeroing was behind the calls)."""
    for guard in {g for g, _, _ in jobs}:  # (NamespaceGuard: hashed by identity)
        guard.counts["replies_waited_zeroing"] += 1
    for guard, batch, pages in jobs:
        with contextlib.suppress(Exception):  # (its error: handled below)
            await asyncio.shield(asyncio.wrap_future(batch.future))
        guard.zeroed(batch, wait=True)
        left = [p for p in pages if p.dirty and p.zeroing is None and p.state is not FREE]
        if left:  # (its job failed)
            guard.zero_inline(left)
