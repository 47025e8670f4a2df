"""Steps of the daemon's shutdown that must neither block the event loop nor leave a caller
with anything but UNAVAILABLE "daemon shutting down" (see edge.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable

from kvstore.store.store import Store

log = logging.getLogger(__name__)


async def step(what: str, aw: Awaitable[object], timeout: float) -> bool:
    """Await one shutdown step, bounded; log how it went. False if it failed or timed out."""
    t0 = time.monotonic()
    try:
        await asyncio.wait_for(aw, timeout)
    except TimeoutError:
        log.error("shutdown: timed out after %.1fs waiting for: %s", timeout, what)
        return False
    except Exception:
        log.exception("shutdown: failed: %s", what)
        return False
    log.info("shutdown: %s in %.2fs", what, time.monotonic() - t0)
    return True


async def close_store(store: Store) -> None:
    """End the sessions on the loop (loop-owned state), then close the tiers and the pools in
    a thread: the disk writer's last commit and fsync, or a re-index that stops, may take a
    while (up to 30 s each), and the loop goes on answering meanwhile."""
    for sid in list(store.sessions):
        store.close_session(sid, "daemon shut down")
    await asyncio.to_thread(store.close)
