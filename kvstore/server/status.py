"""The one table from domain errors to gRPC status codes, and the decorator
that applies it at the edge of every servicer method."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from kvstore import errors

log = logging.getLogger(__name__)

STATUS_OF: dict[type[errors.KVStoreError], grpc.StatusCode] = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.DataLoss: grpc.StatusCode.DATA_LOSS,
}

R = TypeVar("R")


def status_of(error: errors.KVStoreError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


async def abort_for(context: grpc.aio.ServicerContext, error: errors.KVStoreError) -> None:
    """Abort the call with the mapped status and the error's own message (raises)."""
    await context.abort(status_of(error), str(error))


def grpc_errors(
    method: Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]]:
    """Abort with the mapped status and the error's own message; log the unexpected."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await method(self, request, context)
        except errors.KVStoreError as e:
            await abort_for(context, e)
        except OSError as e:
            log.exception("%s failed", method.__name__)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{method.__name__}: {e}")
        raise AssertionError("unreachable: context.abort raises")

    return wrapper
