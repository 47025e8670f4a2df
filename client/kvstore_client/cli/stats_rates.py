"""What `kvstore-admin stats --watch` adds to each refresh: rates over the interval since the
previous reading, from the difference of the daemon's counters. The interval is the
difference of the daemon's own uptime at the two readings, so the rates do not depend on
when the command woke up."""

from __future__ import annotations

from typing import Any

from ..results import Stats
from .fmt import count, human_bytes, key_values, pct

# Calls that commit KV into the pool: one "put" each (a batch is one call).
PUT_METHODS = frozenset({"KVStore/Put", "KVStore/Commit", "KVStore/Seal", "KVStore/BatchSeal"})
UNSEEN = "- (needs the daemon-wide stats: no --namespace; with tokens, read on '*')"


def _total(stats: Stats, field: str) -> int:
    return sum(getattr(ns, field) for ns in stats.namespaces)


def _calls(stats: Stats) -> tuple[int, dict[str, int]]:
    """(OK calls of the put methods, calls by error code) since the daemon started."""
    puts, errors = 0, {}
    for c in stats.rpc_calls:
        if c.code == "OK":
            puts += c.calls if c.method in PUT_METHODS else 0
        else:
            errors[c.code] = errors.get(c.code, 0) + c.calls
    return puts, errors


def rates(prev: Stats, cur: Stats) -> dict[str, Any] | None:
    """The `rates` object of `stats --watch --json` (and what `render_rates` shows): `counts`
    is what changed between the readings, the `*_per_s` those over `interval_s`. Puts and RPC
    errors need `rpc_calls`, which only a daemon-wide reply to a caller reading every namespace
    has (no --namespace; with tokens, read on "*"): None otherwise. (A second reading always
    has calls if it may: the first reading's Stats.) None when the daemon restarted between
    the readings (its counters started again)."""
    interval = cur.uptime_s - prev.uptime_s
    if interval <= 0:
        return None
    daemon_wide = bool(cur.rpc_calls)
    counts: dict[str, Any] = {
        field: _total(cur, field) - _total(prev, field)
        for field in ("lookups", "hit_tokens", "miss_tokens", "committed_bytes", "hit_bytes", "evictions")
    }
    if daemon_wide:
        (puts0, errors0), (puts1, errors1) = _calls(prev), _calls(cur)
        counts["puts"] = puts1 - puts0
        counts["rpc_errors"] = {
            code: n - errors0.get(code, 0) for code, n in sorted(errors1.items()) if n > errors0.get(code, 0)
        }
    else:
        counts["puts"] = counts["rpc_errors"] = None
    looked_up = counts["hit_tokens"] + counts["miss_tokens"]
    out: dict[str, Any] = {
        "interval_s": round(interval, 6),
        "lookups_per_s": counts["lookups"] / interval,
        "hit_rate": counts["hit_tokens"] / looked_up if looked_up else None,
        "puts_per_s": counts["puts"] / interval if daemon_wide else None,
        "bytes_in_per_s": counts["committed_bytes"] / interval,
        "bytes_out_per_s": counts["hit_bytes"] / interval,
        "evictions_per_s": counts["evictions"] / interval,
        "rpc_errors_per_s": (
            {code: n / interval for code, n in counts["rpc_errors"].items()} if daemon_wide else None
        ),
        "counts": counts,
    }
    return out


def _per_s(x: float) -> str:
    return f"{x:,.1f}/s"


def render_rates(r: dict[str, Any] | None, first: bool) -> list[str]:
    """The rates block under the stats table."""
    if r is None:
        why = "from the next reading on" if first else "the daemon restarted: from the next reading on"
        return ["", f"rates: {why}"]
    c = r["counts"]
    errors = r["rpc_errors_per_s"]
    rows = [
        ("lookups", f"{_per_s(r['lookups_per_s'])}  ({count(c['lookups'])} in the interval)"),
        ("hit rate", f"{pct(r['hit_rate'])} of the tokens looked up in the interval"),
        ("puts", UNSEEN if r["puts_per_s"] is None else _per_s(r["puts_per_s"])),
        (
            "bytes",
            f"in {human_bytes(r['bytes_in_per_s'])}/s (committed), out {human_bytes(r['bytes_out_per_s'])}/s (hits)",
        ),
        ("evictions", f"{r['evictions_per_s']:,.1f} pages/s"),
        (
            "RPC errors",
            UNSEEN
            if errors is None
            else ", ".join(f"{code} {_per_s(x)}" for code, x in errors.items()) or "none",
        ),
    ]
    return key_values(f"rates over the last {r['interval_s']:.1f}s", rows)
