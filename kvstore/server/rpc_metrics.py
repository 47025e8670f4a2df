"""Per-method RPC metrics, observed once per call by the edge (kvstore/server/edge.py):
`kvstore_rpc_duration_seconds{method}` (unary calls' latency, a histogram) and
`kvstore_rpc_calls_total{method,code}` (every call, unary or stream, by its final status).

The call path is hot, so the counts are plain ints in one object per method, bound when the
edge wraps the method: a call costs a `bisect` and three increments on the loop (about
0.3 µs; prometheus_client's children took ~2 µs, a lock and a Python loop over the buckets
each). The HTTP thread reads them through a collector: under the GIL a copy of a list or of
a dict's items is atomic, and a histogram's count is the sum of the bucket copy, so a scrape
never shows a count that disagrees with its buckets.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator

import grpc
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

# From a cached lookup (~50 µs) to a flush of a large pool (seconds).
BUCKETS_S = (
    *(50e-6, 100e-6, 250e-6, 500e-6),
    *(1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3),
    *(1.0, 2.5, 5.0, 10.0),
)
_LE = (*(floatToGoString(b) for b in BUCKETS_S), "+Inf")
SECONDS_HELP = "time from a unary call's request parsed to its reply or status, by method"
CALLS_HELP = "calls ended, by method and status code (OK included; streams when they end)"


def method_label(method: str) -> str:
    """'/kvstore.v1.KVStore/Lookup' -> 'KVStore/Lookup' (the service's short name, the method)."""
    service, _, name = method.lstrip("/").partition("/")
    return f"{service.rsplit('.', 1)[-1]}/{name}"


class MethodMetrics:
    """One method's counts: calls by code name, and (unary methods) a latency histogram."""

    __slots__ = ("buckets", "codes", "label", "observe", "ok", "seconds")

    def __init__(self, label: str, timed: bool) -> None:
        self.label = label
        self.codes: dict[str, int] = {"OK": 0}  # (OK present from the start, at 0)
        self.buckets = [0] * len(_LE)  # calls with latency <= BUCKETS_S[i]; the last: above them all
        self.seconds = 0.0
        # None for streams: a KeepAlive stream lasts a session, not a call.
        self.observe: Callable[[float], None] | None = self._observe if timed else None
        self.ok: Callable[[], None] = self._ok

    def _observe(self, seconds: float) -> None:
        self.buckets[bisect_left(BUCKETS_S, seconds)] += 1
        self.seconds += seconds

    def _ok(self) -> None:
        self.codes["OK"] += 1

    def observe_ok(self, seconds: float) -> None:
        """`observe` and `ok` of a unary call that ended OK, in one call (every Lookup's)."""
        self.buckets[bisect_left(BUCKETS_S, seconds)] += 1
        self.seconds += seconds
        self.codes["OK"] += 1

    def ended(self, code: grpc.StatusCode | None) -> None:
        """Count a call that ended with `code` (None: the call set none, which grpc sends as OK)."""
        name = code.name if code is not None else "OK"
        codes = self.codes
        codes[name] = codes.get(name, 0) + 1


class RpcMetrics:
    """Every method's MethodMetrics; counted whether metrics are served or not (Stats reports
    them too), exposed once `register`ed with the metrics server's registry."""

    def __init__(self) -> None:
        self._methods: list[MethodMetrics] = []

    def register(self, registry: CollectorRegistry) -> None:
        registry.register(_Collector(self._methods))

    def method(self, method: str, timed: bool) -> MethodMetrics:
        m = MethodMetrics(method_label(method), timed)
        self._methods.append(m)
        return m

    def counts(self) -> list[tuple[str, str, int]]:
        """(method, code, calls) of every pair with a call, for Stats."""
        return sorted((m.label, code, n) for m in self._methods for code, n in list(m.codes.items()) if n)


class _Collector:
    """Read on the HTTP thread, while the loop counts."""

    def __init__(self, methods: list[MethodMetrics]) -> None:
        self._methods = methods

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily("kvstore_rpc_duration_seconds", SECONDS_HELP, labels=["method"])
        yield CounterMetricFamily("kvstore_rpc_calls", CALLS_HELP, labels=["method", "code"])

    def collect(self) -> Iterator[Metric]:
        seconds = HistogramMetricFamily("kvstore_rpc_duration_seconds", SECONDS_HELP, labels=["method"])
        calls = CounterMetricFamily("kvstore_rpc_calls", CALLS_HELP, labels=["method", "code"])
        for m in list(self._methods):
            for code, n in list(m.codes.items()):
                calls.add_metric([m.label, code], n)
            if m.observe is not None:
                counts, total, cumulative = list(m.buckets), m.seconds, []
                running = 0
                for le, n in zip(_LE, counts, strict=True):
                    running += n
                    cumulative.append((le, running))
                seconds.add_metric([m.label], cumulative, total)
        yield seconds
        yield calls
