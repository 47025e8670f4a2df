"""What `kvstore-admin stats` and `namespaces` show: the daemon's counters and namespaces as
text and as JSON objects. Also used by the demo (examples/demo.py) to show the same."""

from __future__ import annotations

import dataclasses
from typing import Any

from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

from ..errors import KVStoreClientError
from ..pool import dtype_name
from ..results import Stats, TierStats
from .fmt import count, human_bytes, human_duration, key_values, pct

# A host pool's integrity work (docs/security.md, "Sealed pages"): all 0 on a device pool or
# with page_checksums and zero_freed_pages off.
_INTEGRITY_FIELDS = (
    *("pages_checksummed", "pages_sums_given", "pages_scrubbed", "pages_corrupt", "copies_refused"),
    *("pages_unchecked", "pages_zeroed", "pages_zeroed_inline", "replies_waited_zeroing"),
    "pages_free_unzeroed",
)
_STATS_FIELDS = (
    *("pages_total", "pages_free", "pages_reserved", "pages_sealed", "pages_pinned", "hit_tokens"),
    *("miss_tokens", "evictions", "lookups", "deduplicated_pages", "sequences", "page_bytes", "policy"),
    *(
        "max_session_pages",
        "session_pages_refused",
        "tier_share",
        "share_evictions",
        "host_bytes",
        "disk_bytes",
    ),
    *_INTEGRITY_FIELDS,
)


def stats_dict(stats: Stats) -> dict[str, Any]:
    """The `stats --json` object: counters as the daemon reports them, plus `hit_rate`."""
    namespaces = {
        ns.name: {k: getattr(ns, k) for k in _STATS_FIELDS} | {"hit_rate": ns.hit_rate}
        for ns in stats.namespaces
    }
    out: dict[str, Any] = {
        "version": stats.version,
        "uptime_s": round(stats.uptime_s, 3),
        "sessions": stats.sessions,
        "internal_errors": stats.internal_errors,
        "malformed_requests": stats.malformed_requests,
        "namespaces": namespaces,
    }
    if stats.tiers is not None:
        out["tiers"] = dataclasses.asdict(stats.tiers)
    if stats.quotas is not None:
        out["quotas"] = dataclasses.asdict(stats.quotas)
    if stats.pool_socket is not None:
        out["pool_socket"] = dataclasses.asdict(stats.pool_socket)
    if stats.lane is not None:
        out["lane"] = dataclasses.asdict(stats.lane)
    add_ops(out, stats)
    return out


def add_ops(out: dict[str, Any], stats: Stats) -> None:
    """The operators' part of `stats --json`: build info, RPC calls by method and code, and per
    namespace the bytes committed and hit (docs/observability.md)."""
    out["build"] = dataclasses.asdict(stats.build) if stats.build is not None else None
    out["rpc_calls"] = [dataclasses.asdict(c) for c in stats.rpc_calls]
    for ns in stats.namespaces:
        out["namespaces"][ns.name] |= {"committed_bytes": ns.committed_bytes, "hit_bytes": ns.hit_bytes}


def render_build(stats: Stats) -> str:
    """One line: what the daemon was built from and runs on."""
    b = stats.build
    if b is None:
        return "build: unknown (an older daemon)"
    return (
        f"build: commit {b.git_commit[:12] or 'unknown'}, python {b.python}, grpc {b.grpc}, pools {b.backend}"
    )


def render_tiers(t: TierStats) -> list[str]:
    """The tiers below the pools, for the stats table."""
    rows = []
    if t.host_capacity_bytes:
        used = t.host_bytes_used / t.host_capacity_bytes
        rows.append(
            (
                "host tier",
                f"{human_bytes(t.host_capacity_bytes)}: {pct(used)} used, {count(t.host_pages)} pages",
            )
        )
    if t.disk_capacity_bytes:
        used = t.disk_bytes_used / t.disk_capacity_bytes
        full = f", full {count(t.disk_full_events)} times" if t.disk_full_events else ""
        queued = f", {count(t.disk_queued)} writes queued" if t.disk_queued else ""
        rows.append(
            (
                "disk tier",
                f"{human_bytes(t.disk_capacity_bytes)}: {pct(used)} used, {count(t.disk_pages)} pages"
                f"{full}{queued}{' (write-through)' * t.write_through}",
            )
        )
        if t.disk_disabled:
            rows.append(("disk tier", f"DISABLED: {t.disk_disabled}"))
        if t.disk_moved_aside:
            rows.append(("disk tier", f"corrupt at start: moved aside to {t.disk_moved_aside}"))
        faults = (t.disk_io_errors, t.disk_fs_full_errors, t.disk_queue_dropped)
        if any(faults):
            rows.append(
                (
                    "disk faults",
                    f"{count(faults[0])} I/O errors, {count(faults[1])} file system full, "
                    f"{count(faults[2])} demotions dropped (queue full)",
                )
            )
        if t.reindex_running:
            rows.append(
                (
                    "re-index",
                    f"running: {count(t.reindex_done)} of {count(t.reindex_total)} pages, "
                    f"{human_bytes(t.reindex_bytes_done)} of ~{human_bytes(t.reindex_bytes_total)}",
                )
            )
    rows += [
        (
            "moved",
            f"{count(t.demoted_pages)} pages demoted, {count(t.promoted_pages)} promoted "
            f"({count(t.prefetched_pages)} prefetched, {count(t.promotion_failures)} failed)",
        ),
        ("corrupt", f"{count(t.corrupt_pages)} pages dropped (never served)"),
        ("swapped", f"{count(t.swapped_pages)} pages of swapped-out sequences"),
    ]
    if t.quantized_pages or t.dequantized_pages:
        rows += _quant_rows(t)
    return key_values("tiers", rows)


def _ratio(represented: int, stored: int) -> str:
    return f"{represented / stored:.2f}x" if stored else "-"


def _ms(seconds: float, n: int) -> str:
    return f"{1000 * seconds / n:.2f} ms" if n else "-"


def _quant_rows(t: TierStats) -> list[tuple[str, str]]:
    """Quantized tiers: the compression each tier holds now, what the quantizer made, its time."""
    held = []
    if t.host_capacity_bytes:
        held.append(f"host {_ratio(t.host_bytes_represented, t.host_bytes_used)}")
    if t.disk_capacity_bytes:
        held.append(f"disk {_ratio(t.disk_bytes_represented, t.disk_bytes_used)}")
    made, undone = t.quantized_pages, t.dequantized_pages
    return [
        ("compression", ", ".join(held) + " (pool bytes represented / bytes stored)"),
        (
            "quantized",
            f"{count(made)} pages ({_ratio(t.quant_bytes_represented, t.quant_bytes_stored)}), layers: "
            f"{count(t.quant_layers_int4)} int4, {count(t.quant_layers_int8)} int8, {count(t.quant_layers_fp)} fp; "
            f"{count(t.quant_fallbacks)} over the error bound stored more precisely; "
            f"{_ms(t.quantize_seconds, made)} a page",
        ),
        (
            "dequantized",
            f"{count(undone)} pages, {_ms(t.dequantize_seconds, undone)} a page; "
            f"{count(t.dequantize_failures)} refused (never served), "
            f"{count(t.not_requantized)} not quantized twice",
        ),
    ]


def render_stats(stats: Stats, target: str = "") -> str:
    """The human-readable stats: a header line, then one small table per namespace."""
    where = f" at {target}" if target else ""
    out = [
        f"kvstore {stats.version or '?'}{where}: up {human_duration(stats.uptime_s)}, "
        f"{stats.sessions} session{'s' * (stats.sessions != 1)}",
        render_build(stats),
    ]
    if stats.internal_errors or stats.malformed_requests:
        out.append(
            f"{count(stats.internal_errors)} calls failed INTERNAL (daemon bugs: see its log), "
            f"{count(stats.malformed_requests)} malformed requests refused"
        )
    if stats.quotas is not None and stats.quotas.refused:
        refused = ", ".join(f"{name} {count(n)}" for name, n in sorted(stats.quotas.refused.items()))
        out.append(f"refused by quotas (RESOURCE_EXHAUSTED): {refused}")
    if stats.pool_socket is not None:
        p = stats.pool_socket
        refused = ", ".join(f"{why} {count(n)}" for why, n in sorted(p.refused.items()) if n) or "none"
        out.append(f"pool socket: {count(p.granted)} descriptors handed out; refused: {refused}")
    if stats.lane is not None:
        la = stats.lane
        out.append(
            f"lane: {count(la.calls)} calls, {count(la.open)} connections open "
            f"({count(la.connections)} since start, {count(la.refused)} refused), "
            f"{count(la.puts_followed)} puts sent before their copies"
        )
    for ns in stats.namespaces:
        total = ns.pages_total
        used = (total - ns.pages_free) / total if total else 0.0
        rows = [
            ("policy", ns.policy),
            (
                "page size",
                f"{human_bytes(ns.page_bytes)}  (KV capacity {human_bytes(ns.page_bytes * total)})",
            ),
            (
                "pages",
                f"{count(total)} total: {count(ns.pages_free)} free, {count(ns.pages_reserved)} reserved, "
                f"{count(ns.pages_sealed)} sealed ({count(ns.pages_pinned)} pinned)",
            ),
            ("used", f"{pct(used)}  ({count(total - ns.pages_free)} of {count(total)} pages)"),
            (
                "hit rate",
                f"{pct(ns.hit_rate)}  ({count(ns.hit_tokens)} hit / {count(ns.miss_tokens)} miss tokens "
                f"in {count(ns.lookups)} lookup{'s' * (ns.lookups != 1)})",
            ),
            ("evictions", f"{count(ns.evictions)} pages"),
            ("deduplicated", f"{count(ns.deduplicated_pages)} pages"),
            ("sequences", f"{count(ns.sequences)} open"),
        ]
        if any(getattr(ns, f) for f in _INTEGRITY_FIELDS):
            rows.append(
                (
                    "integrity",
                    f"{count(ns.pages_checksummed)} pages checksummed at seal, {count(ns.pages_sums_given)} "
                    f"by their writers, {count(ns.pages_unchecked)} left unchecked; "
                    f"{count(ns.pages_scrubbed)} scrubbed, {count(ns.pages_corrupt)} corrupt "
                    f"({count(ns.copies_refused)} copies below refused); {count(ns.pages_zeroed)} freed "
                    f"pages zeroed, {count(ns.pages_zeroed_inline)} on the loop "
                    f"({count(ns.replies_waited_zeroing)} replies waited), "
                    f"{count(ns.pages_free_unzeroed)} free not zeroed yet",
                )
            )
        if ns.max_session_pages:
            quota = (
                f"{count(ns.max_session_pages)} pages a session ({count(ns.session_pages_refused)} refused)"
            )
            rows.append(("session quota", quota))
        if ns.tier_share or ns.host_bytes or ns.disk_bytes:
            share = f"{pct(ns.tier_share)} of each tier" if ns.tier_share else "none"
            rows.append(
                (
                    "below the pool",
                    f"host {human_bytes(ns.host_bytes)}, disk {human_bytes(ns.disk_bytes)}; share {share} "
                    f"({count(ns.share_evictions)} pages moved out at it)",
                )
            )
        out += key_values(f"namespace {ns.name}", rows)
    if not stats.namespaces:
        out += ["", "no namespaces"]
    if stats.tiers is not None:
        out += render_tiers(stats.tiers)
    return "\n".join(out)


def _dtype_name(dtype: int) -> str:
    try:
        return dtype_name(dtype)
    except KVStoreClientError:
        return pb.DType.Name(dtype) if dtype in pb.DType.values() else str(dtype)


def namespace_dict(info: pb.NamespaceInfo) -> dict[str, Any]:
    """One namespace of `namespaces --json`: geometry, pool and policy."""
    g, p = info.geometry, info.pool
    return {
        "num_layers": g.num_layers,
        "num_kv_heads": g.num_kv_heads,
        "head_dim": g.head_dim,
        "dtype": _dtype_name(g.dtype),
        "page_tokens": g.page_tokens,
        "vocab_size": g.vocab_size,
        "page_bytes": p.page_bytes,
        "page_stride": p.page_stride,
        "num_pages": p.num_pages,
        "pool_bytes": p.nbytes,
        "device": p.device,
        "pool_epoch": f"{p.pool_epoch:016x}",  # the pool's identity (it has no name: a memfd)
        "layout": p.layout,
        "page_shape": list(p.page_shape),
        "policy": info.policy,
        "model_fingerprint": info.model_fingerprint,
        # How the host and disk tiers store its pages (docs/tiers.md, "Quantized tiers").
        "tier_dtype": info.tier_precision.dtype or "fp",
        "tier_schedule": info.tier_precision.schedule,
        "tier_error_bound": info.tier_precision.error_bound,
    }
