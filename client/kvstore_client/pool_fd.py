"""Trading a pool ticket for the pool's descriptor on the daemon's pool socket.

A CPU pool has no name anywhere: GetNamespace's reply carries a one-time ticket
(`PoolDescriptor.pool_ticket`), and the pool socket beside the daemon's unix socket answers
it with the descriptor itself (SCM_RIGHTS): read-only for a token with the read scope,
read-write with write (framing: kvstore_proto/pool_socket.py; docs/api.md). Over TCP there is
no descriptor to pass: mapping a pool (zero-copy) needs the daemon's unix socket.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from kvstore_proto import pool_socket as wire
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

from .errors import PoolError

TIMEOUT_S = 10.0


@dataclass
class PoolFd:
    """A pool's descriptor, owned: `close()` it (a mapping made from it keeps its own)."""

    fd: int
    writable: bool
    epoch: int
    nbytes: int

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


# What a client got for a pool's ticket: its descriptor, or why not (raised on first use of
# the pool, so a client that never maps it never sees it), or None for a pool without a
# descriptor (CUDA IPC).
Fetched = PoolFd | PoolError | None


def fetch_for(target: str, info: pb.NamespaceInfo, token: str) -> Fetched:
    """Trade a fresh reply's pool ticket for the pool's descriptor, at once (it is good for
    seconds only)."""
    if info.pool.handle_type not in (pb.CPU_MEMFD, pb.FAKE_DEVICE):
        return None
    try:
        return fetch(target, info.pool, token, info.name)
    except PoolError as e:
        return e


def pool_socket_path(target: str) -> str | None:
    """The pool socket beside a `unix:` gRPC target; None for any other target."""
    if target.startswith("unix://"):
        path = target[len("unix://") :]
    elif target.startswith("unix:"):
        path = target[len("unix:") :]
    else:
        return None
    return os.path.abspath(path) + wire.SUFFIX if path else None


def fetch(target: str, d: pb.PoolDescriptor, token: str, namespace: str) -> PoolFd:
    """The descriptor of the pool `d` describes (a fresh GetNamespace/CreateNamespace reply's),
    or PoolError saying why not."""
    where = f"namespace {namespace!r}"
    path = pool_socket_path(target)
    if path is None:
        raise PoolError(
            f"{where}: a pool is mapped only by a client on the daemon's unix socket (its descriptor is "
            f"passed over a unix socket; zero-copy needs one); this client is connected to {target}"
        )
    if not d.pool_ticket:
        raise PoolError(
            f"{where}: the daemon gave no pool ticket: the token has neither the read nor the write "
            "scope on it (or the daemon is older than the pool socket)"
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(TIMEOUT_S)
        try:
            sock.connect(path)
            sock.sendall(wire.encode_request(d.pool_ticket, token))
            data, fds, _, _ = socket.recv_fds(sock, wire.MAX_REPLY, 1, socket.MSG_CMSG_CLOEXEC)
        except OSError as e:
            raise PoolError(f"{where}: cannot fetch the pool from the pool socket {path}: {e}") from e
    try:
        status, access, epoch, nbytes, text = wire.decode_reply(data)
        if status != wire.GRANTED or len(fds) != 1:
            raise PoolError(f"{where}: the daemon refused the pool: {text or f'status {status}'}")
        if epoch != d.pool_epoch or nbytes < d.nbytes:
            raise PoolError(
                f"{where}: the pool socket sent pool epoch {epoch:016x} of {nbytes} bytes, "
                f"not the epoch {d.pool_epoch:016x} of {d.nbytes} bytes asked for"
            )
    except (PoolError, ValueError) as e:
        for fd in fds:
            os.close(fd)
        raise e if isinstance(e, PoolError) else PoolError(f"{where}: pool socket: {e}") from e
    return PoolFd(fds[0], access == wire.READ_WRITE, epoch, nbytes)
