"""Plain results handed to users instead of raw protobuf where they act on them
(pages to write, counts to check, stats). Metadata that is only read (NamespaceInfo,
SessionInfo) stays protobuf: its fields are documented in the proto."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from kvstore_proto.kvstore.v1 import kvstore_pb2


class PageState(enum.IntEnum):
    WRITABLE = kvstore_pb2.WRITABLE  # reserved for this sequence: write its bytes
    CACHED = kvstore_pb2.CACHED  # sealed (shared or committed): bytes present, never write


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a sequence or lookup.

    In an append reply, `token_start`/`token_count` are the tokens *of that reply*
    inside the page; in a sequence's page table (`Sequence.pages`) they are the
    page's filled range, i.e. token_start=0 and token_count=tokens present.
    """

    index: int  # position in the sequence, 0-based
    slot: int  # page number in the pool: `Namespace.page(slot)`
    state: PageState
    token_start: int = 0
    token_count: int = 0
    block_hash: bytes = b""  # 16 bytes once the page is full
    private: bool = False  # written after a budget drop: never sealed, never shared

    @classmethod
    def from_proto(cls, ref: kvstore_pb2.PageRef) -> Page:
        state = PageState(ref.state) if ref.state else PageState.WRITABLE
        return cls(
            ref.index, ref.slot, state, ref.token_start, ref.token_count, bytes(ref.block_hash), ref.private
        )

    @property
    def writable(self) -> bool:
        return self.state is PageState.WRITABLE

    @property
    def token_end(self) -> int:
        return self.token_start + self.token_count


def pages_from_proto(refs: list[kvstore_pb2.PageRef]) -> list[Page]:
    return [Page.from_proto(r) for r in refs]


@dataclass(frozen=True, slots=True)
class AppendResult:
    num_tokens: int  # tokens in the sequence after the append
    pages: list[Page]  # every page the appended tokens landed in, in order
    cached_tokens: int  # appended tokens that landed in CACHED pages (no KV to write)
    dropped: list[int] = field(default_factory=list)  # page indices the budget dropped: forget them

    @property
    def writable_pages(self) -> list[Page]:
        """The pages whose bytes the caller must write before committing."""
        return [p for p in self.pages if p.writable]

    @property
    def cached_pages(self) -> list[Page]:
        return [p for p in self.pages if not p.writable]


BUDGET_MODES = {
    "unconstrained": kvstore_pb2.BUDGET_UNCONSTRAINED,
    "static": kvstore_pb2.BUDGET_STATIC,
    "sliding_window": kvstore_pb2.BUDGET_SLIDING_WINDOW,
    "importance": kvstore_pb2.BUDGET_IMPORTANCE,
}


@dataclass(frozen=True, slots=True)
class SequenceOptions:
    """A sequence's cache budget (docs/api.md, "Budgets"). Build one with a classmethod:

        SequenceOptions.sliding_window(window_tokens=1024, sink_tokens=4)
        SequenceOptions.importance(budget_pages=64, sink_tokens=4)

    Static preallocation is `allocate(ns, max_tokens=n)` (or mode="static" with it).
    """

    mode: str = "unconstrained"  # one of BUDGET_MODES
    sink_tokens: int = 0
    window_tokens: int = 0
    budget_pages: int = 0

    @classmethod
    def sliding_window(cls, window_tokens: int, sink_tokens: int = 0) -> SequenceOptions:
        return cls("sliding_window", sink_tokens=sink_tokens, window_tokens=window_tokens)

    @classmethod
    def importance(cls, budget_pages: int, sink_tokens: int = 0) -> SequenceOptions:
        return cls("importance", sink_tokens=sink_tokens, budget_pages=budget_pages)

    @classmethod
    def from_proto(cls, msg: kvstore_pb2.SequenceOptions) -> SequenceOptions:
        mode = next((k for k, v in BUDGET_MODES.items() if v == msg.mode), str(msg.mode))
        return cls(mode, msg.sink_tokens, msg.window_tokens, msg.budget_pages)


@dataclass(frozen=True, slots=True)
class CommitResult:
    sealed_pages: int  # pages that became visible to lookups
    deduplicated_pages: int  # pages someone else sealed first; ours were freed
    moved: list[Page] = field(default_factory=list)  # pages whose slot changed (already applied)


@dataclass(frozen=True, slots=True)
class ReleaseResult:
    pages_freed: int
    pages_unpinned: int


@dataclass(frozen=True, slots=True)
class EvictResult:
    pages_evicted: int
    bytes_freed: int
    pages_skipped_pinned: int


@dataclass(frozen=True, slots=True)
class CloseResult:
    sequences_released: int
    pins_released: int


@dataclass(frozen=True, slots=True)
class PreemptResult:
    pages_swapped: int  # pages of the sequence now below the pool (0 for a drop)
    pages_freed: int  # pool pages given back


@dataclass(frozen=True, slots=True)
class DeleteNamespaceResult:
    sequences_released: int  # with force: sequences that were still live
    pins_released: int  # with force: pins that were still held


@dataclass(frozen=True, slots=True)
class FlushResult:
    pages_written: int  # queued for disk by this flush
    disk_pages: int  # pages on disk after it
    seconds: float


# ---------------------------------------------------------------- stats
# The field names and meanings are the proto's (NamespaceStats, TierStats, StatsResponse in
# proto/kvstore/v1/kvstore.proto); a test holds each dataclass to its message's fields.

_D = TypeVar("_D")


def _from_message(cls: type[_D], msg: Any) -> _D:
    return cls(**{f.name: getattr(msg, f.name) for f in fields(cls)})  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class NamespaceStats:
    """One namespace's pool and counters (counters count since the daemon started)."""

    name: str
    page_bytes: int
    pages_total: int
    pages_free: int
    pages_reserved: int
    pages_sealed: int
    pages_pinned: int
    hit_tokens: int
    miss_tokens: int
    evictions: int
    lookups: int
    deduplicated_pages: int
    sequences: int
    policy: str
    budget_dropped_pages: int  # pages sequences dropped to stay within their budgets
    pages_quarantined: int  # device pools: reserved pages of clients gone without closing
    pages_free_unzeroed: int  # of pages_free: freed pages not zeroed yet (host pools)
    committed_bytes: int  # KV bytes clients committed into the pool (whole pages)
    hit_bytes: int  # KV bytes lookups found (whole pages)
    max_session_pages: int  # pool pages one session may hold here (0 = no quota but the pool)
    session_pages_refused: int  # requests refused by max_session_pages
    pages_checksummed: int  # pages checksummed as they were sealed
    pages_scrubbed: int  # sealed pages the scrubber re-verified
    pages_corrupt: int  # sealed pages changed after their seal: dropped, never served again
    copies_refused: int  # copies below the pool refused because the page was corrupt
    pages_zeroed: int  # freed pages zeroed off the event loop
    pages_zeroed_inline: int  # freed pages zeroed on the loop as they were handed out again
    pages_unchecked: int = 0  # sealed pages that left the pool before their checksum was taken
    replies_waited_zeroing: int = 0  # Reserve/Seal/Put replies that waited for their pages' zeroing
    pages_sums_given: int = 0  # pages sealed with the checksum their writer took as it copied
    tier_share: float = 0.0  # of the host and disk tiers its pages may hold (0 = none)
    share_evictions: int = 0  # its pages moved down or out of a tier because it was at its share
    host_bytes: int = 0  # slot bytes its pages hold in the host tier
    disk_bytes: int = 0  # bytes its records hold in the disk tier

    @property
    def hit_rate(self) -> float | None:
        """Hit tokens / looked-up tokens; None before any lookup."""
        looked_up = self.hit_tokens + self.miss_tokens
        return self.hit_tokens / looked_up if looked_up else None


@dataclass(frozen=True, slots=True)
class TierStats:
    """The tiers below the pools (docs/tiers.md). A capacity of 0 means that tier is off."""

    host_capacity_bytes: int
    host_bytes_used: int
    host_pages: int
    disk_capacity_bytes: int
    disk_bytes_used: int
    disk_pages: int
    disk_full_events: int  # times a write had to evict from a full disk tier
    corrupt_pages: int  # pages that failed their checksum (host + disk): dropped, never served
    demoted_pages: int  # pool -> host or disk
    promoted_pages: int  # host or disk -> pool
    prefetched_pages: int
    promotion_failures: int
    swapped_pages: int  # pages of swapped-out sequences below the pool now
    write_through: bool
    reindex_running: bool  # the disk tier is being re-indexed (the daemon serves meanwhile)
    reindex_done: int
    reindex_total: int
    disk_queued: int  # writes waiting for the disk writer
    disk_disabled: str  # why the disk tier is disabled (corrupt, its file deleted); "" = working
    disk_moved_aside: str  # where this start moved a corrupt disk tier to; "" = it did not
    disk_io_errors: int  # writes that failed with an I/O error
    disk_fs_full_errors: int  # writes that failed because the file system was full
    disk_queued_bytes: int  # bytes waiting for the disk writer (bounded: server.disk_queue_bytes)
    disk_queue_dropped: int  # demotions dropped because that queue was full (no longer cached)
    flushes_running: int  # Admin.Flush calls in progress
    # Quantized tiers (docs/tiers.md, "Quantized tiers"); all 0 without a quantized namespace.
    host_bytes_represented: int  # pool bytes the host tier's pages stand for
    disk_bytes_represented: int  # the same for the disk tier
    quantized_pages: int  # quantized records made
    quant_layers_fp: int  # their layers by the precision stored, after any fallback
    quant_layers_int8: int
    quant_layers_int4: int
    quant_fallbacks: int  # layers stored more precisely than asked: over the error bound
    quant_bytes_stored: int  # bytes of the records made
    quant_bytes_represented: int  # bytes of the pool pages they stand for
    quantize_seconds: float
    dequantized_pages: int  # records dequantized into the pool by promotions
    dequantize_seconds: float
    dequantize_failures: int  # records the codec refused (never served)
    not_requantized: int  # dequantized pages whose record was gone: freed, not quantized again
    reindex_bytes_done: int  # the re-index at start in bytes: payload bytes of the pages indexed,
    reindex_bytes_total: int  # of (an estimate until it is done)


@dataclass(frozen=True, slots=True)
class BuildInfo:
    """What the daemon was built from and runs on (docs/observability.md)."""

    version: str
    git_commit: str  # "" = unknown at build
    python: str
    grpc: str
    backend: str  # the pools' kinds now, e.g. "cpu_memfd"


@dataclass(frozen=True, slots=True)
class RpcCalls:
    """Calls of one method that ended with one status code since the daemon started."""

    method: str  # "KVStore/Lookup"
    code: str  # "OK", "NOT_FOUND", ...
    calls: int


@dataclass(frozen=True, slots=True)
class QuotaStats:
    """The daemon's quotas (docs/security.md, "Quotas") and the requests each refused."""

    max_sessions: int
    max_sessions_per_client: int  # 0 = none
    max_request_tokens: int
    refused: dict[str, int]  # quota name -> requests refused RESOURCE_EXHAUSTED since start


@dataclass(frozen=True, slots=True)
class PoolSocketStats:
    """The pool socket's descriptors handed out and requests refused by reason (docs/observability.md)."""

    granted: int
    refused: dict[str, int]  # reason ("used_ticket", "timeout", ...) -> requests refused since start


@dataclass(frozen=True, slots=True)
class HashMemoStats:
    """The lookups' remembered page hashes (docs/hashing.md, "Remembered hashes"); all 0 when off."""

    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    max_entries: int
    max_bytes: int


@dataclass(frozen=True, slots=True)
class LaneStats:
    """The lane socket's calls and connections (docs/api.md "The lane")."""

    calls: int  # requests answered on the lane, any status
    connections: int  # accepted since start
    open: int  # open now
    refused: int  # closed for a bad hello or an oversize frame
    puts_followed: int = 0  # Puts sent before their copies whose PutWritten came (docs/api.md)


@dataclass(frozen=True, slots=True)
class Stats:
    """`Client.stats()`: the daemon's counters."""

    namespaces: list[NamespaceStats]  # the one asked for, or all of them
    sessions: int  # open client sessions
    uptime_s: float
    version: str  # the daemon's package version
    tiers: TierStats | None  # None when the daemon has no tier below the pools
    internal_errors: int  # calls answered INTERNAL since start: daemon bugs, in its log
    malformed_requests: int  # requests refused because their bytes did not parse (or too long)
    build: BuildInfo | None  # None from a daemon too old to say
    rpc_calls: list[RpcCalls]  # daemon-wide replies only (no namespace asked)
    quotas: QuotaStats | None = None  # None from a daemon that reports none
    pool_socket: PoolSocketStats | None = None  # daemon-wide replies to a caller reading every namespace
    hash_memo: HashMemoStats | None = None  # the same replies
    lane: LaneStats | None = None  # the same replies, from a daemon with the lane

    @classmethod
    def from_proto(cls, r: kvstore_pb2.StatsResponse) -> Stats:
        return cls(
            namespaces=[_from_message(NamespaceStats, ns) for ns in r.namespaces],
            sessions=r.sessions,
            uptime_s=r.uptime_s,
            version=r.version,
            tiers=_from_message(TierStats, r.tiers) if r.HasField("tiers") else None,
            internal_errors=r.internal_errors,
            malformed_requests=r.malformed_requests,
            build=_from_message(BuildInfo, r.build) if r.HasField("build") else None,
            rpc_calls=[_from_message(RpcCalls, c) for c in r.rpc_calls],
            quotas=QuotaStats(
                r.quotas.max_sessions,
                r.quotas.max_sessions_per_client,
                r.quotas.max_request_tokens,
                dict(r.quotas.refused),
            )
            if r.HasField("quotas")
            else None,
            pool_socket=PoolSocketStats(r.pool_socket.granted, dict(r.pool_socket.refused))
            if r.HasField("pool_socket")
            else None,
            hash_memo=_from_message(HashMemoStats, r.hash_memo) if r.HasField("hash_memo") else None,
            lane=_from_message(LaneStats, r.lane) if r.HasField("lane") else None,
        )
