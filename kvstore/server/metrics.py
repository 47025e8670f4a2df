"""Prometheus metrics at http://HOST:PORT/metrics (config `server.metrics`).

The HTTP server runs in prometheus_client's thread, which must not read the
loop-owned store. The loop publishes an immutable snapshot of the stats every
`interval_s`; a scrape reads only that snapshot (an atomic reference swap).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvstore.store.store import Store
from kvstore.store.types import NamespaceStats

log = logging.getLogger(__name__)

PAGE_STATES = ("free", "reserved", "sealed", "pinned")
COUNTERS = {  # NamespaceStats field -> (metric name, help)
    "hit_tokens": ("kvstore_hit_tokens", "prompt tokens found cached by lookups"),
    "miss_tokens": ("kvstore_miss_tokens", "prompt tokens lookups did not find"),
    "lookups": ("kvstore_lookups", "lookup calls"),
    "evictions": ("kvstore_evictions", "pages evicted"),
    "deduplicated_pages": (
        "kvstore_deduplicated_pages",
        "pages freed because another sequence sealed them first",
    ),
}


class StatsCollector(Collector):
    def __init__(self) -> None:
        self.snapshot: tuple[list[NamespaceStats], int] = ([], 0)  # replaced whole by the loop

    def collect(self) -> Iterator[Any]:
        namespaces, sessions = self.snapshot
        pages = GaugeMetricFamily("kvstore_pages", "pool pages by state", labels=["namespace", "state"])
        total = GaugeMetricFamily("kvstore_pages_total", "pool pages", labels=["namespace"])
        page_bytes = GaugeMetricFamily("kvstore_page_bytes", "bytes of KV in one page", labels=["namespace"])
        sequences = GaugeMetricFamily("kvstore_sequences", "live sequences", labels=["namespace"])
        counters = {
            field: CounterMetricFamily(name, help, labels=["namespace"])
            for field, (name, help) in COUNTERS.items()
        }
        for s in namespaces:
            values = asdict(s)
            for state in PAGE_STATES:
                pages.add_metric([s.name, state], values[f"pages_{state}"])
            total.add_metric([s.name], s.pages_total)
            page_bytes.add_metric([s.name], s.page_bytes)
            sequences.add_metric([s.name], s.sequences)
            for field, family in counters.items():
                family.add_metric([s.name], values[field])
        yield from (pages, total, page_bytes, sequences, *counters.values())
        yield GaugeMetricFamily("kvstore_sessions", "open client sessions", value=sessions)


class MetricsServer:
    def __init__(self, store: Store, host: str, port: int, interval_s: float = 1.0) -> None:
        self.store = store
        self.host = host
        self.port = port
        self.interval_s = interval_s
        self.collector = StatsCollector()
        self._httpd: Any = None

    def start(self) -> int:
        """Start serving; returns the bound port (useful with port 0)."""
        registry = CollectorRegistry()
        registry.register(self.collector)
        self.publish()
        self._httpd, _ = start_http_server(self.port, self.host, registry)
        self.port = self._httpd.server_port
        log.info("metrics: serving Prometheus metrics on http://%s:%d/metrics", self.host, self.port)
        return self.port

    def publish(self) -> None:
        """Loop side: replace the snapshot the HTTP thread reads."""
        self.collector.snapshot = (self.store.stats(), len(self.store.sessions))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.publish()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
