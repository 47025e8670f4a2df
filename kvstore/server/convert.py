"""Conversions between store types and protobuf messages. Nothing else."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from kvstore_proto import dtypes
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

from kvstore.errors import InvalidArgument
from kvstore.observe.explain import Verdict
from kvstore.store import types as t

try:  # (the daemon's C loops, kvstore/_chainhash.c; absent where it is not built)
    from kvstore._chainhash import encode_fields
except ImportError:
    encode_fields = None

_KINDS = {  # encode_fields' kinds (kvstore/_replyenc.c)
    FieldDescriptor.TYPE_UINT32: 0,
    FieldDescriptor.TYPE_UINT64: 1,
    FieldDescriptor.TYPE_INT64: 2,
    FieldDescriptor.TYPE_FIXED64: 3,
    FieldDescriptor.TYPE_BYTES: 4,
}
# In field number order: the bytes are those protobuf's own serialization writes.
_LOOKUP_FIELDS = (
    "hit_tokens", "pin_id", "slots", "block_hashes", "ready_pages", "pool_epoch", "pin_ttl_ms", "pin_deadline_ns",
)  # fmt: skip
_LOOKUP_LAYOUT = tuple(
    (f.number, 5 if f.is_repeated else _KINDS[f.type])  # (5: packed uint32, the only repeated one)
    for f in map(pb.LookupResponse.DESCRIPTOR.fields_by_name.__getitem__, _LOOKUP_FIELDS)
)
_parse_lookup = pb.LookupResponse.FromString


def _lookup_reply_bytes_py(
    hit_tokens: int,
    pin_id: int,
    slots: list[int],
    block_hashes: list[bytes],
    ready_pages: int,
    pool_epoch: int,
    pin_ttl_ms: int,
    pin_deadline_ns: int,
) -> bytes:
    """`lookup_reply_bytes` where the C module is not built: the message built and serialized."""
    return pb.LookupResponse(
        hit_tokens=hit_tokens,
        block_hashes=b"".join(block_hashes),
        pin_id=pin_id,
        ready_pages=ready_pages,
        pool_epoch=pool_epoch,
        pin_ttl_ms=pin_ttl_ms,
        pin_deadline_ns=pin_deadline_ns,
        slots=slots,
    ).SerializeToString()


# lookup_reply_bytes(hit_tokens, pin_id, slots, block_hashes, ready_pages, pool_epoch,
# pin_ttl_ms, pin_deadline_ns) -> bytes: a serialized LookupResponse (`block_hashes` joined),
# its fields given in field number order, encoded in C in one call: the Lookup RPC answers with
# these bytes as they are (no message built, none serialized). The layout bound in a partial:
# no Python frame between the servicer and the C encoder.
lookup_reply_bytes = (
    functools.partial(encode_fields, _LOOKUP_LAYOUT) if encode_fields is not None else _lookup_reply_bytes_py
)


def lookup_response(*fields: Any) -> pb.LookupResponse:
    """The LookupResponse of `lookup_reply_bytes(*fields)`, parsed (a BatchLookup's item)."""
    return _parse_lookup(lookup_reply_bytes(*fields))


def add_page_refs(field: RepeatedCompositeFieldContainer[pb.PageRef], refs: list[t.PageRef]) -> None:
    """Append `refs` to a reply's repeated PageRef field (`add()` is faster than building a list)."""
    for ref in refs:
        field.add(
            index=ref.index,
            slot=ref.slot,
            state=pb.CACHED if ref.cached else pb.WRITABLE,
            token_start=ref.token_start,
            token_count=ref.token_count,
            block_hash=ref.block_hash,
            private=ref.private,
        )


BUDGET_FROM_PB = {
    pb.BUDGET_UNCONSTRAINED: t.UNCONSTRAINED,
    pb.BUDGET_STATIC: t.STATIC,
    pb.BUDGET_SLIDING_WINDOW: t.SLIDING_WINDOW,
    pb.BUDGET_IMPORTANCE: t.IMPORTANCE,
}
BUDGET_TO_PB = {v: k for k, v in BUDGET_FROM_PB.items()}


def sequence_options(msg: pb.SequenceOptions) -> t.SequenceOptions:
    if msg.mode not in BUDGET_FROM_PB:
        raise InvalidArgument(
            f"options.mode={msg.mode} is not a known BudgetMode; use one of "
            + ", ".join(pb.BudgetMode.Name(v) for v in BUDGET_FROM_PB)
        )
    return t.SequenceOptions(
        mode=BUDGET_FROM_PB[msg.mode],
        sink_tokens=msg.sink_tokens,
        window_tokens=msg.window_tokens,
        budget_pages=msg.budget_pages,
    )


def sequence_options_pb(o: t.SequenceOptions) -> pb.SequenceOptions:
    return pb.SequenceOptions(
        mode=BUDGET_TO_PB[o.mode],
        sink_tokens=o.sink_tokens,
        window_tokens=o.window_tokens,
        budget_pages=o.budget_pages,
    )


def namespace_info(info: t.NamespaceInfo) -> pb.NamespaceInfo:
    spec, pool = info.spec, info.pool
    return pb.NamespaceInfo(
        name=spec.name,
        geometry=pb.Geometry(
            num_layers=spec.num_layers,
            num_kv_heads=spec.num_kv_heads,
            head_dim=spec.head_dim,
            dtype=dtypes.BY_NAME[spec.dtype].wire,
            page_tokens=spec.page_tokens,
            vocab_size=spec.vocab_size,
        ),
        pool=pb.PoolDescriptor(
            handle_type=int(pool.handle.handle_type),
            device=pool.handle.device,
            ipc_handle=pool.handle.ipc_handle,
            offset=pool.handle.offset,
            nbytes=pool.handle.nbytes,
            pool_epoch=pool.handle.epoch,
            num_pages=pool.num_pages,
            page_bytes=pool.page_bytes,
            page_stride=pool.page_stride,
            layout=pool.layout,
            page_shape=list(pool.page_shape),
            dtype=dtypes.BY_NAME[pool.dtype].wire,
            alloc_nbytes=pool.handle.alloc_nbytes,
            host_id=pool.handle.host_id,
            sync_mode=int(pool.handle.sync_mode),
        ),
        policy=spec.policy,
        model_fingerprint=spec.model_fingerprint,
        tier_precision=pb.TierPrecision(
            dtype=spec.tier_dtype, schedule=spec.tier_schedule, error_bound=spec.tier_error_bound
        ),
        max_session_pages=spec.max_session_pages,
        tier_share=spec.tier_share,
    )


def namespace_spec(msg: pb.NamespaceSpec, default_policy: str) -> t.NamespaceSpec:
    g = msg.geometry
    if g.dtype not in dtypes.BY_WIRE:
        raise InvalidArgument(
            f"spec.geometry.dtype={g.dtype} is not a known DType; use one of "
            + ", ".join(d.wire_name for d in dtypes.DTYPES)
        )
    return t.NamespaceSpec(
        name=msg.name,
        num_layers=g.num_layers,
        num_kv_heads=g.num_kv_heads,
        head_dim=g.head_dim,
        dtype=dtypes.BY_WIRE[g.dtype].name,
        page_tokens=g.page_tokens,
        num_pages=msg.num_pages,
        vocab_size=g.vocab_size,
        policy=msg.policy or default_policy,
        salt=msg.salt,
        model_fingerprint=msg.model_fingerprint,
        device=msg.device or "cpu",
        tier_dtype=msg.tier_precision.dtype or "fp",
        tier_schedule=msg.tier_precision.schedule,
        tier_error_bound=msg.tier_precision.error_bound,
        max_session_pages=msg.max_session_pages,
        tier_share=msg.tier_share,
    )


def namespace_stats(s: t.NamespaceStats) -> pb.NamespaceStats:
    return pb.NamespaceStats(
        name=s.name,
        page_bytes=s.page_bytes,
        pages_total=s.pages_total,
        pages_free=s.pages_free,
        pages_reserved=s.pages_reserved,
        pages_sealed=s.pages_sealed,
        pages_pinned=s.pages_pinned,
        hit_tokens=s.hit_tokens,
        miss_tokens=s.miss_tokens,
        evictions=s.evictions,
        lookups=s.lookups,
        deduplicated_pages=s.deduplicated_pages,
        sequences=s.sequences,
        policy=s.policy,
        budget_dropped_pages=s.budget_dropped_pages,
        pages_quarantined=s.pages_quarantined,
        pages_free_unzeroed=s.pages_free_unzeroed,
        committed_bytes=s.committed_bytes,
        hit_bytes=s.hit_bytes,
        pages_checksummed=s.pages_checksummed,
        pages_scrubbed=s.pages_scrubbed,
        pages_corrupt=s.pages_corrupt,
        copies_refused=s.copies_refused,
        pages_zeroed=s.pages_zeroed,
        pages_zeroed_inline=s.pages_zeroed_inline,
        pages_unchecked=s.pages_unchecked,
        replies_waited_zeroing=s.replies_waited_zeroing,
        pages_sums_given=s.pages_sums_given,
        max_session_pages=s.max_session_pages,
        session_pages_refused=s.session_pages_refused,
        tier_share=s.tier_share,
        share_evictions=s.share_evictions,
        host_bytes=s.host_bytes,
        disk_bytes=s.disk_bytes,
    )


def quota_stats(limits: t.StoreLimits, refused: Mapping[str, int]) -> pb.QuotaStats:
    return pb.QuotaStats(
        max_sessions=limits.max_sessions,
        max_sessions_per_client=limits.max_sessions_per_client,
        max_request_tokens=limits.max_request_tokens,
        refused=dict(refused),
    )


def session_info(s: t.SessionInfo) -> pb.SessionInfo:
    return pb.SessionInfo(
        session_id=s.session_id,
        client_name=s.client_name,
        sequences=s.sequences,
        pins=s.pins,
        idle_s=s.idle_s,
        stream_attached=s.stream_attached,
    )


def evict_response(r: t.EvictResult) -> pb.EvictResponse:
    return pb.EvictResponse(
        pages_evicted=r.pages_evicted, bytes_freed=r.bytes_freed, pages_skipped_pinned=r.pages_skipped_pinned
    )


def tier_stats(d: dict[str, Any]) -> pb.TierStats:
    """kvstore/store/tiering/tiers.py's `Tiers.stats()` on the wire."""
    host, disk, reindex, q = d.get("host", {}), d.get("disk", {}), d["reindex"], d["quant"]
    return pb.TierStats(
        host_capacity_bytes=host.get("capacity_bytes", 0),
        host_bytes_used=host.get("bytes_used", 0),
        host_pages=host.get("pages", 0),
        disk_capacity_bytes=disk.get("capacity_bytes", 0),
        disk_bytes_used=disk.get("bytes_used", 0),
        disk_pages=disk.get("pages", 0),
        disk_full_events=disk.get("disk_full_events", 0),
        corrupt_pages=host.get("corrupt", 0) + disk.get("corrupt", 0),
        demoted_pages=d["demoted_host"] + d["demoted_disk"] + d["demoted_clean"],
        promoted_pages=d["promoted_host"] + d["promoted_disk"],
        prefetched_pages=d["prefetched"],
        promotion_failures=d["promotion_failures"],
        swapped_pages=d["swapped_pages"],
        write_through=d["write_through"],
        reindex_running=reindex["running"],
        reindex_done=reindex["done"],
        reindex_total=reindex["total"],
        disk_queued=disk.get("queued", 0),
        disk_disabled=disk.get("disabled", ""),
        disk_moved_aside=disk.get("moved_aside", ""),
        disk_io_errors=disk.get("io_errors", 0),
        disk_fs_full_errors=disk.get("fs_full_errors", 0),
        disk_queued_bytes=disk.get("queued_bytes", 0),
        disk_queue_dropped=d.get("disk_queue_dropped", 0),
        flushes_running=disk.get("flushing", 0),
        host_bytes_represented=host.get("bytes_represented", 0),
        disk_bytes_represented=disk.get("bytes_represented", 0),
        quantized_pages=q["quantized_pages"],
        quant_layers_fp=q["layers_fp"],
        quant_layers_int8=q["layers_int8"],
        quant_layers_int4=q["layers_int4"],
        quant_fallbacks=q["fallbacks"],
        quant_bytes_stored=q["bytes_stored"],
        quant_bytes_represented=q["bytes_represented"],
        quantize_seconds=q["quantize_s"],
        dequantized_pages=q["dequantized_pages"],
        dequantize_seconds=q["dequantize_s"],
        dequantize_failures=q["dequantize_failures"],
        not_requantized=q["not_requantized"],
        reindex_bytes_done=reindex["bytes_done"],
        reindex_bytes_total=reindex["bytes_total"],
    )


EXPLAIN_VERDICT_TO_PB = {v: pb.ExplainVerdict.Value(v.name) for v in Verdict}


def explain_response(e: Any) -> pb.ExplainResponse:
    """kvstore.observe.explain.Explanation -> ExplainResponse."""
    reply = pb.ExplainResponse(
        namespace=e.namespace,
        policy=e.policy,
        model_fingerprint=e.model_fingerprint,
        page_tokens=e.page_tokens,
        num_tokens=e.num_tokens,
        hit_tokens=e.hit_tokens,
        summary=e.summary,
    )
    for p in e.pages:
        reply.pages.add(
            index=p.index,
            token_start=p.token_start,
            token_count=p.token_count,
            block_hash=p.block_hash,
            verdict=EXPLAIN_VERDICT_TO_PB[p.verdict],
            where=EXPLAIN_VERDICT_TO_PB[p.where] if p.where else pb.EXPLAIN_VERDICT_UNSPECIFIED,
            evicted_unix_ms=p.evicted_unix_ms,
            evicted_by=p.evicted_by,
            evicted_for=p.evicted_for,
            other_namespace=p.other_namespace,
            detail=p.detail,
        )
    return reply


def mrc_response(r: Any) -> pb.MrcResponse:
    """kvstore.observe.mrc_curve.MrcResult -> MrcResponse."""
    reply = pb.MrcResponse(
        namespace=r.namespace,
        policy=r.policy,
        pool_pages=r.pool_pages,
        page_bytes=r.page_bytes,
        sample_rate=r.sample_rate,
        sampled_accesses=r.sampled_accesses,
        accesses=r.accesses,
        sampled_blocks=r.sampled_blocks,
    )
    for pages, rate in r.points:
        reply.points.add(
            capacity_pages=pages,
            capacity_bytes=pages * r.page_bytes,
            hit_rate=rate,
            current=pages == r.pool_pages,
        )
    return reply
