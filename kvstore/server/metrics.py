"""Prometheus metrics at http://HOST:PORT/metrics (config `server.metrics`).

The HTTP server runs in prometheus_client's thread, which must not read the
loop-owned store. The loop publishes an immutable snapshot of the stats every
`interval_s`; a scrape reads only that snapshot (an atomic reference swap).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import asdict, replace
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvstore.server import metrics_http
from kvstore.server.edge import EdgeCounts
from kvstore.server.gc_metrics import GcPauses
from kvstore.server.lane_counts import LaneCounts
from kvstore.server.memo_metrics import HashMemoCollector
from kvstore.server.ops_stats import build_labels
from kvstore.server.pool_refusals import PoolSocketCounts
from kvstore.server.rpc_metrics import RpcMetrics
from kvstore.store.store import Store
from kvstore.store.types import NamespaceStats
from kvstore.tokens import Tokens

log = logging.getLogger(__name__)

PAGE_STATES = (
    "free",
    "free_unzeroed",
    "reserved",
    "sealed",
    "pinned",
    "quarantined",
)  # (free_unzeroed: of free, host pools; quarantined: device pools, of reserved)
COUNTERS = {  # NamespaceStats field -> (metric name, help)
    "hit_tokens": ("kvstore_hit_tokens", "prompt tokens found cached by lookups"),
    "miss_tokens": ("kvstore_miss_tokens", "prompt tokens lookups did not find"),
    "lookups": ("kvstore_lookups", "lookup calls"),
    "evictions": ("kvstore_evictions", "pages evicted"),
    "deduplicated_pages": (
        "kvstore_deduplicated_pages",
        "pages freed because another sequence sealed them first",
    ),
    "committed_bytes": ("kvstore_committed_bytes", "KV bytes clients committed into the pool (whole pages)"),
    "hit_bytes": ("kvstore_hit_bytes", "KV bytes lookups found in the pool or below it (whole pages)"),
    "pages_corrupt": (
        "kvstore_pages_corrupt",
        "sealed pages whose bytes changed after the seal (scrubber, or a copy below): dropped",
    ),
    "pages_scrubbed": ("kvstore_pages_scrubbed", "sealed pages the scrubber re-verified"),
    "share_evictions": (
        "kvstore_share_evictions",
        "its pages moved down or out of the host or disk tier because it was at its tier_share",
    ),
    "copies_refused": ("kvstore_copies_refused", "copies below the pool refused: the page was corrupt"),
    "pages_zeroed_inline": (
        "kvstore_pages_zeroed_inline",
        "freed pages zeroed on the loop as they were handed out again (not zeroed in the background yet)",
    ),
    "pages_unchecked": (
        "kvstore_pages_unchecked",
        "sealed pages that left the pool (evicted, copied below, dropped) before their checksum was taken",
    ),
    "replies_waited_zeroing": (
        "kvstore_replies_waited_zeroing",
        "Reserve, Seal and Put replies that waited for pages they took to be zeroed (not zeroed yet)",
    ),
    "pages_sums_given": (
        "kvstore_pages_sums_given",
        "pages sealed with the checksum their writer took as it copied them (Put page_sums): not read again",
    ),
}


# Tiers below the pools (kvstore/store/tiering/tiers.py `Tiers.stats()`): counters, then gauges.
TIER_COUNTERS = {
    "demoted": ("kvstore_tier_demoted_pages", "pages copied below the pool when it evicted them"),
    "promoted": ("kvstore_tier_promoted_pages", "pages brought back into the pool from a tier"),
    "prefetched": ("kvstore_tier_prefetched_pages", "pages promoted ahead of a lookup asking for them"),
    "promotion_failures": ("kvstore_tier_promotion_failures", "promotions that failed (checksum, vanished)"),
    "corrupt": (
        "kvstore_tier_corrupt_pages",
        "pages below the pool that failed their checksum (never served)",
    ),
    "disk_full_events": ("kvstore_disk_full_events", "times a disk write had to evict from a full disk tier"),
    "disk_io_errors": ("kvstore_disk_io_errors", "disk tier writes that failed with an I/O error"),
    "disk_fs_full_errors": (
        "kvstore_disk_fs_full_errors",
        "disk tier writes that failed because the file system was full",
    ),
    "disk_queue_dropped": (
        "kvstore_disk_queue_dropped_pages",
        "demotions dropped because the disk write queue was full (server.disk_queue_bytes)",
    ),
}


# Quantized tiers (kvstore/store/tiering/quantize.py `TierQuant.stats()`): counters.
QUANT_COUNTERS = {
    "quantized_pages": ("kvstore_tier_quantized_pages", "quantized page records made"),
    "fallbacks": (
        "kvstore_tier_quant_fallbacks",
        "layers stored more precisely than asked because they were over the error bound",
    ),
    "bytes_stored": ("kvstore_tier_quant_bytes_stored", "bytes of the quantized records made"),
    "bytes_represented": ("kvstore_tier_quant_bytes_represented", "bytes of the pool pages they stand for"),
    "quantize_s": ("kvstore_tier_quantize_seconds", "time spent quantizing pages"),
    "dequantized_pages": ("kvstore_tier_dequantized_pages", "quantized records dequantized into a pool"),
    "dequantize_s": ("kvstore_tier_dequantize_seconds", "time spent dequantizing pages"),
    "dequantize_failures": (
        "kvstore_tier_dequantize_failures",
        "quantized records the codec refused (dropped, never served)",
    ),
}
QUANT_PRECISIONS = ("fp", "int8", "int4")


def tier_values(d: dict[str, Any]) -> dict[str, float]:
    host, disk = d.get("host", {}), d.get("disk", {})
    return {
        "demoted": d["demoted_host"] + d["demoted_disk"] + d["demoted_clean"],
        "promoted": d["promoted_host"] + d["promoted_disk"],
        "prefetched": d["prefetched"],
        "promotion_failures": d["promotion_failures"],
        "corrupt": host.get("corrupt", 0) + disk.get("corrupt", 0),
        "disk_full_events": disk.get("disk_full_events", 0),
        "disk_io_errors": disk.get("io_errors", 0),
        "disk_fs_full_errors": disk.get("fs_full_errors", 0),
        "disk_queue_dropped": d.get("disk_queue_dropped", 0),
    }


class StatsCollector(Collector):
    def __init__(self) -> None:
        # Replaced whole by the loop: (namespaces, sessions, Tiers.stats() or None, the edge's
        # counts, kvstore_build_info's labels).
        self.snapshot: tuple[list[NamespaceStats], int, dict[str, Any] | None, EdgeCounts, dict[str, str]] = (
            [],
            0,
            None,
            EdgeCounts(),
            {},
        )

    def collect(self) -> Iterator[Any]:
        namespaces, sessions, tiers, edge, build = self.snapshot
        if build:
            info = GaugeMetricFamily(
                "kvstore_build_info", "1, labelled with what the daemon was built from", labels=list(build)
            )
            info.add_metric(list(build.values()), 1)
            yield info
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
        yield CounterMetricFamily(
            "kvstore_rpc_internal_errors",
            "calls answered INTERNAL (daemon bugs, in its log)",
            value=edge.internal,
        )
        yield CounterMetricFamily(
            "kvstore_rpc_malformed_requests", "requests whose bytes did not parse", value=edge.malformed
        )
        yield from _pool_socket(edge.pool)
        yield from _lane(edge.lane)
        if tiers is not None:
            yield from self._tiers(tiers)

    @staticmethod
    def _tiers(d: dict[str, Any]) -> Iterator[Any]:
        values = tier_values(d)
        for key, (name, help) in TIER_COUNTERS.items():
            yield CounterMetricFamily(name, help, value=values[key])
        used = GaugeMetricFamily("kvstore_tier_bytes_used", "bytes held below the pool", labels=["tier"])
        cap = GaugeMetricFamily("kvstore_tier_capacity_bytes", "capacity of a tier", labels=["tier"])
        held = GaugeMetricFamily("kvstore_tier_pages", "pages held below the pool", labels=["tier"])
        for tier in ("host", "disk"):
            if tier in d:
                used.add_metric([tier], d[tier]["bytes_used"])
                cap.add_metric([tier], d[tier]["capacity_bytes"])
                held.add_metric([tier], d[tier]["pages"])
        represented = GaugeMetricFamily(
            "kvstore_tier_bytes_represented",
            "pool bytes the pages held below the pool stand for (/ bytes_used: the compression)",
            labels=["tier"],
        )
        for tier in ("host", "disk"):
            if tier in d:
                represented.add_metric([tier], d[tier]["bytes_represented"])
        yield from (used, cap, held, represented)
        q = d["quant"]
        for key, (name, help) in QUANT_COUNTERS.items():
            yield CounterMetricFamily(name, help, value=q[key])
        layers = CounterMetricFamily(
            "kvstore_tier_quant_layers",
            "layers of quantized records by the precision stored",
            labels=["precision"],
        )
        for p in QUANT_PRECISIONS:
            layers.add_metric([p], q["layers_" + p])
        yield layers
        disk = d.get("disk", {})
        if disk:
            yield GaugeMetricFamily(
                "kvstore_disk_disabled",
                "1 while the disk tier is disabled by a fault",
                value=bool(disk["disabled"]),
            )
            yield GaugeMetricFamily(
                "kvstore_disk_moved_aside",
                "1 if this start moved a corrupt disk tier aside",
                value=bool(disk["moved_aside"]),
            )
            yield GaugeMetricFamily(
                "kvstore_disk_queued_bytes",
                "bytes of pages waiting for the disk writer",
                value=disk["queued_bytes"],
            )
        yield GaugeMetricFamily(
            "kvstore_swapped_pages", "pages of swapped-out sequences below the pool", value=d["swapped_pages"]
        )
        if disk:
            yield from _reindex(d["reindex"])


def _lane(c: LaneCounts) -> Iterator[Any]:
    yield CounterMetricFamily("kvstore_lane_calls", "calls answered on the lane socket", value=c.calls)
    yield CounterMetricFamily(
        "kvstore_lane_connections", "connections accepted on the lane socket", value=c.connections
    )
    yield GaugeMetricFamily("kvstore_lane_connections_open", "lane connections open now", value=c.open)
    yield CounterMetricFamily(
        "kvstore_lane_refused",
        "lane connections closed for a bad hello or an oversize frame",
        value=c.refused,
    )
    yield CounterMetricFamily(
        "kvstore_lane_puts_followed",
        "Puts sent before their pages were copied whose PutWritten frame came (bytes_follow)",
        value=c.puts_followed,
    )


def _pool_socket(c: PoolSocketCounts) -> Iterator[Any]:
    yield CounterMetricFamily(
        "kvstore_pool_socket_granted", "pool descriptors handed out on the pool socket", value=c.granted
    )
    refused = CounterMetricFamily(
        "kvstore_pool_socket_refused",
        "pool socket requests refused, by reason (pool_refusals.REASONS)",
        labels=["reason"],
    )
    for reason, n in c.refused.items():
        refused.add_metric([reason], n)
    yield refused


def _reindex(r: dict[str, Any]) -> Iterator[Any]:
    """The disk tier's re-index at start (ReindexState): done of total, pages and bytes."""
    yield GaugeMetricFamily(
        "kvstore_disk_reindex_running", "1 while the disk tier is re-indexed", value=r["running"]
    )
    for unit in ("pages", "bytes"):
        done, total = (r["done"], r["total"]) if unit == "pages" else (r["bytes_done"], r["bytes_total"])
        yield GaugeMetricFamily(
            f"kvstore_disk_reindex_{unit}_done", f"{unit} the re-index at start has indexed", value=done
        )
        yield GaugeMetricFamily(
            f"kvstore_disk_reindex_{unit}_total",
            f"{unit} the re-index at start found on disk"
            + (" (estimated until done)" if unit == "bytes" else ""),
            value=total,
        )


class MetricsServer:
    def __init__(
        self,
        store: Store,
        host: str,
        port: int,
        interval_s: float = 1.0,
        edge: EdgeCounts | None = None,
        rpc: RpcMetrics | None = None,
        tokens: Tokens | None = None,
    ) -> None:
        self.store = store
        self.edge = edge or EdgeCounts()
        self.rpc = rpc
        self.tokens = tokens  # with a tokens file, only a token with read on "*" may scrape
        self.host = host
        self.port = port
        self.interval_s = interval_s
        self.collector = StatsCollector()
        self._gc: GcPauses | None = None
        self._httpd: Any = None

    def start(self) -> int:
        """Start serving; returns the bound port (useful with port 0)."""
        registry = CollectorRegistry()
        registry.register(self.collector)
        registry.register(HashMemoCollector(self.store.hash_memo))
        self._gc = GcPauses().install()
        registry.register(self._gc)
        if self.rpc is not None:
            self.rpc.register(registry)
        self.publish()
        self._httpd = metrics_http.serve(registry, self.host, self.port, self.tokens)
        self.port = self._httpd.server_port
        log.info(
            "metrics: serving Prometheus metrics on http://%s:%d/metrics%s",
            self.host,
            self.port,
            " to bearer tokens with read on '*'" if self.tokens is not None else "",
        )
        return self.port

    def publish(self) -> None:
        """Loop side: replace the snapshot the HTTP thread reads."""
        tiers = self.store.tiers
        self.collector.snapshot = (
            self.store.stats(),
            len(self.store.sessions),
            tiers.stats() if tiers is not None else None,
            replace(self.edge, pool=self.edge.pool.copy(), lane=self.edge.lane.copy()),
            build_labels(self.store),
        )

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.publish()

    def stop(self) -> None:
        if self._gc is not None:
            self._gc.uninstall()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
