"""The lane: the put/get calls over a plain unix socket beside the gRPC one (framing:
kvstore_proto/lane.py; docs/api.md "The lane").

Why: a 1-page put over gRPC took 0.86 ms, of which the daemon's event loop spent 0.44 ms of
CPU, mostly in grpc.aio's per-call machinery; a frame on a unix socket costs tens of
microseconds. gRPC stays the API: every lane method is a gRPC method with the same messages,
and it is served by the same handlers, those the edge wrapped (kvstore/server/edge.py): the
guarded deserializer (garbage -> INVALID_ARGUMENT), the token check per call
(kvstore/server/auth.py, with the token of the connection's hello as its metadata), shutdown
(UNAVAILABLE "daemon shutting down", drain), error mapping and the per-method metrics.

The socket is `<socket>.lane`, mode 0600 in the gRPC socket's 0700 directory: who may connect
is who may connect to the gRPC socket (docs/security.md). Each connection is served in order,
one call at a time, each call in its own task (what the edge's drain cancels); a connection
that closes cancels its call in flight, as grpc.aio cancels a call whose client went away.

A Put with bytes_follow (docs/api.md, "A put in one round trip") is the one call of two
frames: its handler takes the connection's next frame, a PutWritten, with
`LaneContext.follow_up`, and answers after it. A follow-up that does not come in time, or a
frame that is not one, fails the Put and closes the connection after its reply: the two ends
no longer agree on which frame answers what.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections import deque
from pathlib import Path

import grpc
from kvstore_proto import lane as wire

from kvstore.errors import DeadlineExceeded, InvalidArgument
from kvstore.server.edge import Edge
from kvstore.server.socket_path import listen_beside

log = logging.getLogger(__name__)

BACKLOG = 128
MAX_QUEUED = 16  # frames read ahead of the call in flight before the connection stops being read
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_OK = grpc.StatusCode.OK.value[0]


def lane_socket_path(grpc_socket: Path) -> Path:
    return grpc_socket.with_name(grpc_socket.name + wire.SUFFIX)


class LaneContext:
    """What the edge's wrapped handlers and the token check use of a grpc.aio ServicerContext."""

    __slots__ = ("_code", "_conn", "_details", "followed")
    # (a gRPC context has no follow_up: a handler tells the lane by it)

    def __init__(self, conn: _Connection) -> None:
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._conn = conn
        self.followed = False  # follow_up was called

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code, self._details = code, details
        raise grpc.aio.AbortError()

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def done(self) -> bool:  # the call has nobody to answer: its connection is gone
        return self._conn.lost

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._conn.metadata

    def peer(self) -> str:
        return self._conn.peer

    async def follow_up(self) -> bytes:
        """The payload of this connection's next frame, which must be a FOLLOW_UP (a Put with
        bytes_follow waits here while its client copies). DeadlineExceeded when none comes
        within the lane's follow_up_timeout_s, InvalidArgument for another frame: either way
        the connection closes after this call's reply."""
        conn = self._conn
        self.followed = True
        if not conn.frames:
            conn.follower = waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(conn.lane.follow_up_timeout_s):
                    await waiter
            except TimeoutError:
                conn.close_after_reply = True
                raise DeadlineExceeded(
                    f"no {wire.FOLLOW_UP.decode()} frame within lane_follow_up_timeout_s="
                    f"{conn.lane.follow_up_timeout_s:g} after a Put with bytes_follow=true: its credit "
                    "is released, the connection closed"
                ) from None
            finally:
                conn.follower = None
        body = conn.frames.popleft()
        conn.flow()
        n = body[0] if body else 0
        if body[1 : 1 + n] != wire.FOLLOW_UP:
            conn.close_after_reply = True
            shown = body[1 : 1 + n].decode("ascii", "replace") if body else ""
            raise InvalidArgument(
                f"a Put with bytes_follow=true is followed by a {wire.FOLLOW_UP.decode()} frame once its "
                f"pages are written; the next frame was {shown!r}: the connection is closed"
            )
        conn.lane.counts.puts_followed += 1
        return body[1 + n :]


class Lane:
    """The listener. `start()` after the edge has every handler; `stop()` after the gRPC server."""

    def __init__(self, path: Path, edge: Edge, max_message: int, follow_up_timeout_s: float = 30.0) -> None:
        self.path = path
        self.follow_up_timeout_s = follow_up_timeout_s  # (LaneContext.follow_up)
        self.max_frame = max_message + wire.FRAME_SLACK
        self.counts = edge.counts.lane
        prefix = f"/{wire.SERVICE}/"
        # name -> the edge's wrapped handler: the same object gRPC calls.
        self.methods = {m.encode(): edge._methods[prefix + m] for m in wire.METHODS}
        self._server: asyncio.AbstractServer | None = None
        self._ino = 0
        self.connections: set[_Connection] = set()

    async def start(self) -> None:
        """Bind and listen (the daemon holds its socket path's lock: a socket here is stale)."""
        sock = listen_beside(self.path, "lane socket", BACKLOG)
        self._ino = os.stat(self.path).st_ino
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Connection(self), sock=sock)
        log.info("lane: put/get calls also served on %s (same messages as gRPC)", self.path)

    async def stop(self) -> None:
        """Stop accepting, close every connection (its call in flight is cancelled)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in list(self.connections):
            conn.close()
        with contextlib.suppress(FileNotFoundError):
            if self._ino and os.stat(self.path).st_ino == self._ino:  # only ever our own
                os.unlink(self.path)
        self._ino = 0


class _Connection(asyncio.Protocol):
    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.frames: deque[bytes] = deque()
        self.call: asyncio.Task[None] | None = None  # the call in flight
        self.follower: asyncio.Future[None] | None = None  # set by LaneContext.follow_up, waiting
        self.close_after_reply = False  # the call in flight broke the framing (follow_up)
        self.hello = False
        self.lost = False
        self.paused = False  # reading paused (flow)
        self.replies_waiting = False  # the transport's write buffer is over its high-water mark
        self.metadata: tuple[tuple[str, str], ...] = ()
        self.peer = "unix:lane"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.lane.connections.add(self)
        self.lane.counts.connections += 1
        self.lane.counts.open += 1
        sock = transport.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError):
            pid, uid, _ = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            self.peer = f"unix:lane pid={pid} uid={uid}"

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.lane.connections.discard(self)
        self.lane.counts.open -= 1
        self.frames.clear()
        if self.call is not None:
            self.call.cancel()  # as grpc.aio does to a call whose client went away

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # A client that sends requests and never reads the replies would make the daemon buffer
    # them all: past the transport's high-water mark, its requests are not read either.
    def pause_writing(self) -> None:
        self.replies_waiting = True
        self.flow()

    def resume_writing(self) -> None:
        self.replies_waiting = False
        self.flow()

    def flow(self) -> None:
        """Read the connection only while little is queued either way."""
        pause = self.replies_waiting or len(self.frames) >= MAX_QUEUED
        if pause != self.paused and self.transport is not None and not self.lost:
            self.paused = pause
            self.transport.pause_reading() if pause else self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        # Frames are cut from `data` itself when nothing is pending (the usual case: a whole
        # request in one read), one copy each; only a partial frame is kept in `buf`.
        buf = self.buf
        if buf:
            buf += data
            data = buf  # type: ignore[assignment]
        at, end = 0, len(data)
        while end - at >= 4:
            (n,) = wire.LENGTH.unpack_from(data, at)
            if n > self.lane.max_frame:
                self._refuse(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"lane frame of {n} bytes is over the daemon's limit of {self.lane.max_frame} "
                    "(its gRPC max receive message size)",
                )
                return
            if end - at < 4 + n:
                break
            body = bytes(data[at + 4 : at + 4 + n])  # (of bytes: the slice itself)
            at += 4 + n
            if not self.hello:
                if not self._greet(body):
                    return
                continue
            self.frames.append(body)
        if data is buf:
            del buf[:at]
        elif at < end:
            buf += data[at:]
        if self.call is None and self.frames:
            self._next()
        elif self.follower is not None and self.frames and not self.follower.done():
            self.follower.set_result(None)  # (the call in flight takes the frame: follow_up)
        self.flow()

    def _greet(self, body: bytes) -> bool:
        token = body[len(wire.MAGIC) :]
        if not body.startswith(wire.MAGIC) or len(token) > wire.MAX_TOKEN_BYTES:
            self._refuse(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"not a kvstore lane hello (the first frame starts {wire.MAGIC!r}, then a token of at most "
                f"{wire.MAX_TOKEN_BYTES} bytes)",
            )
            return False
        try:
            secret = token.decode()
        except UnicodeDecodeError:
            self._refuse(grpc.StatusCode.INVALID_ARGUMENT, "the lane hello's token is not UTF-8")
            return False
        # Checked per call by the edge's token check, exactly like gRPC metadata.
        self.metadata = (("authorization", f"Bearer {secret}"),) if secret else ()
        self.hello = True
        self.transport.write(wire.reply(_OK, wire.SERVER_HELLO))  # type: ignore[union-attr]
        return True

    def _refuse(self, code: grpc.StatusCode, message: str) -> None:
        """Answer an error the stream cannot recover from (framing lost) and close."""
        self.lane.counts.refused += 1
        log.warning("lane: closed a connection (%s): %s", self.peer, message)
        self.buf.clear()
        self.frames.clear()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(wire.reply(code.value[0], message.encode()))
            transport.close()  # (after the reply is written)

    def _next(self) -> None:
        body = self.frames.popleft()
        self.call = asyncio.get_running_loop().create_task(self._answer(body))
        self.call.add_done_callback(self._done)
        if self.paused:
            self.flow()

    def _done(self, task: asyncio.Task[None]) -> None:
        self.call = None
        if not task.cancelled() and task.exception() is not None:  # a bug here must not go unseen
            log.error("lane: a call failed", exc_info=task.exception())
            self.close()
            return
        if self.frames and not self.lost:
            self._next()

    async def _answer(self, body: bytes) -> None:
        code, payload = await self._dispatch(body)
        self.lane.counts.calls += 1
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(wire.reply(code, payload))
            if self.close_after_reply:
                self.frames.clear()
                transport.close()  # (after the reply is written)

    async def _dispatch(self, body: bytes) -> tuple[int, bytes]:
        n = body[0] if body else 0
        if not body or len(body) < 1 + n:
            return _error(
                grpc.StatusCode.INVALID_ARGUMENT, "a lane request starts u8 name_len, then the method's name"
            )
        name = body[1 : 1 + n]
        handler = self.lane.methods.get(name)
        if handler is None and name == wire.FOLLOW_UP:
            return _error(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"a {wire.FOLLOW_UP.decode()} frame follows a Put with bytes_follow=true (its second "
                "frame); no Put on this connection is waiting for one",
            )
        if handler is None:
            shown = name.decode("ascii", "replace")
            return _error(
                grpc.StatusCode.UNIMPLEMENTED,
                f"method {shown!r} is not served on the lane (it serves {', '.join(wire.METHODS)}); "
                "call it over gRPC",
            )
        context = LaneContext(self)
        request = handler.request_deserializer(body[1 + n :])  # the edge's: never raises
        try:
            reply = await handler.unary_unary(request, context)
        except grpc.aio.AbortError:
            answer = _error(context.code() or grpc.StatusCode.UNKNOWN, context.details())
        else:
            serialize = handler.response_serializer  # (None: the reply is its bytes, edge.ENCODED_REPLIES)
            answer = _OK, reply if serialize is None else serialize(reply)
        if getattr(request, "bytes_follow", False) and not context.followed:
            # A Put refused before its handler took its follow-up (the token check, shutdown, a
            # bad field): taken now, so the reply comes after it and every frame is answered once.
            with contextlib.suppress(DeadlineExceeded, InvalidArgument):  # (then the connection closes)
                await context.follow_up()
        return answer


def _error(code: grpc.StatusCode, message: str) -> tuple[int, bytes]:
    return code.value[0], message.encode()
