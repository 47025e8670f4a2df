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


async def device_pools_unmapped(store: Store, grace: float) -> None:
    """Device pools: the KeepAlive streams have ended (UNAVAILABLE "daemon shutting down"),
    so clients synchronize and close their mappings; give them `grace` to, before the
    memory is freed (cudaFree under an importer's mapping is undefined). A backend that can
    tell (the fake device counts its mappers) ends the wait early; CUDA cannot say who maps
    a handle, so a daemon with a CUDA pool waits the whole grace."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    pools = [ns.pool for ns in store.namespaces.values() if ns.pool.handle.on_device]
    while pools and loop.time() < deadline:
        pools = [p for p in pools if p.still_mapped() is not False]
        if pools:
            await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
    if pools:
        log.warning(
            "shutdown: %d device pool(s) may still be mapped by clients after %.1fs", len(pools), grace
        )


async def close_store(store: Store) -> None:
    """End the sessions on the loop (loop-owned state), then close the tiers and the pools in
    a thread: the disk writer's last commit and fsync, or a re-index that stops, may take a
    while (up to 30 s each), and the loop goes on answering meanwhile."""
    for sid in list(store.sessions):
        store.close_session(sid, "daemon shut down")
    await asyncio.to_thread(store.close)
