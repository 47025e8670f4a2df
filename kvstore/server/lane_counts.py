"""The lane's counters (kvstore/server/lane.py): `Stats.lane` and the `kvstore_lane_*` metrics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LaneCounts:
    """Loop-owned; the metrics thread reads a copy (MetricsServer.publish)."""

    calls: int = 0  # requests answered on the lane (any status)
    connections: int = 0  # connections accepted since start
    open: int = 0  # connections open now
    refused: int = 0  # connections closed for a bad hello or an oversize frame
    puts_followed: int = 0  # Puts with bytes_follow whose PutWritten frame came (docs/api.md)

    def copy(self) -> LaneCounts:
        return LaneCounts(self.calls, self.connections, self.open, self.refused, self.puts_followed)
