"""Python's cyclic GC pauses as metrics (docs/observability.md): kvstore_gc_pauses_total,
kvstore_gc_pause_seconds_total and kvstore_gc_pause_max_seconds, by generation.

A collection stops every thread that wants the GIL, the loop included, so its length is a
floor under any call's latency while it runs; the daemon freezes what start built
(daemon.freeze_startup_heap) so that full collections stay short, and these say whether
they do. Counted from `gc.callbacks` in whichever thread collects (plain ints, under the
GIL: a scrape on the HTTP thread copies them)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from time import perf_counter
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

GENERATIONS = (0, 1, 2)


class GcPauses(Collector):
    """Installed once (`install`) for the process; `collect` is prometheus_client's."""

    def __init__(self) -> None:
        self.pauses = [0] * len(GENERATIONS)
        self.seconds = [0.0] * len(GENERATIONS)
        self.longest = [0.0] * len(GENERATIONS)
        self._started = 0.0

    def install(self) -> GcPauses:
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)
        return self

    def uninstall(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = perf_counter()
            return
        g = info["generation"]
        took = perf_counter() - self._started
        self.pauses[g] += 1
        self.seconds[g] += took
        if took > self.longest[g]:
            self.longest[g] = took

    def collect(self) -> Iterator[Any]:
        pauses = CounterMetricFamily(
            "kvstore_gc_pauses",
            "Python cyclic GC collections, by generation (2: full)",
            labels=["generation"],
        )
        seconds = CounterMetricFamily(
            "kvstore_gc_pause_seconds", "time spent in them, by generation", labels=["generation"]
        )
        longest = GaugeMetricFamily(
            "kvstore_gc_pause_max_seconds",
            "the longest one since the metrics server started, by generation",
            labels=["generation"],
        )
        for g in GENERATIONS:
            pauses.add_metric([str(g)], self.pauses[g])
            seconds.add_metric([str(g)], self.seconds[g])
            longest.add_metric([str(g)], self.longest[g])
        yield pauses
        yield seconds
        yield longest
