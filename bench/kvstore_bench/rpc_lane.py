"""The rpc benchmark's lane sides: an asyncio client for the lane (framing:
kvstore_proto/lane.py; docs/api.md "The lane") and the lane echo server as a child process.

Why an asyncio client of its own: the library's lane client (kvstore_client/lane.py) is the
sync client's, blocking sockets and one connection per thread; the benchmark measures from
one uvloop process, as its gRPC sides do with grpc.aio. The lane answers one call at a time
per connection, so N calls in flight are N connections, each with one call in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from kvstore_client.lane import Lane, LaneError
from kvstore_proto import lane as wire
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

from .harness import BenchError, ChildServer

LOOKUP = b"Lookup"
_OK = grpc.StatusCode.OK.value[0]


class LaneConnection(asyncio.Protocol):
    """One lane connection; one call in flight at a time (the lane serves them in order)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        body = wire.split(self.buf)
        if body is not None and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(body)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(BenchError(f"the lane connection closed: {exc!r}"))

    async def roundtrip(self, frame: bytes) -> tuple[int, bytes]:
        """Send one whole frame; the reply's (status, payload)."""
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(frame)
        body = await self.waiter
        return body[0], body[1:]

    async def call(self, method: bytes, payload: bytes) -> bytes:
        """`method`'s serialized reply to the serialized request `payload`; BenchError on an error reply."""
        code, reply = await self.roundtrip(wire.request(method, payload))
        if code != _OK:
            raise BenchError(f"lane {method.decode()}: status {code}: {reply.decode(errors='replace')}")
        return reply

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(path: str, token: str = "") -> LaneConnection:
    """A connection to the lane at `path`, its hello answered."""
    _, conn = await asyncio.get_running_loop().create_unix_connection(LaneConnection, path)
    code, payload = await conn.roundtrip(wire.hello(token))
    if code != _OK or payload != wire.SERVER_HELLO:
        conn.close()
        raise BenchError(f"the lane at {path} refused the hello: status {code}: {payload!r}")
    return conn


@contextlib.asynccontextmanager
async def connections(path: str, n: int) -> AsyncIterator[list[LaneConnection]]:
    conns: list[LaneConnection] = []
    try:
        for _ in range(n):
            conns.append(await connect(path))
        yield conns
    finally:
        for conn in conns:
            conn.close()


def lookup_call(
    conn: LaneConnection, request: pb.LookupRequest, want_hit: int
) -> Callable[[], Awaitable[Any]]:
    """A Lookup on `conn` as the gRPC sides make it: the request serialized and the reply
    parsed on every call, its hit checked."""
    serialize, parse = request.SerializeToString, pb.LookupResponse.FromString

    async def call() -> None:
        reply = parse(await conn.call(LOOKUP, serialize()))
        if reply.hit_tokens != want_hit:
            raise BenchError(f"lane lookup hit {reply.hit_tokens} tokens, expected {want_hit}")

    return call


async def lookup(path: str, request: pb.LookupRequest) -> pb.LookupResponse:
    """One Lookup over the lane at `path` on a connection of its own."""
    async with connections(path, 1) as (conn,):
        return pb.LookupResponse.FromString(await conn.call(LOOKUP, request.SerializeToString()))


def daemon_lane_path(daemon: ChildServer) -> str:
    return str(daemon.socket_path) + wire.SUFFIX


class LaneChild(ChildServer):
    """The lane echo server (lane_echo.py) as a child process: ready once its socket answers
    a hello (it serves no gRPC health)."""

    POLL_S = 0.02

    def __init__(self, name: str, reply_file: str) -> None:
        super().__init__(
            name,
            [sys.executable, "-m", "kvstore_bench.lane_echo", "--socket", "{socket}", "--reply", reply_file],
        )

    @property
    def lane_path(self) -> str:
        return str(self.socket_path)

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        lane = Lane(self.lane_path, "", threading.Event())
        try:
            while True:
                if self.proc.poll() is not None:
                    raise BenchError(
                        f"{self.name} exited with status {self.proc.returncode} before it was ready; "
                        f"stderr:\n{self.stderr_tail()}"
                    )
                if Path(self.lane_path).exists():
                    try:
                        lane.connection(deadline)
                        return
                    except LaneError:
                        pass
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.name} did not answer a lane hello in {timeout:g}s")
                time.sleep(self.POLL_S)  # the socket is not bound yet: nothing to wait on but time
        finally:
            lane.close()
