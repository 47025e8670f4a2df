"""Typed client errors. The daemon aborts with a gRPC status code and a message
naming the field, value and limit; `from_rpc_error` turns that into one class
per code so callers catch `ResourceExhausted`, not `grpc.RpcError` + `.code()`."""

from __future__ import annotations

from typing import ClassVar

import grpc

_BY_CODE: dict[grpc.StatusCode, type[KVStoreClientError]] = {}  # filled by __init_subclass__


class KVStoreClientError(Exception):
    """Base of every error this client raises.

    `code` is the gRPC status code (None for errors raised without one, e.g. a pool
    that cannot be mapped); `details` is the daemon's own message.
    """

    default_code: ClassVar[grpc.StatusCode | None] = None

    def __init_subclass__(cls, code: grpc.StatusCode | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.default_code = code
            _BY_CODE[code] = cls

    def __init__(self, details: str, *, code: grpc.StatusCode | None = None) -> None:
        self.code = code if code is not None else self.default_code
        self.details = details
        super().__init__(f"{self.code.name}: {details}" if self.code is not None else details)


class NotFound(KVStoreClientError, code=grpc.StatusCode.NOT_FOUND):
    """A namespace, session, sequence or pin the daemon does not know (any more)."""


class InvalidArgument(KVStoreClientError, code=grpc.StatusCode.INVALID_ARGUMENT):
    """A request that can never succeed as written (also raised client-side for bad token ids)."""


class OutOfRange(KVStoreClientError, code=grpc.StatusCode.OUT_OF_RANGE):
    """A value past a limit the request set, e.g. an append past `max_tokens`."""


class ResourceExhausted(KVStoreClientError, code=grpc.StatusCode.RESOURCE_EXHAUSTED):
    """Not enough free or evictable pages (or another quota) right now: retry or evict."""


class FailedPrecondition(KVStoreClientError, code=grpc.StatusCode.FAILED_PRECONDITION):
    """Well formed, but the object is in the wrong state."""


class PermissionDenied(KVStoreClientError, code=grpc.StatusCode.PERMISSION_DENIED):
    """The session does not own what it names (or the namespace refused this client)."""


class Unauthenticated(PermissionDenied, code=grpc.StatusCode.UNAUTHENTICATED):
    """No or wrong credentials for the namespace (caught by `except PermissionDenied` too)."""


class AlreadyExists(KVStoreClientError, code=grpc.StatusCode.ALREADY_EXISTS):
    """Creating something whose name is taken."""


class DataLoss(KVStoreClientError, code=grpc.StatusCode.DATA_LOSS):
    """Stored KV that cannot be served: a swapped-out page was lost or failed its checksum
    below the pool. The sequence has been emptied: recompute it."""


class Unavailable(KVStoreClientError, code=grpc.StatusCode.UNAVAILABLE):
    """The daemon cannot be reached (not running, wrong socket, shutting down)."""


class DeadlineExceeded(KVStoreClientError, code=grpc.StatusCode.DEADLINE_EXCEEDED):
    """The call's deadline (`timeout_s`) passed before the daemon answered."""


class SessionLost(KVStoreClientError):
    """The KeepAlive stream ended without this client closing it: the daemon has ended
    the session and released everything it held. Open a new client."""


class ShuttingDown(Unavailable, SessionLost):
    """The daemon is shutting down (SIGTERM): every call under way and every later one of this
    session gets this (UNAVAILABLE "daemon shutting down"), and the session is over (it is a
    `SessionLost` too). Connect again once a daemon serves."""


SHUTTING_DOWN = "daemon shutting down"  # the daemon's message; kvstore/server/edge.py


class PinExpired(KVStoreClientError):
    """A get copied its pages out after its pin's deadline (`LookupRequest.pin_ttl_ms`): the
    daemon may have freed and reused those pages meanwhile, so the bytes were not returned.
    Retry (with a longer `pin_ttl_s`, or fewer pages a call)."""


class PoolError(KVStoreClientError):
    """A namespace's pool cannot be mapped (no descriptor: over TCP, no scope, a refused ticket; an
    inconsistent descriptor)."""


class UnsupportedDevice(PoolError, NotImplementedError):
    """The pool (or this use of it) needs what this mapping cannot do: a CPU mapping of a device
    pool, the fake device's whole-pool views."""


def from_status(code: int, details: str) -> KVStoreClientError:
    """The typed error for a status a batch call answers one of its items with (`ItemStatus`)."""
    status = next((c for c in grpc.StatusCode if c.value[0] == code), None)
    if status is None:
        return KVStoreClientError(f"status code {code}: {details}")
    if status == grpc.StatusCode.UNAVAILABLE and details.startswith(SHUTTING_DOWN):
        return ShuttingDown(details, code=status)
    return _BY_CODE.get(status, KVStoreClientError)(details or status.value[1], code=status)


def from_rpc_error(err: grpc.RpcError) -> KVStoreClientError:
    """Map a `grpc.RpcError` (sync) or `grpc.aio.AioRpcError` to the typed error for its code.

    Both expose `code()` and `details()`; an RpcError without them maps to the base
    class with code None. The message is "<CODE_NAME>: <the daemon's text>".
    """
    code = err.code() if callable(getattr(err, "code", None)) else None
    if not isinstance(code, grpc.StatusCode):
        return KVStoreClientError(str(err))
    details = err.details() if callable(getattr(err, "details", None)) else None
    if code == grpc.StatusCode.UNAVAILABLE and (details or "").startswith(SHUTTING_DOWN):
        return ShuttingDown(details or SHUTTING_DOWN, code=code)
    return _BY_CODE.get(code, KVStoreClientError)(details or code.value[1], code=code)
