"""The lookups' remembered page hashes as metrics (docs/hashing.md, "Remembered hashes";
docs/observability.md): kvstore_hash_memo_*.

Unlike the rest of metrics.py this reads at scrape time, from prometheus_client's thread:
`HashMemo.stats()` is one C call made under the GIL, so it never sees a lookup half done
and touches no Python state of the loop's."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvstore.hashing import memo_stats

if TYPE_CHECKING:  # (absent where the C module is not built: then the memo is None)
    from kvstore._chainhash import HashMemo

COUNTERS = {
    "hits": "pages a lookup found in the remembered hashes (not hashed again)",
    "misses": "pages a lookup hashed (and then remembered)",
    "evictions": "remembered hashes forgotten to stay within hash_memo_entries and hash_memo_bytes",
}
GAUGES = {
    "entries": "remembered page hashes held now",
    "bytes": "memory the remembered page hashes take now (table, hash inputs, digests)",
    "max_entries": "most remembered page hashes (0: off)",
    "max_bytes": "most memory the remembered page hashes may take (0: off)",
}


class HashMemoCollector(Collector):
    def __init__(self, memo: HashMemo | None) -> None:
        self.memo = memo

    def collect(self) -> Iterator[Any]:
        s = memo_stats(self.memo)
        for key, help in COUNTERS.items():
            yield CounterMetricFamily(f"kvstore_hash_memo_{key}", help, value=s[key])
        for key, help in GAUGES.items():
            yield GaugeMetricFamily(f"kvstore_hash_memo_{key}", help, value=s[key])
