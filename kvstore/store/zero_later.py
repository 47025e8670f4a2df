"""Dirty pages a call takes, zeroed off the loop before its reply (docs/security.md, "Zero on
free"). A freed page is zeroed by the integrity thread in batches; one taken before its turn
used to be zeroed on the loop as it was taken (~40 us a 737,280 B page, every other call
waiting). Within `deferred()` (the fast path's Reserve, Seal and Put: their pages reach the
client only in the reply) such pages are zeroed on the zeroing threads instead, a share
each, and `settle` waits for them before the reply is sent: the reply waits, the loop does
not. Until then the pages are marked with their job (`Page.zeroing`), so a page freed and
taken again meanwhile waits for it as it would for the integrity thread's batch.

The collector is a module global set around synchronous code only (no await inside), so
calls interleaving on the loop never see each other's.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from kvstore.store.integrity_jobs import Batch, tracked, work

THREADS = max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))

_current: list[tuple[Any, Any]] | None = None  # (guard, batch) of the call running now


@contextlib.contextmanager
def deferred() -> Iterator[list[tuple[Any, Any]]]:
    """Collect the zeroing jobs of the synchronous code inside: hand them to `settle`."""
    global _current
    outer, _current = _current, []
    try:
        yield _current
    finally:
        _current = outer


def collect(guard: Any, pages: list[Any]) -> bool:
    """NamespaceGuard.zero_now: off the loop if a call collects (True), else False."""
    if _current is None:
        return False
    _current.extend((guard, batch) for batch in zero_off_loop(guard, pages))
    return True


def zero_off_loop(guard: Any, pages: list[Any]) -> list[Batch]:
    """Submit jobs zeroing `pages` (taken, dirty) on the zeroing threads, a share each; the
    pages stay dirty, marked with their job, until `guard.zeroed` (when the job is done)."""
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


async def settle(jobs: list[tuple[Any, Any]]) -> None:
    """Wait for `jobs`; a page a failed job left dirty is zeroed on the loop (never sent dirty)."""
    import asyncio

    for guard, batch in jobs:
        with contextlib.suppress(Exception):  # (its error: handled below)
            await asyncio.shield(asyncio.wrap_future(batch.future))
        guard.zeroed(batch, wait=True)
        if batch.future.exception() is not None:
            guard.zero_inline([p for p in batch.pages if p.dirty and p.zeroing is None])
