"""Domain errors. No grpc here: kvstore/server/status.py maps each class to a
status code once, at the edge. Every message names the field, the value and
the limit, so a person can act on it without reading code."""

from __future__ import annotations

from collections import Counter
from typing import ClassVar


class KVStoreError(Exception):
    """Base of every error the daemon reports to a client."""


class NotFound(KVStoreError):
    """A namespace, session, sequence or pin that does not exist (any more)."""


class InvalidArgument(KVStoreError):
    """A request that can never succeed as written: bad shape, range or type."""


class OutOfRange(KVStoreError):
    """A value past a limit the request itself set (e.g. append past max_tokens)."""


class ResourceExhausted(KVStoreError):
    """Not enough free or evictable pages (or another quota) right now."""


class QuotaExceeded(ResourceExhausted):
    """A configured quota refused the request (docs/security.md, "Quotas"); the message names
    the quota and its limit. Counted by quota name for Stats (QuotaStats.refused): the daemon
    is one process with one store, so one count per process."""

    refused: ClassVar[Counter[str]] = Counter()

    def __init__(self, quota: str, message: str) -> None:
        super().__init__(message)
        self.quota = quota
        QuotaExceeded.refused[quota] += 1


class FailedPrecondition(KVStoreError):
    """The request is well formed but the object is in the wrong state."""


class PermissionDenied(KVStoreError):
    """The session does not own the object it names."""


class AlreadyExists(KVStoreError):
    """Creating something whose name is taken."""


class Unavailable(KVStoreError):
    """A part of the daemon that cannot serve now (e.g. a disk tier disabled after a fault);
    the rest goes on."""


class DeadlineExceeded(KVStoreError):
    """What a call waited for from its client did not come in time (a lane Put's PutWritten)."""


class DataLoss(KVStoreError):
    """Stored bytes that cannot be served (a swapped page lost or corrupt below the pool)."""


class InvariantBroken(KVStoreError):
    """The daemon's own bookkeeping is inconsistent (a bug, never the client's fault): the
    request fails with INTERNAL instead of going on with wrong state. Explicit checks raise
    it where an `assert` would vanish under `python -O`."""


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do about it. Not sent to
    clients (not a KVStoreError)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # 2 when the configuration is at fault, as for ConfigError
