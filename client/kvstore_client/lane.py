"""The sync client's side of the lane: the put/get calls over the daemon's `<socket>.lane`
(framing: kvstore_proto/lane.py; docs/api.md "The lane").

Why: a gRPC call from the sync client costs ~0.2 ms of client CPU and ~0.3-0.4 ms of the
daemon's event loop in grpc's per-call machinery; the same protobuf messages in a
length-prefixed frame on a unix socket cost tens of microseconds. Same messages, same
handlers in the daemon (auth, errors, metrics), so a call's result or error is the one gRPC
would give: an error reply is raised as a `LaneError`, a `grpc.RpcError` with `code()` and
`details()`, which the client maps exactly as it maps gRPC's.

One connection per thread (threading.local), a blocking socket; after sending, a call polls
it for its reply for `$KVSTORE_LANE_SPIN_US` before it sleeps in recv (`_polled`). A call that times out or
whose connection breaks drops the connection (the daemon then cancels the call, as it does a
gRPC call whose client went away) and raises DEADLINE_EXCEEDED / UNAVAILABLE. A daemon that
hangs without closing the socket is noticed as on gRPC: the session's KeepAlive stream (gRPC,
with HTTP/2 pings) ends, and a call waiting on the lane then fails UNAVAILABLE, deadline or
not. Off with `$KVSTORE_LANE=0` or `connect(lane=False)`.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
from kvstore_proto import lane as wire
from kvstore_proto import pool_socket as pool_wire
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

from . import pool_fd

LANE_ENV = "KVSTORE_LANE"
# `KVSTORE_PUT_FOLLOW=0`: a put copies its pages first and then sends its Put (two steps one
# after the other), instead of sending it first and copying while the daemon prepares it.
PUT_FOLLOW_ENV = "KVSTORE_PUT_FOLLOW"
SPIN_ENV = "KVSTORE_LANE_SPIN_US"
# How long a call polls for its reply before it sleeps in recv. A sleeping client is woken by
# the reply: on the project's 2-vCPU VM that wake-up cost ~70 us of a 1-page get's ~290
# (BENCHMARKS.md, peers), more than the daemon's handler. Most lane replies (a Lookup, a Put
# of a few pages) come within this; a longer call costs the client this much CPU, then sleeps.
DEFAULT_SPIN_US = 200
HELLO_TIMEOUT_S = 2.0
WAIT_SLICE_S = 1.0  # how often a call waiting for its reply looks whether the session ended
METHODS = frozenset(wire.METHODS)  # what goes over the lane; every other call over gRPC
_REPLIES = {
    m.name: pb.DESCRIPTOR.services_by_name["KVStore"].methods_by_name[m.name].output_type.name
    for m in pb.DESCRIPTOR.services_by_name["KVStore"].methods
    if m.name in wire.METHODS
}
# method name -> (its name as the frame carries it, the reply's parser)
_METHODS: dict[str, tuple[bytes, Any]] = {
    name: (name.encode(), getattr(pb, reply).FromString) for name, reply in _REPLIES.items()
}
_CODES = {c.value[0]: c for c in grpc.StatusCode}


def wanted(lane: bool | None, environ: Any = None) -> bool:
    """`lane` if given, else on unless `$KVSTORE_LANE` is 0/false/no/off."""
    if lane is not None:
        return lane
    value = (environ if environ is not None else os.environ).get(LANE_ENV, "").strip().lower()
    return value not in ("0", "false", "no", "off")


def put_follow_wanted(environ: Any = None) -> bool:
    """Whether puts go out before their copies (docs/api.md, "A put in one round trip"): on
    unless `$KVSTORE_PUT_FOLLOW` is 0/false/no/off."""
    value = (environ if environ is not None else os.environ).get(PUT_FOLLOW_ENV, "").strip().lower()
    return value not in ("0", "false", "no", "off")


def spin_ns(environ: Any = None) -> int:
    """Nanoseconds a call polls for its reply: `$KVSTORE_LANE_SPIN_US` (0: never) or
    DEFAULT_SPIN_US; 0 where this process may run on one CPU only (polling there would only
    keep the daemon from running)."""
    raw = (environ if environ is not None else os.environ).get(SPIN_ENV, "").strip()
    try:
        us = int(raw) if raw else DEFAULT_SPIN_US
    except ValueError:
        raise ValueError(f"${SPIN_ENV}={raw!r}: give whole microseconds (0 = never poll)") from None
    if us < 0:
        raise ValueError(f"${SPIN_ENV}={raw!r}: give 0 or more microseconds")
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # (not on Linux)
        cpus = os.cpu_count() or 1
    return us * 1000 if cpus > 1 else 0


def lane_path(target: str) -> str | None:
    """The lane socket beside a `unix:` gRPC target (as pool_fd finds the pool socket); None
    for any other target: the lane is local only."""
    path = pool_fd.pool_socket_path(target)
    return path.removesuffix(pool_wire.SUFFIX) + wire.SUFFIX if path is not None else None


def offered(target: str, lane: bool | None, token: str, ended: threading.Event) -> Lane | None:
    """The lane of the daemon at `target` when wanted and offered (its socket answers our
    hello), else None: the calls go over gRPC (a TCP target, a daemon with the lane off).
    `ended`: set when the session's KeepAlive stream ends."""
    path = lane_path(target) if wanted(lane) else None
    if path is None:
        return None
    found = Lane(path, token, ended)
    try:
        found.connection(time.monotonic() + HELLO_TIMEOUT_S)
    except LaneError:
        return None
    return found


class LaneError(grpc.RpcError):
    """A call's status on the lane, read like a gRPC call's (`code()`, `details()`)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class Lane:
    """The lane of one client: a connection per thread, opened on the thread's first call."""

    def __init__(self, path: str, token: str, ended: threading.Event) -> None:
        self.path = path
        self._ended = ended
        self._hello = wire.hello(token)
        self.spin_ns = spin_ns()
        self.put_follow = put_follow_wanted()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()  # every thread's, for close()

    def call(
        self, method: str, request: Any, timeout: float | None, follow: Callable[[], bytes] | None = None
    ) -> Any:
        """`method`'s reply to `request`, or raises LaneError with the daemon's status. With
        `follow` (a Put with bytes_follow): run once the request is sent, its bytes sent as the
        call's follow-up frame (a PutWritten), then the reply read. If `follow` raises, the
        connection is dropped (the daemon then gives the put's credit back) and so is that."""
        name, parse = _METHODS[method]
        deadline = None if timeout is None else time.monotonic() + timeout
        sock = self.connection(deadline)
        try:
            _send(sock, wire.request(name, request.SerializeToString()), deadline, self._ended)
            if follow is not None:
                try:
                    written = follow()
                except BaseException:
                    self._drop(sock)
                    raise
                _send(sock, wire.request(wire.FOLLOW_UP, written), deadline, self._ended)
            code, payload = _read_reply(sock, deadline, self._ended, self.spin_ns)
            if deadline is not None and deadline - time.monotonic() < WAIT_SLICE_S:
                _slice(sock, WAIT_SLICE_S)  # (`_left` may have shortened it: set it back)
        except TimeoutError:
            self._drop(sock)  # the daemon cancels the call when the connection closes
            raise LaneError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        except (OSError, _Closed) as e:
            self._drop(sock)
            raise LaneError(
                grpc.StatusCode.UNAVAILABLE, f"lane connection to {self.path} broke: {e}"
            ) from None
        if code:
            raise LaneError(_CODES.get(code, grpc.StatusCode.UNKNOWN), payload.decode(errors="replace"))
        return parse(payload)

    def close(self) -> None:
        with self._lock:
            socks, self._open = self._open, set()
        for sock in socks:
            sock.close()

    # ------------------------------------------------------------ connections

    def connection(self, deadline: float | None) -> socket.socket:
        """This thread's connection, opened (hello answered) by `deadline` if it is new."""
        sock = getattr(self._local, "sock", None)
        if sock is not None:
            return sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(HELLO_TIMEOUT_S)  # (a local connect: at once, or never)
            sock.connect(self.path)
            _blocking_in_slices(sock)
            _send(sock, self._hello, deadline, self._ended)
            code, payload = _read_reply(sock, deadline, self._ended)
            if deadline is not None and deadline - time.monotonic() < WAIT_SLICE_S:
                _slice(sock, WAIT_SLICE_S)
        except TimeoutError:
            sock.close()
            raise LaneError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        except (OSError, _Closed) as e:
            sock.close()
            raise LaneError(grpc.StatusCode.UNAVAILABLE, f"no lane at {self.path}: {e!r}") from None
        if code:
            sock.close()
            raise LaneError(_CODES.get(code, grpc.StatusCode.UNKNOWN), payload.decode(errors="replace"))
        self._local.sock = sock
        with self._lock:
            self._open.add(sock)
        return sock

    def _drop(self, sock: socket.socket) -> None:
        self._local.sock = None
        with self._lock:
            self._open.discard(sock)
        sock.close()


class _Closed(Exception):
    """The daemon closed the connection."""


def _blocking_in_slices(sock: socket.socket) -> None:
    """A blocking socket whose send and recv give up after WAIT_SLICE_S (the kernel's
    SO_SNDTIMEO / SO_RCVTIMEO: EAGAIN), so a call still looks at its deadline and the session
    between slices. A call is then one send and one recv: a Python timeout would add a poll
    to each and two fcntl calls a call (settimeout), 4 of a call's 6 syscalls."""
    sock.settimeout(None)
    _slice(sock, WAIT_SLICE_S)


def _slice(sock: socket.socket, seconds: float) -> None:
    sec, usec = divmod(max(1, round(seconds * 1e6)), 1_000_000)
    tv = _TIMEVAL.pack(sec, usec)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


_TIMEVAL = struct.Struct("@ll")  # struct timeval


def _left(sock: socket.socket, deadline: float | None, ended: threading.Event | None, waited: bool) -> None:
    """Before a send or recv (`waited`: after one that gave up at the end of its slice): past
    `deadline` TimeoutError, once the session has ended _Closed (a hung daemon: its KeepAlive
    stream's pings failed); a deadline nearer than a slice becomes the socket's slice."""
    if waited and ended is not None and ended.is_set():
        raise _Closed("the session's KeepAlive stream ended (the daemon stopped answering)")
    if deadline is None:
        return
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    if left < WAIT_SLICE_S:
        _slice(sock, left)  # (the connection is dropped at the deadline, or set back after it)


def _send(sock: socket.socket, frame: bytes, deadline: float | None, ended: threading.Event | None) -> None:
    _left(sock, deadline, ended, False)
    view = memoryview(frame)
    while True:
        try:
            view = view[sock.send(view) :]  # (a send that gives up midway says how much went)
        except BlockingIOError:
            _left(sock, deadline, ended, True)
            continue
        if not view:
            return


def _read_reply(
    sock: socket.socket, deadline: float | None, ended: threading.Event | None, spin_ns: int = 0
) -> tuple[int, bytes]:
    """One reply frame: (status, payload). Most replies arrive in one recv; its first bytes
    are polled for during `spin_ns` (never past `deadline`), then waited for."""
    data = (spin_ns and _polled(sock, spin_ns, deadline)) or _more(sock, deadline, ended)
    while len(data) < 5:
        data += _more(sock, deadline, ended)
    (n,) = wire.LENGTH.unpack_from(data)
    if n < 1:
        raise _Closed("an empty reply frame")
    if len(data) < 4 + n:
        buf = bytearray(data)
        while len(buf) < 4 + n:
            buf += _more(sock, deadline, ended, 4 + n - len(buf))
        data = bytes(buf)
    return data[4], data[5 : 4 + n]


def _polled(sock: socket.socket, spin_ns: int, deadline: float | None) -> bytes:
    """The reply's first bytes if they come within `spin_ns` and before `deadline`, else b""
    (nothing read: `_more` then waits, and says what a deadline passed means)."""
    end = time.monotonic_ns() + spin_ns
    if deadline is not None:
        end = min(end, int(deadline * 1e9))
    recv = sock.recv
    while True:
        try:
            chunk = recv(1 << 16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            if time.monotonic_ns() >= end:
                return b""
            continue
        if not chunk:
            raise _Closed("the daemon closed the connection")
        return chunk


def _more(
    sock: socket.socket, deadline: float | None, ended: threading.Event | None, want: int = 1 << 16
) -> bytes:
    """The next bytes of a reply, waiting in slices (see `_left`)."""
    while True:
        try:
            chunk = sock.recv(min(want, 1 << 20))
        except BlockingIOError:  # (the slice ended)
            _left(sock, deadline, ended, True)
            continue
        if not chunk:
            raise _Closed("the daemon closed the connection")
        return chunk
