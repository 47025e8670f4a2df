"""How `kvstore-bench gpu` and its parts time a copy: CUDA events on the current stream, or the
wall clock for host-synchronous work; the median of the passes after a warm-up."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def timed(torch: Any, fn: Callable[[], Any], repeat: int) -> float:
    """Median seconds of `fn` on the current stream, after one warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def wall(fn: Callable[[], Any], repeat: int) -> float:
    """Median wall seconds of a host-synchronous `fn` (the staging path syncs itself)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
