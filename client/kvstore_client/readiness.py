"""Wait until a daemon answers SERVING on its health service: for engines that
start beside a sidecar, and for anything that starts the daemon itself."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .errors import Unavailable
from .target import resolve_target

SERVING = health_pb2.HealthCheckResponse.SERVING
# Retry the connection often: a starting daemon creates its socket only once its pools exist.
_FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 20),
    ("grpc.min_reconnect_backoff_ms", 20),
    ("grpc.max_reconnect_backoff_ms", 100),
]


def wait_until_serving(
    target: str | None = None, timeout_s: float = 30.0, *, still_starting: Callable[[], bool] | None = None
) -> float:
    """Block until the daemon at `target` reports SERVING; returns the seconds waited.

    `still_starting` (e.g. "the daemon process has not exited") is asked between attempts;
    when it returns False the wait ends at once. Raises `Unavailable` on either failure."""
    target = resolve_target(target)
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    with grpc.insecure_channel(target, options=_FAST_RECONNECT) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if still_starting is not None and not still_starting():
                raise Unavailable(f"the daemon at {target} stopped before it was SERVING")
            left = deadline - time.monotonic()
            if left <= 0:
                raise Unavailable(f"the daemon at {target} was not SERVING after {timeout_s:g}s")
            # Watch streams each status change, so nothing polls on a timer; its short deadline
            # only bounds how long a daemon that died goes unnoticed.
            watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=min(left, 0.5), wait_for_ready=True)
            try:
                if any(reply.status == SERVING for reply in watch):
                    return time.monotonic() - t0
            except grpc.RpcError as e:
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise Unavailable(f"health check of {target}: {e.code().name}: {e.details()}") from e
            finally:
                watch.cancel()
