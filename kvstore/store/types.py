"""Plain data the store takes and returns. The servicers convert these to and
from protobuf; nothing here knows about grpc."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Any

from kvstore_proto import dtypes

from kvstore.memory.backend import PoolHandle
from kvstore.store import precision

PAGE_LAYOUT = "layer,kv,token,head,dim"
PAGE_ALIGN = 4096  # page starts are aligned to the OS page: misaligned copies are several times slower


@dataclass(frozen=True)
class NamespaceSpec:
    """One model's KV geometry and its pool size, as an operator configures it."""

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    page_tokens: int
    num_pages: int
    vocab_size: int = 0  # 0 = ids only checked to be in [0, 2**31)
    policy: str = "lru"
    salt: bytes = b""  # empty = derived from the name (see docs/hashing.md)
    model_fingerprint: str = ""
    device: str = "cpu"  # "cpu" (shm), "cuda:N" / "cuda:GPU-<uuid>", "fake:<id>" (CI)
    # How the tiers below the pool store its pages (kvstore/store/precision.py): "fp" = the
    # pool's bytes; "int8"/"int4" = quantized records; the schedule gives early layers more bits.
    tier_dtype: str = "fp"
    tier_schedule: str = ""
    tier_error_bound: float = 0.0
    max_session_pages: int = 0  # pool pages one session may hold here at once; 0 = none (store/quotas.py)
    tier_share: float = 0.0  # of the host and disk tiers its pages may hold; 0 = none (tiering/shares.py)

    # (cached: the store asks for these several times per page it moves; a frozen
    # dataclass's fields never change, and cached_property writes past its __setattr__)
    @cached_property
    def page_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.page_tokens, self.num_kv_heads, self.head_dim)

    @cached_property
    def page_bytes(self) -> int:
        n = dtypes.BY_NAME[self.dtype].itemsize
        for dim in self.page_shape:
            n *= dim
        return n

    @cached_property
    def tier_layer_dtypes(self) -> tuple[str, ...]:
        """Each layer's precision below the pool (ValueError if the spec's fields do not parse:
        validate.namespace_spec checks them first)."""
        return precision.layer_dtypes(self.tier_dtype, self.tier_schedule, self.num_layers)

    @cached_property
    def tier_quantized(self) -> bool:
        """Whether any layer is stored below the pool at less than the pool's precision."""
        return any(d != precision.FP for d in self.tier_layer_dtypes)

    def tier_codec(self) -> tuple[Any, Any]:
        """(PageShape, QuantScheme) of the codec (kvstore/quant) for a quantized namespace."""
        return precision.codec_scheme(
            self.num_layers,
            self.page_tokens,
            self.num_kv_heads,
            self.head_dim,
            self.dtype,
            self.tier_layer_dtypes,
            self.tier_error_bound,
        )

    @cached_property
    def page_stride(self) -> int:
        return -(-self.page_bytes // PAGE_ALIGN) * PAGE_ALIGN


@dataclass(frozen=True)
class StoreLimits:
    """Limits that protect the daemon from oversize or runaway requests."""

    max_request_tokens: int = 1 << 20
    max_pool_bytes: int = 64 << 30
    lease_ttl_default_s: float = 10.0
    lease_ttl_max_s: float = 300.0
    max_sessions: int = 4096
    max_extra_keys_bytes: int = 1024
    pin_ttl_max_s: float = 2.0  # longest pin_ttl_ms a lookup gets (its pages unevictable meanwhile)
    quarantine_grace_s: float = 30.0  # a dead client's reserved device pages, when its pid is unknown
    max_sessions_per_client: int = 1024  # 0 = none; a client: kvstore/caller.py client_key
    hash_memo_entries: int = 4096  # remembered page hashes (kvstore/hashing.py make_memo); 0 = off
    hash_memo_bytes: int = 4 << 20
    device_staging_bytes: int = 256 << 20  # a device pool's host staging arena (memory/staging.py)


@dataclass(frozen=True)
class PoolInfo:
    handle: PoolHandle  # how a client maps it, and its epoch
    num_pages: int
    page_bytes: int
    page_stride: int
    layout: str
    page_shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class NamespaceInfo:
    spec: NamespaceSpec
    pool: PoolInfo


UNCONSTRAINED = "unconstrained"


class PreemptMode(StrEnum):
    """How Preempt frees a live sequence's pool pages (kvstore/store/preempt.py)."""

    SWAP_OUT = "swap_out"  # its pages move below the pool; SwapIn brings them back
    DROP = "drop"  # freed; the engine recomputes


STATIC = "static"
SLIDING_WINDOW = "sliding_window"
IMPORTANCE = "importance"
BUDGET_MODES = (UNCONSTRAINED, STATIC, SLIDING_WINDOW, IMPORTANCE)


@dataclass(frozen=True)
class SequenceOptions:
    """A sequence's cache budget (docs/architecture.md, "Budgets"); sizes in tokens/pages."""

    mode: str = UNCONSTRAINED
    sink_tokens: int = 0  # sliding_window, importance
    window_tokens: int = 0  # sliding_window
    budget_pages: int = 0  # importance


@dataclass(slots=True)  # not frozen: built per page on hot paths, and frozen init is 4x slower
class PageRef:
    index: int  # page position in the sequence
    slot: int  # page number in the pool
    cached: bool  # True: already sealed, do not write
    token_start: int = 0
    token_count: int = 0
    block_hash: bytes = b""
    private: bool = False  # written after a budget drop: never sealed, never shared


@dataclass(frozen=True)
class SessionInfo:
    session_id: int
    client_name: str
    lease_ttl_s: float
    sequences: int = 0
    pins: int = 0
    idle_s: float = 0.0
    stream_attached: bool = False


@dataclass(frozen=True)
class AppendResult:
    num_tokens: int
    pages: list[PageRef]
    cached_tokens: int
    dropped: list[int] = field(default_factory=list)  # page indices the budget dropped, ascending


@dataclass(frozen=True)
class CommitResult:
    sealed_pages: int
    deduplicated_pages: int
    moved: list[PageRef]  # committed pages whose slot changed because another sequence sealed first


@dataclass(frozen=True)
class SequenceView:
    namespace: str
    num_tokens: int
    committed_tokens: int
    pages: list[PageRef]  # held pages only
    dropped: list[int] = field(default_factory=list)
    options: SequenceOptions = field(default_factory=SequenceOptions)


@dataclass(slots=True)  # (not frozen: a frozen one's __init__ calls object.__setattr__ a field;
class LookupResult:  # this way a Lookup spends ~9 k instructions less. Nothing changes one once made.)
    hit_tokens: int
    slots: list[int]  # of the hit pages, in order
    block_hashes: list[bytes]
    pin_id: int = 0
    ready_pages: int | None = None  # pages [0, ready) are in the pool now; None: all of them
    # Not on the wire: the promotions the hit ends with (kvstore/store/tiering/promote.py), for the
    # server to await, and the namespace (to settle the lookup's counters).
    promotions: list[Any] = field(default_factory=list)
    namespace: str = ""


@dataclass(frozen=True)
class ReleaseResult:
    pages_freed: int = 0
    pages_unpinned: int = 0


@dataclass(frozen=True)
class EvictResult:
    pages_evicted: int = 0
    bytes_freed: int = 0
    pages_skipped_pinned: int = 0


@dataclass
class NamespaceStats:
    name: str
    policy: str
    page_bytes: int
    pages_total: int
    pages_free: int
    pages_reserved: int
    pages_sealed: int
    pages_pinned: int
    sequences: int
    hit_tokens: int = 0
    miss_tokens: int = 0
    lookups: int = 0
    evictions: int = 0
    deduplicated_pages: int = 0
    budget_dropped_pages: int = 0
    pages_quarantined: int = 0
    pages_free_unzeroed: int = 0  # of pages_free: freed pages not zeroed yet (store/integrity.py)
    committed_bytes: int = 0  # pages clients committed (sealed or deduplicated) x page_bytes
    hit_bytes: int = 0  # pages lookups found x page_bytes
    max_session_pages: int = 0
    session_pages_refused: int = 0
    tier_share: float = 0.0  # (tiering/shares.py)
    share_evictions: int = 0  # its pages moved down or out of a tier because it was at its share
    host_bytes: int = 0  # slot bytes its pages hold in the host tier
    disk_bytes: int = 0  # bytes its records hold in the disk tier
    # Integrity of sealed pages (kvstore/store/integrity.py)
    pages_checksummed: int = 0  # pages checksummed as they were sealed
    pages_scrubbed: int = 0  # sealed pages the scrubber re-verified
    pages_corrupt: int = 0  # sealed pages whose bytes changed after the seal: dropped
    copies_refused: int = 0  # copies below the pool refused: the page was corrupt
    pages_zeroed: int = 0  # freed pages zeroed off the loop
    pages_zeroed_inline: int = 0  # freed pages zeroed on the loop as they were taken again
    pages_unchecked: int = 0  # sealed pages that left the pool before their checksum was taken
    replies_waited_zeroing: int = 0  # Reserve/Seal/Put replies that waited for their pages' zeroing
    pages_sums_given: int = 0  # pages sealed with the checksum their writer took (Put page_sums)
    extra: dict[str, int] = field(default_factory=dict)
