"""The sessions of the store: leases, the ids of sequences and pins, and who owns which.
Loop-owned; kvstore/store/store.py calls it, and releases what a session holds before
`end` forgets it."""

from __future__ import annotations

import logging
import secrets
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import TypeVar

from kvstore.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, QuotaExceeded
from kvstore.store.sessions import Pin, Sequence, Session
from kvstore.store.types import SessionInfo, StoreLimits

log = logging.getLogger(__name__)
T = TypeVar("T")

# A lease shorter than this would have the keep-alive stream and the reaper busy the one
# event loop that serves every client.
MIN_LEASE_TTL_S = 0.5
ENDED_SESSIONS_REMEMBERED = 10_000  # so a late request gets "ended (why)" rather than "unknown"


class SessionTable:
    def __init__(self, limits: StoreLimits, clock: Callable[[], float]) -> None:
        self.limits = limits
        self.clock = clock
        self.sessions: dict[int, Session] = {}
        self._ended: OrderedDict[int, str] = OrderedDict()  # session id -> why it ended
        self._owner: dict[int, Session] = {}  # sequence or pin id -> its session
        self._next_id = 1  # sequence and pin ids share one space
        self.per_client: Counter[str] = Counter()  # client key -> its open sessions

    def open(self, client_name: str, lease_ttl_s: float, client: str = "") -> SessionInfo:
        """`client`: whom the session counts against for max_sessions_per_client."""
        if lease_ttl_s < 0 or 0 < lease_ttl_s < MIN_LEASE_TTL_S:
            raise InvalidArgument(
                f"lease_ttl_ms={round(lease_ttl_s * 1000)} is {'negative' if lease_ttl_s < 0 else 'too short'}: "
                f"it must be 0 (the daemon's default) or at least {round(MIN_LEASE_TTL_S * 1000)}"
            )
        ttl = min(lease_ttl_s or self.limits.lease_ttl_default_s, self.limits.lease_ttl_max_s)
        if len(self.sessions) >= self.limits.max_sessions:
            raise QuotaExceeded(
                "max_sessions",
                f"{len(self.sessions)} sessions are open; the limit is max_sessions={self.limits.max_sessions}",
            )
        mine, quota = self.per_client[client], self.limits.max_sessions_per_client
        if quota and mine >= quota:
            raise QuotaExceeded(
                "max_sessions_per_client",
                f"{client or 'this client'} has {mine} sessions open; the quota is "
                f"max_sessions_per_client={quota} (close one, or end a session that leaked)",
            )
        sid = secrets.randbits(63) or 1  # unguessable, and never reused by a restarted daemon
        now = self.clock()
        self.sessions[sid] = Session(sid, client_name[:128], ttl, now + ttl, now, client=client)
        self.per_client[client] += 1
        log.info("session %d opened by %r (lease %.1fs)", sid, client_name, ttl)
        return SessionInfo(sid, client_name, ttl)

    def get(self, sid: int) -> Session:
        """The live session `sid`, its lease renewed (any request is a sign of life)."""
        session = self.sessions.get(sid)
        if session is None:
            if sid in self._ended:
                raise FailedPrecondition(f"session {sid} has ended ({self._ended[sid]}); open a new session")
            raise NotFound(f"session_id={sid} does not exist")
        now = self.clock()
        session.last_seen = now
        session.expires_at = now + session.lease_ttl_s
        return session

    def end(self, session: Session, why: str) -> None:
        """Forget a session whose sequences and pins were released; remember why it ended."""
        del self.sessions[session.id]
        self.per_client[session.client] -= 1
        if not self.per_client[session.client]:
            del self.per_client[session.client]
        self._ended[session.id] = why
        while len(self._ended) > ENDED_SESSIONS_REMEMBERED:
            self._ended.popitem(last=False)

    def expired(self) -> list[int]:
        """Sessions whose lease ran out (none while a keep-alive stream is attached)."""
        now = self.clock()
        return [s.id for s in self.sessions.values() if s.streams == 0 and now > s.expires_at]

    def infos(self) -> list[SessionInfo]:
        now = self.clock()
        return [
            SessionInfo(
                s.id,
                s.client_name,
                s.lease_ttl_s,
                len(s.sequences),
                len(s.pins),
                now - s.last_seen,
                s.streams > 0,
            )
            for s in self.sessions.values()
        ]

    # ------------------------------------------------------------ ids and owners

    def new_id(self, session: Session) -> int:
        nid = self._next_id
        self._next_id += 1
        self._owner[nid] = session
        return nid

    def forget_id(self, nid: int) -> None:
        del self._owner[nid]

    def sequence(self, sid: int, seq_id: int) -> tuple[Session, Sequence]:
        session = self.get(sid)
        return session, self._held(session, session.sequences, seq_id, "sequence_id")

    def pin(self, sid: int, pin_id: int) -> tuple[Session, Pin]:
        session = self.get(sid)
        return session, self._held(session, session.pins, pin_id, "pin_id")

    def _held(self, session: Session, held: dict[int, T], nid: int, field: str) -> T:
        """What `session` holds under id `nid`; PermissionDenied if another session does."""
        item = held.get(nid)
        if item is None:
            if self._owner.get(nid, session) is not session:
                raise PermissionDenied(f"{field}={nid} belongs to another session, not {session.id}")
            raise NotFound(f"{field}={nid} does not exist in session {session.id}")
        return item
