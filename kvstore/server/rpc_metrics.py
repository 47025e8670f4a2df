"""Per-method RPC metrics, observed once per call by the edge (kvstore/server/edge.py):
`kvstore_rpc_duration_seconds{method}` (unary calls' latency, a histogram) and
`kvstore_rpc_calls_total{method,code}` (every call, unary or stream, by its final status).

The call path is hot, so each method's histogram child and its OK counter child are bound
once, when the edge wraps the method: a call costs one `observe` and one `inc` (about 1-2 µs
here, docs/observability.md). The child of an error code is bound at its first use.
prometheus_client's values take a lock each, so the HTTP thread may collect them while the
loop observes.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

# From a cached lookup (~50 µs) to a flush of a large pool (seconds).
BUCKETS_S = (
    *(50e-6, 100e-6, 250e-6, 500e-6),
    *(1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3),
    *(1.0, 2.5, 5.0, 10.0),
)


def method_label(method: str) -> str:
    """'/kvstore.v1.KVStore/Lookup' -> 'KVStore/Lookup' (the service's short name, the method)."""
    service, _, name = method.lstrip("/").partition("/")
    return f"{service.rsplit('.', 1)[-1]}/{name}"


class MethodMetrics:
    """One method's pre-bound children."""

    __slots__ = ("_codes", "_counter", "_label", "observe", "ok")

    def __init__(self, counter: Counter, observe: Callable[[float], None] | None, label: str) -> None:
        self._counter = counter
        self._label = label
        self._codes: dict[str, Callable[[], None]] = {}
        self.observe = observe  # None for streams: a KeepAlive stream lasts a session, not a call
        self.ok: Callable[[], None] = counter.labels(label, "OK").inc

    def ended(self, code: grpc.StatusCode | None) -> None:
        """Count a call that ended with `code` (None: the call set none, which grpc sends as OK)."""
        name = code.name if code is not None else "OK"
        inc = self._codes.get(name)
        if inc is None:
            inc = self._codes[name] = self._counter.labels(self._label, name).inc
        inc()


class RpcMetrics:
    def __init__(self) -> None:
        # Registered with the metrics server's registry when it starts (MetricsServer.start);
        # counted whether it serves or not: Stats reports them too.
        self.seconds = Histogram(
            "kvstore_rpc_duration_seconds",
            "time from a unary call's request parsed to its reply or status, by method",
            ["method"],
            buckets=BUCKETS_S,
            registry=None,
        )
        self.calls = Counter(
            "kvstore_rpc_calls",
            "calls ended, by method and status code (OK included; streams when they end)",
            ["method", "code"],
            registry=None,
        )

    def register(self, registry: CollectorRegistry) -> None:
        registry.register(self.seconds)
        registry.register(self.calls)

    def method(self, method: str, timed: bool) -> MethodMetrics:
        label = method_label(method)
        observe = self.seconds.labels(label).observe if timed else None
        return MethodMetrics(self.calls, observe, label)

    def counts(self) -> list[tuple[str, str, int]]:
        """(method, code, calls) of every pair with a call, for Stats."""
        out = []
        for family in self.calls.collect():
            for s in family.samples:
                if s.name.endswith("_total") and s.value:
                    out.append((s.labels["method"], s.labels["code"], int(s.value)))
        return sorted(out)
