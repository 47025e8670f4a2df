"""One-time tickets for a pool's descriptor (docs/security.md, "The pool").

GetNamespace and CreateNamespace replies to a caller on the unix socket carry a ticket in
`PoolDescriptor.pool_ticket`: 32 random bytes, good once, for TTL_S seconds, for the token
that asked (its name) and the access that token has on the namespace: read-write with the
write scope, read-only with the read scope alone, none without either (no ticket then).
The client trades it on the pool socket (kvstore/server/pool_socket.py) for the descriptor.
A ticket taken is remembered until it would have expired, so that presenting it again is
refused (and counted) as used, not unknown.

Loop-owned, like the store: issued by the servicers, taken by the pool socket's handlers.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb
from kvstore_proto.pool_socket import TICKET_BYTES

from kvstore.server.pool_refusals import Refused

TTL_S = 5.0  # the client trades it at once; this only bounds how long a leaked one is good
MAX_OUTSTANDING = 4096  # beyond this the oldest are dropped (a caller that never trades them)
_FD_POOLS = (pb.CPU_MEMFD, pb.FAKE_DEVICE)


@dataclass(frozen=True, slots=True)
class Ticket:
    namespace: str
    epoch: int  # the pool it is for: a namespace created again is another pool
    token: str | None  # the name of the token that asked; None on a daemon without tokens
    writable: bool
    expires: float  # time.monotonic()


# (caller's token name or None, writable), or None for no access to the pool.
Grant = Callable[[Any, str], tuple[str | None, bool] | None]


def everyone_writes(context: Any, namespace: str) -> tuple[str | None, bool]:
    """Without a tokens file every client on the unix socket is trusted (read-write)."""
    return None, True


class PoolTickets:
    def __init__(self, grant: Grant = everyone_writes, ttl_s: float = TTL_S) -> None:
        self.grant = grant
        self.ttl_s = ttl_s
        self._tickets: dict[bytes, Ticket] = {}  # insertion order: oldest first
        self._used: dict[bytes, float] = {}  # taken ones -> when they would have expired

    def stamp(self, reply: pb.NamespaceInfo, context: Any) -> None:
        """Put a ticket in `reply` for the caller of `context`, when it may map the pool: a
        memfd pool, a caller on the unix socket (no descriptor crosses TCP), a scope on it."""
        if reply.pool.handle_type not in _FD_POOLS or not _on_unix_socket(context):
            return
        granted = self.grant(context, reply.name)
        if granted is not None:
            reply.pool.pool_ticket = self.issue(reply.name, reply.pool.pool_epoch, *granted)

    def issue(self, namespace: str, epoch: int, token: str | None, writable: bool) -> bytes:
        now = time.monotonic()
        while self._tickets:  # drop the expired (oldest first) and any beyond the bound
            oldest = next(iter(self._tickets))
            if self._tickets[oldest].expires > now and len(self._tickets) < MAX_OUTSTANDING:
                break
            del self._tickets[oldest]
        while self._used:  # (insertion order is expiry order here too: one TTL for all)
            oldest = next(iter(self._used))
            if self._used[oldest] > now and len(self._used) < MAX_OUTSTANDING:
                break
            del self._used[oldest]
        secret = secrets.token_bytes(TICKET_BYTES)
        self._tickets[secret] = Ticket(namespace, epoch, token, writable, now + self.ttl_s)
        return secret

    def take(self, secret: bytes) -> Ticket:
        """The ticket, now used up; Refused if unknown, used or expired."""
        ticket = self._tickets.pop(secret, None)
        if ticket is None:
            if secret in self._used:
                raise Refused("used_ticket", "this ticket was used already: take a new one from GetNamespace")
            raise Refused("unknown_ticket", "unknown ticket: take one from GetNamespace")
        self._used[secret] = ticket.expires
        if ticket.expires < time.monotonic():
            raise Refused(
                "expired_ticket",
                f"expired ticket (good for {self.ttl_s:g}s): take a new one from GetNamespace",
            )
        return ticket

    def __len__(self) -> int:
        return len(self._tickets)


def _on_unix_socket(context: Any) -> bool:
    peer = context.peer() if context is not None else ""
    return isinstance(peer, str) and peer.startswith("unix:")
