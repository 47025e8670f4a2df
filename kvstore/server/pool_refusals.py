"""Why the pool socket refused a request, counted by reason (docs/observability.md, "The pool
socket"): `kvstore_pool_socket_refused_total{reason}` in Prometheus and `Stats.pool_socket`.

The reasons are a fixed set, so the metric's `reason` label is bounded whatever a client
sends; every reason's counter exists from the start (at 0). A refusal is also logged, with
its text (what the client is told).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvstore.errors import InvariantBroken

REASONS = {
    "unknown_ticket": "a ticket the daemon never issued (or forgot: expired and dropped)",
    "used_ticket": "a ticket presented before (a ticket is good once)",
    "expired_ticket": "a ticket past its time to live",
    "wrong_token": "a ticket presented with another token than the one it was issued to",
    "pool_gone": "the ticket's pool was deleted or created again since",
    "open_failed": "the pool's descriptor could not be opened",
    "malformed": "not a pool socket request (wrong magic or version, token too long, not UTF-8)",
    "incomplete": "the client closed the connection before a whole request",
    "timeout": "no whole request within the read timeout (an idle connection)",
    "busy": "more connections than the daemon reads at once: closed unanswered",
}


class Refused(Exception):
    """Why a request gets no descriptor: `reason` (one of REASONS) for the counters, the text
    for the client and the log."""

    def __init__(self, reason: str, text: str) -> None:
        if reason not in REASONS:  # the metric's label set stays bounded
            raise InvariantBroken(f"pool socket refusal reason {reason!r} is not one of REASONS")
        super().__init__(text)
        self.reason = reason


@dataclass
class PoolSocketCounts:
    """Loop-owned; the metrics thread reads a copy (MetricsServer.publish)."""

    granted: int = 0  # descriptors handed out
    refused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))

    def copy(self) -> PoolSocketCounts:
        return PoolSocketCounts(self.granted, dict(self.refused))
