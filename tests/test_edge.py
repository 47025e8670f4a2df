"""The edge (kvstore/server/edge.py) in process, on a real grpc.aio server over a
unix socket: what a handler raises is what the caller's status says, a bug is INTERNAL (logged,
counted), and shutdown cancels what is still running with UNAVAILABLE "daemon shutting down".
The handlers here stand for servicer methods that fail in ways no black-box request reaches."""

from __future__ import annotations

import asyncio
import errno
import logging
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

from kvstore import errors
from kvstore.server.edge import SHUTTING_DOWN, Edge
from kvstore.server.status import grpc_errors

Code = grpc.StatusCode


class Failing:
    """Methods shaped like a servicer's, each failing its own way."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    @grpc_errors
    async def Bug(self, request: Any, context: Any) -> pb.StatsResponse:
        return {}["missing"]  # KeyError: a bug

    @grpc_errors
    async def Invariant(self, request: Any, context: Any) -> pb.StatsResponse:
        raise errors.InvariantBroken("page 3 is owned twice")

    @grpc_errors
    async def Exists(self, request: Any, context: Any) -> pb.StatsResponse:
        raise FileExistsError(errno.EEXIST, "File exists", "/dev/shm/kvs-x")

    @grpc_errors
    async def Full(self, request: Any, context: Any) -> pb.StatsResponse:
        raise OSError(errno.ENOSPC, "No space left on device")

    def BareFull(self, request: Any, context: Any) -> Awaitable[pb.StatsResponse]:
        """Without grpc_errors, a coroutine handed to the edge (as KVStore.Lookup is)."""
        return self.Full.__wrapped__(self, request, context)

    def BareRefused(self, request: Any, context: Any) -> Awaitable[pb.StatsResponse]:
        async def refuse() -> pb.StatsResponse:
            raise errors.NotFound("session_id=5 does not exist")

        return refuse()

    @grpc_errors
    async def Late(self, request: Any, context: Any) -> pb.StatsResponse:
        # A handler that runs without yielding past its caller's deadline, then refuses the
        # request (as a Release of a sequence the session no longer holds does): the call
        # is over by the time the refusal can be sent.
        time.sleep(0.3)
        raise errors.NotFound("sequence_id=17 does not exist in session 5")

    @grpc_errors
    async def Slow(self, request: Any, context: Any) -> pb.StatsResponse:
        self.entered.set()
        await self.release.wait()  # never set: shutdown has to end it
        return pb.StatsResponse()


async def _with_server(body: Callable[[Edge, Failing, grpc.aio.Channel], Awaitable[None]]) -> None:
    edge, failing = Edge(), Failing()
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(failing, name),
            request_deserializer=pb.StatsRequest.FromString,
            response_serializer=pb.StatsResponse.SerializeToString,
        )
        for name in ("Bug", "Invariant", "Exists", "Full", "BareFull", "BareRefused", "Late", "Slow")
    }
    server = grpc.aio.server()
    edge.add_registered_method_handlers("test.Failing", handlers)  # as the daemon's services do
    edge.install(server)
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        target = f"unix:{Path(d) / 's.sock'}"
        server.add_insecure_port(target)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(target) as channel:
                await body(edge, failing, channel)
        finally:
            await server.stop(None)


async def _status(
    channel: grpc.aio.Channel, method: str, payload: bytes = b"", timeout: float = 10
) -> tuple[Code, str]:
    call = channel.unary_unary(f"/test.Failing/{method}")
    try:
        await call(payload, timeout=timeout)
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    return Code.OK, ""


def test_what_handlers_raise_maps_to_a_status_never_unknown(caplog: pytest.LogCaptureFixture) -> None:
    async def body(edge: Edge, failing: Failing, channel: grpc.aio.Channel) -> None:
        code, details = await _status(channel, "Bug")
        assert code == Code.INTERNAL and "KeyError" in details and "Bug" in details
        code, details = await _status(channel, "Invariant")
        assert code == Code.INTERNAL and "page 3 is owned twice" in details
        assert edge.counts.internal == 2
        assert (await _status(channel, "Exists"))[0] == Code.ALREADY_EXISTS
        assert (await _status(channel, "Full"))[0] == Code.RESOURCE_EXHAUSTED
        # A handler without grpc_errors (KVStore.Lookup): the edge maps what it raises the same way,
        # an OSError named by its method as grpc_errors names it, and no bug is counted.
        full = await _status(channel, "Full")
        assert full[1].startswith("Full: ") and await _status(channel, "BareFull") == (
            Code.RESOURCE_EXHAUSTED,
            "BareFull: " + full[1].removeprefix("Full: "),
        )
        assert await _status(channel, "BareRefused") == (Code.NOT_FOUND, "session_id=5 does not exist")
        assert edge.counts.internal == 2
        code, details = await _status(channel, "Exists", b"\x0a\xff\xff\xff\xff\x0f")
        assert code == Code.INVALID_ARGUMENT and "not a valid kvstore.v1.StatsRequest" in details
        assert edge.counts.malformed == 1 and edge.counts.internal == 2

    with caplog.at_level(logging.ERROR, logger="kvstore.server.edge"):
        asyncio.run(_with_server(body))
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 2, caplog.text  # each bug logged with its traceback


def test_a_refusal_after_the_caller_gave_up_is_no_internal_error(caplog: pytest.LogCaptureFixture) -> None:
    """Found by `kvstore-bench soak` (cancellations): the abort of a call already over raised
    ExecuteBatchError, which the edge counted and logged as INTERNAL, a daemon bug."""

    async def body(edge: Edge, failing: Failing, channel: grpc.aio.Channel) -> None:
        assert (await _status(channel, "Late", timeout=0.1))[0] == Code.DEADLINE_EXCEEDED
        # The next call is answered once the late handler has finished (one event loop).
        assert (await _status(channel, "Full"))[0] == Code.RESOURCE_EXHAUSTED
        assert edge.counts.internal == 0

    with caplog.at_level(logging.ERROR, logger="kvstore.server.edge"):
        asyncio.run(_with_server(body))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_shutdown_answers_running_and_new_calls_unavailable() -> None:
    async def body(edge: Edge, failing: Failing, channel: grpc.aio.Channel) -> None:
        running = asyncio.ensure_future(_status(channel, "Slow"))
        await failing.entered.wait()
        edge.begin_shutdown()
        assert await _status(channel, "Full") == (Code.UNAVAILABLE, SHUTTING_DOWN)
        assert await edge.drain(0.2) == 1  # the slow call outlived the grace
        assert await running == (Code.UNAVAILABLE, SHUTTING_DOWN)

    asyncio.run(_with_server(body))


def test_a_generic_handler_whose_methods_the_edge_never_saw_is_refused() -> None:
    """Registration goes through the edge (the generated code hands it every method): a
    generic handler alone would serve calls that bypass it, so `install` refuses it."""
    edge = Edge()
    handler = grpc.unary_unary_rpc_method_handler(Failing().Bug)
    edge.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Other", {"Bug": handler}),))
    edge.add_registered_method_handlers("test.Failing", {"Bug": handler})

    async def install() -> None:
        edge.install(grpc.aio.server())

    with pytest.raises(TypeError, match="generic handlers without their methods registered"):
        asyncio.run(install())
