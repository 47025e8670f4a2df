"""The operators' part of the Stats reply: build info, RPC calls by method and status, the
lookups' remembered hashes (docs/observability.md). The same numbers as the metrics
kvstore_build_info, kvstore_rpc_calls_total and kvstore_hash_memo_*."""

from __future__ import annotations

from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

from kvstore.build_info import build_info
from kvstore.hashing import memo_stats
from kvstore.server.rpc_metrics import RpcMetrics
from kvstore.store.store import Store


def backend_kinds(store: Store | None) -> str:
    """The kinds of the pools now, e.g. "cpu_memfd"; "none" without a namespace."""
    if store is None:
        return "none"
    kinds = sorted({ns.pool.handle.handle_type.name.lower() for ns in store.namespaces.values()})
    return ",".join(kinds) or "none"


def build_labels(store: Store | None) -> dict[str, str]:
    """kvstore_build_info's labels, BuildInfo's fields."""
    b = build_info()
    return {
        "version": b.version,
        "git_commit": b.git_commit,
        "python": b.python,
        "grpc": b.grpc,
        "backend": backend_kinds(store),
    }


def fill(
    reply: pb.StatsResponse, store: Store, rpc: RpcMetrics | None, daemon_wide: bool
) -> pb.StatsResponse:
    """Adds `build`, and (daemon-wide replies only: they count every tenant's calls) `rpc_calls`
    and `hash_memo`."""
    reply.build.CopyFrom(pb.BuildInfo(**build_labels(store)))
    if daemon_wide:
        reply.hash_memo.CopyFrom(pb.HashMemoStats(**memo_stats(store.hash_memo)))
    if daemon_wide and rpc is not None:
        for method, code, calls in rpc.counts():
            reply.rpc_calls.add(method=method, code=code, calls=calls)
    return reply
