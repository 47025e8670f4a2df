"""The asyncio client's side of the lane: the put/get calls over the daemon's `<socket>.lane`
(framing: kvstore_proto/lane.py; docs/api.md "The lane"), as `kvstore_client.lane` is the sync
client's.

Why: a gRPC call costs grpc.aio's per-call machinery on both sides; the same protobuf messages
in a frame on a unix socket cost a fraction of it (`kvstore-bench rpc`: a Lookup over the lane
from asyncio at 4.4-5.2x a bare grpc.aio echo). Same messages, same handlers in the daemon, so
a call's result or error is the one gRPC would give: an error reply is raised as a
`lane.LaneError`, a `grpc.RpcError` the client maps exactly as it maps gRPC's.

The lane answers one call at a time per connection, and an asyncio client has many calls in
flight: each call takes an idle connection (or opens one) and gives it back when its reply
came, so N concurrent calls hold N connections, and at most MAX_IDLE wait between calls. A
call that is cancelled, times out (DEADLINE_EXCEEDED) or whose connection breaks (UNAVAILABLE)
closes its connection: its reply, if one still comes, must not be read as the next call's,
and the daemon cancels a call whose connection closed, as it does a gRPC call whose client
went away. When the session's KeepAlive stream ends (a hung or gone daemon) the client closes
every connection, so a call waiting for a reply fails UNAVAILABLE, deadline or not.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import grpc
from kvstore_proto import lane as wire

from .lane import _CODES, _METHODS, HELLO_TIMEOUT_S, METHODS, LaneError, lane_path, put_follow_wanted, wanted

__all__ = ["METHODS", "AsyncLane", "offered"]  # (METHODS: the sync lane's, what goes over it)
MAX_IDLE = 64  # idle connections kept for the next calls; more are closed when given back
_OK = grpc.StatusCode.OK.value[0]


class _Closed(Exception):
    """The connection closed (the daemon's end, or ours) before the reply came."""


class _Connection(asyncio.Protocol):
    """One lane connection: one call in flight at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[bytes] | None = None
        self.reason = ""  # why it closed, once it has

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        body = wire.split(self.buf)
        if body is None:
            return
        waiter, self.waiter = self.waiter, None
        if waiter is None or waiter.done() or self.buf:  # a reply nobody asked for: out of step
            self.close("the daemon sent a reply no call was waiting for")
            return
        waiter.set_result(body)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.reason:
            self.reason = (
                f"the daemon closed the connection ({exc!r})" if exc else "the daemon closed the connection"
            )
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(_Closed(self.reason))

    async def roundtrip(self, frame: bytes, follow: Callable[[], bytes] | None = None) -> tuple[int, bytes]:
        """Send one whole frame (and, with `follow`, once it is sent, `follow()`'s bytes as its
        follow-up frame: a Put with bytes_follow); the reply's (status, payload)."""
        if self.transport is None or self.transport.is_closing():
            raise _Closed(self.reason or "closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(frame)
        if follow is not None:
            # (if it raises, the call drops this connection: the daemon gives the credit back)
            self.transport.write(wire.request(wire.FOLLOW_UP, follow()))
        body = await self.waiter
        return body[0], body[1:]

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing() and self.waiter is None

    def close(self, reason: str) -> None:
        if not self.reason:
            self.reason = reason
        if self.transport is not None:
            self.transport.close()  # (connection_lost fails a waiter, on the loop's next turn)
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(_Closed(self.reason))


class AsyncLane:
    """The lane of one asyncio client: a pool of connections, one per call in flight."""

    def __init__(self, path: str, token: str) -> None:
        self.path = path
        self._hello = wire.hello(token)
        self.put_follow = put_follow_wanted()  # (read when the client connects, as the sync lane's)
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()  # every connection, for close()
        self._closed = ""  # why close() was called, once it has

    async def call(
        self, method: str, request: Any, timeout: float | None, follow: Callable[[], bytes] | None = None
    ) -> Any:
        """`method`'s reply to `request`, or raises LaneError with the daemon's status (`follow`:
        Connection.roundtrip's)."""
        name, parse = _METHODS[method]
        frame = wire.request(name, request.SerializeToString())
        conn: _Connection | None = None
        try:
            async with asyncio.timeout(timeout):
                conn = await self._take()
                code, payload = await conn.roundtrip(frame, follow)
        except TimeoutError:
            self._drop(conn, "the call's deadline passed")
            raise LaneError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        except (OSError, _Closed) as e:
            self._drop(conn, "broken")
            raise LaneError(
                grpc.StatusCode.UNAVAILABLE, f"lane connection to {self.path} broke: {e}"
            ) from None
        except BaseException:  # cancelled: its reply may still come, so the connection goes
            self._drop(conn, "its call was cancelled")
            raise
        self._give_back(conn)
        if code != _OK:
            raise LaneError(_CODES.get(code, grpc.StatusCode.UNKNOWN), payload.decode(errors="replace"))
        return parse(payload)

    async def warm(self, timeout: float) -> None:
        """Open one connection (its hello answered) and keep it idle: whether the lane is there."""
        async with asyncio.timeout(timeout):
            conn = await self._take()
        self._give_back(conn)

    def close(self, reason: str = "the client closed") -> None:
        """Close every connection; a call waiting for its reply fails UNAVAILABLE."""
        self._closed = self._closed or reason
        conns, self._open, self._idle = self._open, set(), []
        for conn in conns:
            conn.close(reason)

    # ------------------------------------------------------------ connections

    async def _take(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if conn.usable:
                return conn
            self._open.discard(conn)
        return await self._connect()

    async def _connect(self) -> _Connection:
        if self._closed:
            raise _Closed(self._closed)
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_unix_connection(_Connection, self.path)
        except OSError as e:
            raise LaneError(grpc.StatusCode.UNAVAILABLE, f"no lane at {self.path}: {e!r}") from None
        self._open.add(conn)
        try:
            code, payload = await conn.roundtrip(self._hello)
        except BaseException:
            self._drop(conn, "its hello was not answered")
            raise
        if code != _OK or payload != wire.SERVER_HELLO:
            self._drop(conn, "its hello was refused")
            detail = payload.decode(errors="replace") if code != _OK else f"not a lane: {payload!r}"
            raise LaneError(_CODES.get(code, grpc.StatusCode.UNKNOWN), detail)
        if self._closed:  # (closed while the hello was on its way)
            self._drop(conn, self._closed)
            raise _Closed(self._closed)
        return conn

    def _give_back(self, conn: _Connection) -> None:
        if len(self._idle) < MAX_IDLE and conn.usable and not self._closed:
            self._idle.append(conn)
        else:
            self._drop(conn, "not needed")

    def _drop(self, conn: _Connection | None, reason: str) -> None:
        if conn is not None:
            self._open.discard(conn)
            conn.close(reason)


async def offered(target: str, lane: bool | None, token: str) -> AsyncLane | None:
    """The lane of the daemon at `target` when wanted and offered (its socket answers our
    hello), else None: the calls go over gRPC (a TCP target, a daemon with the lane off)."""
    path = lane_path(target) if wanted(lane) else None
    if path is None:
        return None
    found = AsyncLane(path, token)
    with contextlib.suppress(LaneError, _Closed, TimeoutError):
        await found.warm(HELLO_TIMEOUT_S)
        return found
    found.close("not offered")
    return None
