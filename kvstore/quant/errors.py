"""The errors of the quantized page codec. A record that fails any check is refused whole:
nothing of it is ever dequantized into a page."""

from __future__ import annotations


class QuantError(ValueError):
    """Base of the codec's errors."""


class CorruptRecord(QuantError):
    """Not a record this version can trust: bad magic, unknown version, checksum mismatch,
    wrong length, invalid header codes or outlier indices. `reason` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"corrupt quantized page record: {reason}")
        self.reason = reason


class RecordMismatch(QuantError):
    """A well-formed record of another page geometry or dtype than the one asked for."""


class SchemeError(QuantError):
    """An invalid scheme or encode argument (precision name, outlier count, sink tokens)."""
