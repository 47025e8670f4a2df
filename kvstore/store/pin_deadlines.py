"""Pins that end by themselves (LookupRequest.pin_ttl_ms): their deadlines, soonest first.

Deadlines are CLOCK_MONOTONIC nanoseconds (`time.monotonic_ns`): the client and the daemon
are on one host and read the same clock, it never jumps (wall time does, with NTP), and it
keeps running while the daemon stands still. The lease clock (server/leases.py) leaves the
daemon's stalls out to spare clients; a pin's deadline is the opposite promise, to a reader
about real time, so a pinned page is freed only once this clock has passed its deadline."""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable


class PinDeadlines:
    """(deadline ns, session id, pin id) entries. An entry whose pin was released meanwhile
    (explicitly, or with its session) is skipped by the store when it comes due."""

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.clock = clock
        self._heap: list[tuple[int, int, int]] = []
        self.expired = 0  # pins released by their deadline since start (counted by the store)

    def add(self, sid: int, pin_id: int, ttl_ns: int) -> int:
        """Note a pin's deadline, `ttl_ns` from now; returns it."""
        deadline = self.clock() + ttl_ns
        heapq.heappush(self._heap, (deadline, sid, pin_id))
        return deadline

    def due(self) -> list[tuple[int, int]]:
        """(session id, pin id) of every deadline passed, taken off. O(1) when none is due, so
        every call that may need room checks first."""
        heap = self._heap
        if not heap or heap[0][0] > self.clock():
            return []
        now, out = self.clock(), []
        while heap and heap[0][0] <= now:
            _, sid, pin_id = heapq.heappop(heap)
            out.append((sid, pin_id))
        return out

    def __len__(self) -> int:
        return len(self._heap)
