"""The pool socket: where a client trades a ticket for its pool's descriptor (SCM_RIGHTS).

Beside the gRPC unix socket `S`, `S.pool` (mode 0600 in the same 0700 directory), served on
the daemon's event loop: each connection reads one request (kvstore_proto/pool_socket.py has
the framing) within READ_TIMEOUT_S, answers once and is closed. The ticket comes from an
authenticated GetNamespace (kvstore/server/pool_tickets.py); it is used up by any attempt. A
request that is garbage, too slow, has a wrong, used or expired ticket, or another token
than the one the ticket was issued to gets a refusal saying so and no descriptor; the
daemon serves on. At most MAX_CONNECTIONS are read at once; more are closed at once.
Grants and refusals (by reason, kvstore/server/pool_refusals.py) are counted in the edge's
counts, for Stats and the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
from pathlib import Path

from kvstore_proto import pool_socket as wire

from kvstore.server.pool_refusals import PoolSocketCounts, Refused
from kvstore.server.pool_tickets import PoolTickets
from kvstore.server.socket_path import listen_beside
from kvstore.store.store import Store
from kvstore.tokens import Tokens

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 64


def pool_socket_path(grpc_socket: Path) -> Path:
    return grpc_socket.with_name(grpc_socket.name + wire.SUFFIX)


class PoolSocket:
    def __init__(
        self,
        path: Path,
        tickets: PoolTickets,
        store: Store,
        tokens: Tokens | None,
        counts: PoolSocketCounts | None = None,
    ) -> None:
        self.path = path
        self.tickets = tickets
        self.store = store
        self.tokens = tokens
        self.counts = counts if counts is not None else PoolSocketCounts()
        self._sock: socket.socket | None = None
        self._ino = 0
        self._accepting: asyncio.Task[None] | None = None
        self._serving: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """Bind and listen (the daemon holds its socket path's lock: a socket here is stale)."""
        sock = listen_beside(self.path, "pool socket", MAX_CONNECTIONS)
        sock.setblocking(False)
        self._sock, self._ino = sock, os.stat(self.path).st_ino
        self._accepting = asyncio.create_task(self._accept(sock), name="pool-socket")
        log.info("pool descriptors handed out on %s (tickets from GetNamespace)", self.path)

    async def stop(self) -> None:
        tasks = [t for t in (self._accepting, *self._serving) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._accepting = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == self._ino:  # only ever our own
                    os.unlink(self.path)

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as e:  # e.g. EMFILE: the next accept may succeed
                log.warning("pool socket: accept failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            if len(self._serving) >= MAX_CONNECTIONS:
                self.counts.refused["busy"] += 1
                conn.close()
                continue
            task = asyncio.create_task(self._serve_logged(conn))
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

    async def _serve_logged(self, conn: socket.socket) -> None:
        try:
            await self._serve(conn)
        except Exception:  # a bug here must not go unseen, nor reach the loop
            log.exception("pool socket: a request failed")

    async def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.setblocking(False)
            try:
                try:
                    async with asyncio.timeout(READ_TIMEOUT_S):
                        ticket, token = await _read_request(conn)
                except TimeoutError:
                    raise Refused("timeout", f"no whole request within {READ_TIMEOUT_S:g}s") from None
                fd, access, epoch, nbytes = self._answer(ticket, token)
            except Refused as why:
                self.counts.refused[why.reason] += 1
                log.warning("pool socket: refused a request (%s): %s", why.reason, why)
                _send(conn, wire.encode_reply(wire.REFUSED, text=str(why)), [])
                return
            try:
                _send(conn, wire.encode_reply(wire.GRANTED, access, epoch, nbytes), [fd])
                self.counts.granted += 1
            finally:
                os.close(fd)

    def _answer(self, secret: bytes, token: str) -> tuple[int, int, int, int]:
        ticket = self.tickets.take(secret)  # or Refused: unknown, used or expired
        if ticket.token is not None:
            presented = self.tokens.find(token) if self.tokens is not None and token else None
            if presented is None or presented.name != ticket.token:
                raise Refused(
                    "wrong_token",
                    "this ticket was issued to another token: present the token that asked for it",
                )
        ns = self.store.namespaces.get(ticket.namespace)
        if ns is None or ns.pool.handle.epoch != ticket.epoch:
            raise Refused(
                "pool_gone",
                f"the pool of this ticket (namespace {ticket.namespace!r}, epoch {ticket.epoch:016x}) is "
                "gone: the namespace was deleted or created again; ask GetNamespace again",
            )
        try:
            fd = ns.pool.open_fd(ticket.writable)  # type: ignore[attr-defined]  (memfd pools only)
        except OSError as e:
            raise Refused(
                "open_failed", f"the pool of namespace {ticket.namespace!r} cannot be opened: {e}"
            ) from e
        rw = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
        return fd, wire.READ_WRITE if rw else wire.READ_ONLY, ticket.epoch, ns.pool.handle.nbytes


async def _read_request(conn: socket.socket) -> tuple[bytes, str]:
    loop = asyncio.get_running_loop()
    data = b""
    need = wire.REQUEST.size
    while len(data) < need:
        chunk = await loop.sock_recv(conn, need - len(data))
        if not chunk:
            raise Refused("incomplete", f"the connection closed after {len(data)} bytes of a request")
        data += chunk
        if len(data) >= 5 and (data[:4] != wire.MAGIC or data[4] != wire.VERSION):
            raise Refused(
                "malformed",
                f"not a version-{wire.VERSION} pool socket request (it starts {wire.MAGIC!r} {wire.VERSION})",
            )
        if need == wire.REQUEST.size and len(data) == need:
            _, _, token_len, _ = wire.REQUEST.unpack(data)
            if token_len > wire.MAX_TOKEN_BYTES:
                raise Refused("malformed", f"token_len={token_len} is over {wire.MAX_TOKEN_BYTES}")
            need += token_len
    _, _, _, ticket = wire.REQUEST.unpack_from(data)
    try:
        token = data[wire.REQUEST.size :].decode()
    except UnicodeDecodeError:
        raise Refused("malformed", "the token is not UTF-8") from None
    return ticket, token


def _send(conn: socket.socket, data: bytes, fds: list[int]) -> None:
    """One small message into an empty socket buffer: never blocks. A client gone meanwhile
    is its own loss."""
    try:
        socket.send_fds(conn, [data], fds) if fds else conn.send(data)
    except OSError as e:
        log.info("pool socket: could not answer a client (%s)", e)
