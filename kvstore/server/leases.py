"""Lease expiry that never blames a client for the daemon's own stalls.

A session without a KeepAlive stream lives as long as its Heartbeats come in. While the event
loop stands still (a long call that holds it or the GIL, the process stopped or swapped out),
heartbeats queue up unread; when it moves again the reaper's timer is due at once, before the
queued heartbeats are read. So the store's clock (`LoopClock`) leaves out the time the loop
stood still, which the reaper measures as how late its own timer fired."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from kvstore.store.store import Store

log = logging.getLogger(__name__)

STALL_MIN_S = 0.01  # later than this is a stall; less is scheduling noise
STALL_LOGGED_S = 0.5


class LoopClock:
    """time.monotonic() less the loop's measured stalls; never goes back."""

    def __init__(self, raw: Callable[[], float] = time.monotonic) -> None:
        self._raw = raw
        self._last = raw()
        self.stalled_s = 0.0  # the sum of stalls noted so far

    def __call__(self) -> float:
        self._last = max(self._last, self._raw() - self.stalled_s)
        return self._last

    def note_stall(self, seconds: float) -> None:
        self.stalled_s += seconds


async def reap_leases(store: Store, clock: LoopClock) -> None:
    """End the sessions of clients that stopped renewing their lease (crashed or hung)."""
    loop = asyncio.get_running_loop()
    while True:
        interval = store.lease_check_interval_s
        t0 = loop.time()
        await asyncio.sleep(interval)
        late = loop.time() - t0 - interval
        if late > STALL_MIN_S:
            clock.note_stall(late)
            if late > STALL_LOGGED_S:
                log.warning("the event loop stood still for %.2fs: leases are extended by as much", late)
        try:
            store.reap_expired()
        except Exception:
            # One failed pass must not end lease expiry for the rest of the daemon's life.
            log.exception("lease check failed")
