"""Text in and out of `kvstore-admin`: sizes, durations, token lists, tables. Shared by its
commands (admin.py, admin_explain.py, stats_view.py) and the demo (examples/demo.py)."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence
from typing import Any

PROG = "kvstore-admin"
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, the same text as the daemon's config and logs)."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        scale = _UNITS[unit[0].lower()]
        if n >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{int(n)} B"


def human_duration(seconds: float) -> str:
    """3725.2 -> '1h 02m 05s'."""
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {s:02d}s"
    if minutes:
        return f"{minutes}m {s:02d}s"
    return f"{seconds:.1f}s"


def parse_bytes(text: str) -> int:
    """'64MiB', '64M', '1.5 GiB', '4096' -> bytes (k/m/g/t are powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m or (m.group(3) and not m.group(2) and m.group(3) != "b"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use e.g. 4096, 64MiB, 1.5GiB")
    return math.ceil(float(m.group(1)) * _UNITS[m.group(2)])


def parse_tokens(text: str) -> list[int]:
    """'1,2,3' or '1 2 3' -> [1, 2, 3]."""
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    try:
        tokens = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of token ids like 1,2,3") from None
    if not tokens:
        raise argparse.ArgumentTypeError("need at least one token id")
    return tokens


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a number of seconds > 0")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a whole number > 0")
    return value


def count(x: int) -> str:
    """12345 -> '12,345'."""
    return f"{x:,}"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def one_line(text: str) -> str:
    return " ".join(text.split())


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned text columns, two spaces apart; numbers right-aligned."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(isinstance(r[i], int | float) for r in rows) for i in range(len(header))]
    lines = []
    for row in cells:
        out = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True)]
        lines.append("  ".join(out).rstrip())
    return "\n".join(lines)


def key_values(title: str, rows: Sequence[tuple[str, str]]) -> list[str]:
    """A titled block of `key  value` lines, keys padded to one width."""
    width = max(len(k) for k, _ in rows)
    return ["", title, *(f"  {k.ljust(width)}  {v}" for k, v in rows)]
