"""The one table from domain errors to gRPC status codes, and the decorator
that applies it at the edge of every servicer method. What escapes it (a bug)
is answered INTERNAL by the edge, kvstore/server/edge.py."""

from __future__ import annotations

import errno
import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from kvstore import errors

STATUS_OF: dict[type[errors.KVStoreError], grpc.StatusCode] = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.DataLoss: grpc.StatusCode.DATA_LOSS,
    errors.InvariantBroken: grpc.StatusCode.INTERNAL,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}
# An OSError from creating or backing a pool: its errno says what the client can do.
STATUS_OF_ERRNO = {
    errno.EEXIST: grpc.StatusCode.ALREADY_EXISTS,
    errno.ENOSPC: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.ENOMEM: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.EDQUOT: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.EMFILE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.ENFILE: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

R = TypeVar("R")


def status_of(error: errors.KVStoreError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


def status_and_message(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status a failed call answers with; INTERNAL means a bug in the daemon."""
    if isinstance(error, errors.KVStoreError):
        return status_of(error), str(error)
    if isinstance(error, OSError):
        # Other OS errors (EIO, ...) are the host's trouble, not the request's: retry later.
        code = STATUS_OF_ERRNO.get(error.errno or 0, grpc.StatusCode.UNAVAILABLE)
        return code, str(error)
    if isinstance(error, NotImplementedError):  # a method a servicer (e.g. Health.List) lacks
        return grpc.StatusCode.UNIMPLEMENTED, str(error) or "method not implemented"
    return grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}"


async def abort_for(context: grpc.aio.ServicerContext, error: errors.KVStoreError) -> None:
    """Abort the call with the mapped status and the error's own message (raises)."""
    await context.abort(status_of(error), str(error))


def grpc_errors(
    method: Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]]:
    """Abort with the mapped status and the error's own message. Broken invariants and the
    unexpected go on to the edge (kvstore/server/edge.py), which logs and counts them."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await method(self, request, context)
        except (errors.KVStoreError, OSError) as e:
            code, message = status_and_message(e)
            if code == grpc.StatusCode.INTERNAL:
                raise
            await context.abort(code, f"{method.__name__}: {message}" if isinstance(e, OSError) else message)
        raise AssertionError("unreachable: context.abort raises")

    return wrapper
