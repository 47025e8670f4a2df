from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    INT8: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    FLOAT8_E4M3: _ClassVar[DType]

class SyncMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SYNC_MODE_UNSPECIFIED: _ClassVar[SyncMode]
    SYNC_NONE: _ClassVar[SyncMode]
    SYNC_BEFORE_COMMIT: _ClassVar[SyncMode]

class HandleType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HANDLE_TYPE_UNSPECIFIED: _ClassVar[HandleType]
    CPU_MEMFD: _ClassVar[HandleType]
    CUDA_IPC: _ClassVar[HandleType]
    FAKE_DEVICE: _ClassVar[HandleType]

class PageState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAGE_STATE_UNSPECIFIED: _ClassVar[PageState]
    WRITABLE: _ClassVar[PageState]
    CACHED: _ClassVar[PageState]

class BudgetMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUDGET_UNCONSTRAINED: _ClassVar[BudgetMode]
    BUDGET_STATIC: _ClassVar[BudgetMode]
    BUDGET_SLIDING_WINDOW: _ClassVar[BudgetMode]
    BUDGET_IMPORTANCE: _ClassVar[BudgetMode]

class PreemptMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PREEMPT_MODE_UNSPECIFIED: _ClassVar[PreemptMode]
    PREEMPT_SWAP_OUT: _ClassVar[PreemptMode]
    PREEMPT_DROP: _ClassVar[PreemptMode]

class ExplainVerdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPLAIN_VERDICT_UNSPECIFIED: _ClassVar[ExplainVerdict]
    HIT_POOL: _ClassVar[ExplainVerdict]
    HIT_HOST: _ClassVar[ExplainVerdict]
    HIT_DISK: _ClassVar[ExplainVerdict]
    IN_FLIGHT: _ClassVar[ExplainVerdict]
    NEVER_STORED: _ClassVar[ExplainVerdict]
    EVICTED: _ClassVar[ExplainVerdict]
    DROPPED_CORRUPT: _ClassVar[ExplainVerdict]
    OTHER_NAMESPACE: _ClassVar[ExplainVerdict]
    OTHER_MODEL: _ClassVar[ExplainVerdict]
    AFTER_MISS: _ClassVar[ExplainVerdict]
DTYPE_UNSPECIFIED: DType
FLOAT16: DType
BFLOAT16: DType
FLOAT32: DType
INT8: DType
UINT8: DType
FLOAT8_E4M3: DType
SYNC_MODE_UNSPECIFIED: SyncMode
SYNC_NONE: SyncMode
SYNC_BEFORE_COMMIT: SyncMode
HANDLE_TYPE_UNSPECIFIED: HandleType
CPU_MEMFD: HandleType
CUDA_IPC: HandleType
FAKE_DEVICE: HandleType
PAGE_STATE_UNSPECIFIED: PageState
WRITABLE: PageState
CACHED: PageState
BUDGET_UNCONSTRAINED: BudgetMode
BUDGET_STATIC: BudgetMode
BUDGET_SLIDING_WINDOW: BudgetMode
BUDGET_IMPORTANCE: BudgetMode
PREEMPT_MODE_UNSPECIFIED: PreemptMode
PREEMPT_SWAP_OUT: PreemptMode
PREEMPT_DROP: PreemptMode
EXPLAIN_VERDICT_UNSPECIFIED: ExplainVerdict
HIT_POOL: ExplainVerdict
HIT_HOST: ExplainVerdict
HIT_DISK: ExplainVerdict
IN_FLIGHT: ExplainVerdict
NEVER_STORED: ExplainVerdict
EVICTED: ExplainVerdict
DROPPED_CORRUPT: ExplainVerdict
OTHER_NAMESPACE: ExplainVerdict
OTHER_MODEL: ExplainVerdict
AFTER_MISS: ExplainVerdict

class Geometry(_message.Message):
    __slots__ = ("num_layers", "num_kv_heads", "head_dim", "dtype", "page_tokens", "vocab_size")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: DType
    page_tokens: int
    vocab_size: int
    def __init__(self, num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., page_tokens: _Optional[int] = ..., vocab_size: _Optional[int] = ...) -> None: ...

class PoolDescriptor(_message.Message):
    __slots__ = ("device", "ipc_handle", "offset", "nbytes", "num_pages", "page_bytes", "page_stride", "layout", "page_shape", "dtype", "handle_type", "pool_epoch", "alloc_nbytes", "host_id", "sync_mode", "pool_ticket")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    IPC_HANDLE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_PAGES_FIELD_NUMBER: _ClassVar[int]
    PAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAGE_STRIDE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    HANDLE_TYPE_FIELD_NUMBER: _ClassVar[int]
    POOL_EPOCH_FIELD_NUMBER: _ClassVar[int]
    ALLOC_NBYTES_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    SYNC_MODE_FIELD_NUMBER: _ClassVar[int]
    POOL_TICKET_FIELD_NUMBER: _ClassVar[int]
    device: str
    ipc_handle: bytes
    offset: int
    nbytes: int
    num_pages: int
    page_bytes: int
    page_stride: int
    layout: str
    page_shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    handle_type: HandleType
    pool_epoch: int
    alloc_nbytes: int
    host_id: str
    sync_mode: SyncMode
    pool_ticket: bytes
    def __init__(self, device: _Optional[str] = ..., ipc_handle: _Optional[bytes] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ..., num_pages: _Optional[int] = ..., page_bytes: _Optional[int] = ..., page_stride: _Optional[int] = ..., layout: _Optional[str] = ..., page_shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., handle_type: _Optional[_Union[HandleType, str]] = ..., pool_epoch: _Optional[int] = ..., alloc_nbytes: _Optional[int] = ..., host_id: _Optional[str] = ..., sync_mode: _Optional[_Union[SyncMode, str]] = ..., pool_ticket: _Optional[bytes] = ...) -> None: ...

class NamespaceInfo(_message.Message):
    __slots__ = ("name", "geometry", "pool", "policy", "model_fingerprint", "tier_precision", "max_session_pages", "tier_share")
    NAME_FIELD_NUMBER: _ClassVar[int]
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TIER_PRECISION_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSION_PAGES_FIELD_NUMBER: _ClassVar[int]
    TIER_SHARE_FIELD_NUMBER: _ClassVar[int]
    name: str
    geometry: Geometry
    pool: PoolDescriptor
    policy: str
    model_fingerprint: str
    tier_precision: TierPrecision
    max_session_pages: int
    tier_share: float
    def __init__(self, name: _Optional[str] = ..., geometry: _Optional[_Union[Geometry, _Mapping]] = ..., pool: _Optional[_Union[PoolDescriptor, _Mapping]] = ..., policy: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., tier_precision: _Optional[_Union[TierPrecision, _Mapping]] = ..., max_session_pages: _Optional[int] = ..., tier_share: _Optional[float] = ...) -> None: ...

class TierPrecision(_message.Message):
    __slots__ = ("dtype", "schedule", "error_bound")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    ERROR_BOUND_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    schedule: str
    error_bound: float
    def __init__(self, dtype: _Optional[str] = ..., schedule: _Optional[str] = ..., error_bound: _Optional[float] = ...) -> None: ...

class PageRef(_message.Message):
    __slots__ = ("index", "slot", "state", "token_start", "token_count", "block_hash", "private")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_FIELD_NUMBER: _ClassVar[int]
    index: int
    slot: int
    state: PageState
    token_start: int
    token_count: int
    block_hash: bytes
    private: bool
    def __init__(self, index: _Optional[int] = ..., slot: _Optional[int] = ..., state: _Optional[_Union[PageState, str]] = ..., token_start: _Optional[int] = ..., token_count: _Optional[int] = ..., block_hash: _Optional[bytes] = ..., private: _Optional[bool] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("client_name", "lease_ttl_ms", "client_pid", "client_pid_ns")
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_PID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_PID_NS_FIELD_NUMBER: _ClassVar[int]
    client_name: str
    lease_ttl_ms: int
    client_pid: int
    client_pid_ns: int
    def __init__(self, client_name: _Optional[str] = ..., lease_ttl_ms: _Optional[int] = ..., client_pid: _Optional[int] = ..., client_pid_ns: _Optional[int] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session_id", "lease_ttl_ms", "lane_put_follow")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    LANE_PUT_FOLLOW_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    lease_ttl_ms: int
    lane_put_follow: bool
    def __init__(self, session_id: _Optional[int] = ..., lease_ttl_ms: _Optional[int] = ..., lane_put_follow: _Optional[bool] = ...) -> None: ...

class KeepAliveRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    def __init__(self, session_id: _Optional[int] = ...) -> None: ...

class KeepAliveEvent(_message.Message):
    __slots__ = ("session_id", "lease_expires_unix_ms")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    lease_expires_unix_ms: int
    def __init__(self, session_id: _Optional[int] = ..., lease_expires_unix_ms: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    def __init__(self, session_id: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("lease_expires_unix_ms",)
    LEASE_EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    lease_expires_unix_ms: int
    def __init__(self, lease_expires_unix_ms: _Optional[int] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    def __init__(self, session_id: _Optional[int] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("sequences_released", "pins_released")
    SEQUENCES_RELEASED_FIELD_NUMBER: _ClassVar[int]
    PINS_RELEASED_FIELD_NUMBER: _ClassVar[int]
    sequences_released: int
    pins_released: int
    def __init__(self, sequences_released: _Optional[int] = ..., pins_released: _Optional[int] = ...) -> None: ...

class GetNamespaceRequest(_message.Message):
    __slots__ = ("namespace",)
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    def __init__(self, namespace: _Optional[str] = ...) -> None: ...

class SequenceOptions(_message.Message):
    __slots__ = ("mode", "sink_tokens", "window_tokens", "budget_pages")
    MODE_FIELD_NUMBER: _ClassVar[int]
    SINK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_PAGES_FIELD_NUMBER: _ClassVar[int]
    mode: BudgetMode
    sink_tokens: int
    window_tokens: int
    budget_pages: int
    def __init__(self, mode: _Optional[_Union[BudgetMode, str]] = ..., sink_tokens: _Optional[int] = ..., window_tokens: _Optional[int] = ..., budget_pages: _Optional[int] = ...) -> None: ...

class AllocateRequest(_message.Message):
    __slots__ = ("session_id", "namespace", "max_tokens", "extra_keys", "options", "model_fingerprint")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXTRA_KEYS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    namespace: str
    max_tokens: int
    extra_keys: bytes
    options: SequenceOptions
    model_fingerprint: str
    def __init__(self, session_id: _Optional[int] = ..., namespace: _Optional[str] = ..., max_tokens: _Optional[int] = ..., extra_keys: _Optional[bytes] = ..., options: _Optional[_Union[SequenceOptions, _Mapping]] = ..., model_fingerprint: _Optional[str] = ...) -> None: ...

class AllocateResponse(_message.Message):
    __slots__ = ("sequence_id", "reserved_pages", "pool_epoch")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVED_PAGES_FIELD_NUMBER: _ClassVar[int]
    POOL_EPOCH_FIELD_NUMBER: _ClassVar[int]
    sequence_id: int
    reserved_pages: int
    pool_epoch: int
    def __init__(self, sequence_id: _Optional[int] = ..., reserved_pages: _Optional[int] = ..., pool_epoch: _Optional[int] = ...) -> None: ...

class AppendRequest(_message.Message):
    __slots__ = ("session_id", "sequence_id", "token_ids")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    sequence_id: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session_id: _Optional[int] = ..., sequence_id: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class AppendResponse(_message.Message):
    __slots__ = ("num_tokens", "pages", "cached_tokens", "dropped_indices", "pool_epoch")
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_INDICES_FIELD_NUMBER: _ClassVar[int]
    POOL_EPOCH_FIELD_NUMBER: _ClassVar[int]
    num_tokens: int
    pages: _containers.RepeatedCompositeFieldContainer[PageRef]
    cached_tokens: int
    dropped_indices: _containers.RepeatedScalarFieldContainer[int]
    pool_epoch: int
    def __init__(self, num_tokens: _Optional[int] = ..., pages: _Optional[_Iterable[_Union[PageRef, _Mapping]]] = ..., cached_tokens: _Optional[int] = ..., dropped_indices: _Optional[_Iterable[int]] = ..., pool_epoch: _Optional[int] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("session_id", "sequence_id", "num_tokens", "written_slots")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_SLOTS_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    sequence_id: int
    num_tokens: int
    written_slots: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session_id: _Optional[int] = ..., sequence_id: _Optional[int] = ..., num_tokens: _Optional[int] = ..., written_slots: _Optional[_Iterable[int]] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("sealed_pages", "deduplicated_pages", "pages", "pool_epoch")
    SEALED_PAGES_FIELD_NUMBER: _ClassVar[int]
    DEDUPLICATED_PAGES_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    POOL_EPOCH_FIELD_NUMBER: _ClassVar[int]
    sealed_pages: int
    deduplicated_pages: int
    pages: _containers.RepeatedCompositeFieldContainer[PageRef]
    pool_epoch: int
    def __init__(self, sealed_pages: _Optional[int] = ..., deduplicated_pages: _Optional[int] = ..., pages: _Optional[_Iterable[_Union[PageRef, _Mapping]]] = ..., pool_epoch: _Optional[int] = ...) -> None: ...

class GetSequenceRequest(_message.Message):
    __slots__ = ("session_id", "sequence_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    sequence_id: int
    def __init__(self, session_id: _Optional[int] = ..., sequence_id: _Optional[int] = ...) -> None: ...

class GetSequenceResponse(_message.Message):
    __slots__ = ("namespace", "num_tokens", "committed_tokens", "pages", "dropped_indices", "options", "pool_epoch")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_INDICES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    POOL_EPOCH_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    num_tokens: int
    committed_tokens: int
    pages: _containers.RepeatedCompositeFieldContainer[PageRef]
    dropped_indices: _containers.RepeatedScalarFieldContainer[int]
    options: SequenceOptions
    pool_epoch: int
    def __init__(self, namespace: _Optional[str] = ..., num_tokens: _Optional[int] = ..., committed_tokens: _Optional[int] = ..., pages: _Optional[_Iterable[_Union[PageRef, _Mapping]]] = ..., dropped_indices: _Optional[_Iterable[int]] = ..., options: _Optional[_Union[SequenceOptions, _Mapping]] = ..., pool_epoch: _Optional[int] = ...) -> None: ...

class ReportImportanceRequest(_message.Message):
    __slots__ = ("session_id", "sequence_id", "scores")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    sequence_id: int
    scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, session_id: _Optional[int] = ..., sequence_id: _Optional[int] = ..., scores: _Optional[_Iterable[float]] = ...) -> None: ...

class ReportImportanceResponse(_message.Message):
    __slots__ = ("pages_held",)
    PAGES_HELD_FIELD_NUMBER: _ClassVar[int]
    pages_held: int
    def __init__(self, pages_held: _Optional[int] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("session_id", "namespace", "token_ids", "extra_keys", "pin", "model_fingerprint", "return_in_flight", "pin_ttl_ms", "release_pin_ids", "token_ids_u32")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    EXTRA_KEYS_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    RETURN_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    PIN_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_PIN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_U32_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    namespace: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    extra_keys: bytes
    pin: bool
    model_fingerprint: str
    return_in_flight: bool
    pin_ttl_ms: int
    release_pin_ids: _containers.RepeatedScalarFieldContainer[int]
    token_ids_u32: bytes
    def __init__(self, session_id: _Optional[int] = ..., namespace: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., extra_keys: _Optional[bytes] = ..., pin: _Optional[bool] = ..., model_fingerprint: _Optional[str] = ..., return_in_flight: _Optional[bool] = ..., pin_ttl_ms: _Optional[int] = ..., release_pin_ids: _Optional[_Iterable[int]] = ..., token_ids_u32: _Optional[bytes] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("hit_tokens", "pin_id", "slots", "block_hashes", "ready_pages", "pool_epoch", "pin_ttl_ms", "pin_deadline_ns")
    HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PIN_ID_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    READY_PAGES_FIELD_NUMBER: _ClassVar[int]
    POOL_EPOCH_FIELD_NUMBER: _ClassVar[int]
    PIN_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    PIN_DEADLINE_NS_FIELD_NUMBER: _ClassVar[int]
    hit_tokens: int
    pin_id: int
    slots: _containers.RepeatedScalarFieldContainer[int]
    block_hashes: bytes
    ready_pages: int
    pool_epoch: int
    pin_ttl_ms: int
    pin_deadline_ns: int
    def __init__(self, hit_tokens: _Optional[int] = ..., pin_id: _Optional[int] = ..., slots: _Optional[_Iterable[int]] = ..., block_hashes: _Optional[bytes] = ..., ready_pages: _Optional[int] = ..., pool_epoch: _Optional[int] = ..., pin_ttl_ms: _Optional[int] = ..., pin_deadline_ns: _Optional[int] = ...) -> None: ...

class WaitPagesRequest(_message.Message):
    __slots__ = ("session_id", "pin_id", "pages")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PIN_ID_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    pin_id: int
    pages: int
    def __init__(self, session_id: _Optional[int] = ..., pin_id: _Optional[int] = ..., pages: _Optional[int] = ...) -> None: ...

class WaitPagesResponse(_message.Message):
    __slots__ = ("ready_pages", "hit_pages", "slots", "pool_epoch")
    READY_PAGES_FIELD_NUMBER: _ClassVar[int]
    HIT_PAGES_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    POOL_EPOCH_FIELD_NUMBER: _ClassVar[int]
    ready_pages: int
    hit_pages: int
    slots: _containers.RepeatedScalarFieldContainer[int]
    pool_epoch: int
    def __init__(self, ready_pages: _Optional[int] = ..., hit_pages: _Optional[int] = ..., slots: _Optional[_Iterable[int]] = ..., pool_epoch: _Optional[int] = ...) -> None: ...

class PreemptRequest(_message.Message):
    __slots__ = ("session_id", "sequence_id", "mode")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    sequence_id: int
    mode: PreemptMode
    def __init__(self, session_id: _Optional[int] = ..., sequence_id: _Optional[int] = ..., mode: _Optional[_Union[PreemptMode, str]] = ...) -> None: ...

class PreemptResponse(_message.Message):
    __slots__ = ("pages_swapped", "pages_freed")
    PAGES_SWAPPED_FIELD_NUMBER: _ClassVar[int]
    PAGES_FREED_FIELD_NUMBER: _ClassVar[int]
    pages_swapped: int
    pages_freed: int
    def __init__(self, pages_swapped: _Optional[int] = ..., pages_freed: _Optional[int] = ...) -> None: ...

class SwapInRequest(_message.Message):
    __slots__ = ("session_id", "sequence_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    sequence_id: int
    def __init__(self, session_id: _Optional[int] = ..., sequence_id: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("session_id", "sequence_id", "pin_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    PIN_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    sequence_id: int
    pin_id: int
    def __init__(self, session_id: _Optional[int] = ..., sequence_id: _Optional[int] = ..., pin_id: _Optional[int] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("pages_freed", "pages_unpinned")
    PAGES_FREED_FIELD_NUMBER: _ClassVar[int]
    PAGES_UNPINNED_FIELD_NUMBER: _ClassVar[int]
    pages_freed: int
    pages_unpinned: int
    def __init__(self, pages_freed: _Optional[int] = ..., pages_unpinned: _Optional[int] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("session_id", "namespace", "token_ids", "extra_keys", "max_tokens", "options", "model_fingerprint", "release_pin_ids", "token_ids_u32")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    EXTRA_KEYS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    RELEASE_PIN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_U32_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    namespace: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    extra_keys: bytes
    max_tokens: int
    options: SequenceOptions
    model_fingerprint: str
    release_pin_ids: _containers.RepeatedScalarFieldContainer[int]
    token_ids_u32: bytes
    def __init__(self, session_id: _Optional[int] = ..., namespace: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., extra_keys: _Optional[bytes] = ..., max_tokens: _Optional[int] = ..., options: _Optional[_Union[SequenceOptions, _Mapping]] = ..., model_fingerprint: _Optional[str] = ..., release_pin_ids: _Optional[_Iterable[int]] = ..., token_ids_u32: _Optional[bytes] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("sequence_id", "reserved_pages", "num_tokens", "pages", "cached_tokens", "dropped_indices", "pool_epoch")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVED_PAGES_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_INDICES_FIELD_NUMBER: _ClassVar[int]
    POOL_EPOCH_FIELD_NUMBER: _ClassVar[int]
    sequence_id: int
    reserved_pages: int
    num_tokens: int
    pages: _containers.RepeatedCompositeFieldContainer[PageRef]
    cached_tokens: int
    dropped_indices: _containers.RepeatedScalarFieldContainer[int]
    pool_epoch: int
    def __init__(self, sequence_id: _Optional[int] = ..., reserved_pages: _Optional[int] = ..., num_tokens: _Optional[int] = ..., pages: _Optional[_Iterable[_Union[PageRef, _Mapping]]] = ..., cached_tokens: _Optional[int] = ..., dropped_indices: _Optional[_Iterable[int]] = ..., pool_epoch: _Optional[int] = ...) -> None: ...

class SealRequest(_message.Message):
    __slots__ = ("session_id", "sequence_id", "num_tokens", "written_slots", "release", "credit_pages", "credit_sequence_id", "credit_unzeroed_ok")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_SLOTS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    CREDIT_PAGES_FIELD_NUMBER: _ClassVar[int]
    CREDIT_SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    CREDIT_UNZEROED_OK_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    sequence_id: int
    num_tokens: int
    written_slots: _containers.RepeatedScalarFieldContainer[int]
    release: bool
    credit_pages: int
    credit_sequence_id: int
    credit_unzeroed_ok: bool
    def __init__(self, session_id: _Optional[int] = ..., sequence_id: _Optional[int] = ..., num_tokens: _Optional[int] = ..., written_slots: _Optional[_Iterable[int]] = ..., release: _Optional[bool] = ..., credit_pages: _Optional[int] = ..., credit_sequence_id: _Optional[int] = ..., credit_unzeroed_ok: _Optional[bool] = ...) -> None: ...

class SealResponse(_message.Message):
    __slots__ = ("sealed_pages", "deduplicated_pages", "pages", "pool_epoch", "pages_freed", "pages_unpinned", "credit")
    SEALED_PAGES_FIELD_NUMBER: _ClassVar[int]
    DEDUPLICATED_PAGES_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    POOL_EPOCH_FIELD_NUMBER: _ClassVar[int]
    PAGES_FREED_FIELD_NUMBER: _ClassVar[int]
    PAGES_UNPINNED_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    sealed_pages: int
    deduplicated_pages: int
    pages: _containers.RepeatedCompositeFieldContainer[PageRef]
    pool_epoch: int
    pages_freed: int
    pages_unpinned: int
    credit: Credit
    def __init__(self, sealed_pages: _Optional[int] = ..., deduplicated_pages: _Optional[int] = ..., pages: _Optional[_Iterable[_Union[PageRef, _Mapping]]] = ..., pool_epoch: _Optional[int] = ..., pages_freed: _Optional[int] = ..., pages_unpinned: _Optional[int] = ..., credit: _Optional[_Union[Credit, _Mapping]] = ...) -> None: ...

class Credit(_message.Message):
    __slots__ = ("sequence_id", "slots", "pool_epoch", "page_sums", "unzeroed")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    POOL_EPOCH_FIELD_NUMBER: _ClassVar[int]
    PAGE_SUMS_FIELD_NUMBER: _ClassVar[int]
    UNZEROED_FIELD_NUMBER: _ClassVar[int]
    sequence_id: int
    slots: _containers.RepeatedScalarFieldContainer[int]
    pool_epoch: int
    page_sums: bool
    unzeroed: bool
    def __init__(self, sequence_id: _Optional[int] = ..., slots: _Optional[_Iterable[int]] = ..., pool_epoch: _Optional[int] = ..., page_sums: _Optional[bool] = ..., unzeroed: _Optional[bool] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("session_id", "namespace", "token_ids", "extra_keys", "model_fingerprint", "credit_sequence_id", "slots", "credit_pages", "release_pin_ids", "skip_pages", "token_ids_u32", "page_sums", "credit_unzeroed_ok", "bytes_follow")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    EXTRA_KEYS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CREDIT_SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    CREDIT_PAGES_FIELD_NUMBER: _ClassVar[int]
    RELEASE_PIN_IDS_FIELD_NUMBER: _ClassVar[int]
    SKIP_PAGES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_U32_FIELD_NUMBER: _ClassVar[int]
    PAGE_SUMS_FIELD_NUMBER: _ClassVar[int]
    CREDIT_UNZEROED_OK_FIELD_NUMBER: _ClassVar[int]
    BYTES_FOLLOW_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    namespace: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    extra_keys: bytes
    model_fingerprint: str
    credit_sequence_id: int
    slots: _containers.RepeatedScalarFieldContainer[int]
    credit_pages: int
    release_pin_ids: _containers.RepeatedScalarFieldContainer[int]
    skip_pages: int
    token_ids_u32: bytes
    page_sums: bytes
    credit_unzeroed_ok: bool
    bytes_follow: bool
    def __init__(self, session_id: _Optional[int] = ..., namespace: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., extra_keys: _Optional[bytes] = ..., model_fingerprint: _Optional[str] = ..., credit_sequence_id: _Optional[int] = ..., slots: _Optional[_Iterable[int]] = ..., credit_pages: _Optional[int] = ..., release_pin_ids: _Optional[_Iterable[int]] = ..., skip_pages: _Optional[int] = ..., token_ids_u32: _Optional[bytes] = ..., page_sums: _Optional[bytes] = ..., credit_unzeroed_ok: _Optional[bool] = ..., bytes_follow: _Optional[bool] = ...) -> None: ...

class PutWritten(_message.Message):
    __slots__ = ("page_sums",)
    PAGE_SUMS_FIELD_NUMBER: _ClassVar[int]
    page_sums: bytes
    def __init__(self, page_sums: _Optional[bytes] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("num_tokens", "cached_tokens", "sealed_pages", "deduplicated_pages", "pool_epoch", "credit")
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEALED_PAGES_FIELD_NUMBER: _ClassVar[int]
    DEDUPLICATED_PAGES_FIELD_NUMBER: _ClassVar[int]
    POOL_EPOCH_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    num_tokens: int
    cached_tokens: int
    sealed_pages: int
    deduplicated_pages: int
    pool_epoch: int
    credit: Credit
    def __init__(self, num_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., sealed_pages: _Optional[int] = ..., deduplicated_pages: _Optional[int] = ..., pool_epoch: _Optional[int] = ..., credit: _Optional[_Union[Credit, _Mapping]] = ...) -> None: ...

class ItemStatus(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class BatchLookupRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[LookupRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[LookupRequest, _Mapping]]] = ...) -> None: ...

class BatchLookupItem(_message.Message):
    __slots__ = ("status", "reply")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    status: ItemStatus
    reply: LookupResponse
    def __init__(self, status: _Optional[_Union[ItemStatus, _Mapping]] = ..., reply: _Optional[_Union[LookupResponse, _Mapping]] = ...) -> None: ...

class BatchLookupResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[BatchLookupItem]
    def __init__(self, items: _Optional[_Iterable[_Union[BatchLookupItem, _Mapping]]] = ...) -> None: ...

class BatchReserveRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ReserveRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[ReserveRequest, _Mapping]]] = ...) -> None: ...

class BatchReserveItem(_message.Message):
    __slots__ = ("status", "reply")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    status: ItemStatus
    reply: ReserveResponse
    def __init__(self, status: _Optional[_Union[ItemStatus, _Mapping]] = ..., reply: _Optional[_Union[ReserveResponse, _Mapping]] = ...) -> None: ...

class BatchReserveResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[BatchReserveItem]
    def __init__(self, items: _Optional[_Iterable[_Union[BatchReserveItem, _Mapping]]] = ...) -> None: ...

class BatchSealRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[SealRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[SealRequest, _Mapping]]] = ...) -> None: ...

class BatchSealItem(_message.Message):
    __slots__ = ("status", "reply")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    status: ItemStatus
    reply: SealResponse
    def __init__(self, status: _Optional[_Union[ItemStatus, _Mapping]] = ..., reply: _Optional[_Union[SealResponse, _Mapping]] = ...) -> None: ...

class BatchSealResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[BatchSealItem]
    def __init__(self, items: _Optional[_Iterable[_Union[BatchSealItem, _Mapping]]] = ...) -> None: ...

class EvictRequest(_message.Message):
    __slots__ = ("namespace", "all", "prefix", "bytes")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    all: bool
    prefix: PrefixTarget
    bytes: int
    def __init__(self, namespace: _Optional[str] = ..., all: _Optional[bool] = ..., prefix: _Optional[_Union[PrefixTarget, _Mapping]] = ..., bytes: _Optional[int] = ...) -> None: ...

class PrefixTarget(_message.Message):
    __slots__ = ("token_ids", "extra_keys")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    EXTRA_KEYS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    extra_keys: bytes
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., extra_keys: _Optional[bytes] = ...) -> None: ...

class EvictResponse(_message.Message):
    __slots__ = ("pages_evicted", "bytes_freed", "pages_skipped_pinned")
    PAGES_EVICTED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FREED_FIELD_NUMBER: _ClassVar[int]
    PAGES_SKIPPED_PINNED_FIELD_NUMBER: _ClassVar[int]
    pages_evicted: int
    bytes_freed: int
    pages_skipped_pinned: int
    def __init__(self, pages_evicted: _Optional[int] = ..., bytes_freed: _Optional[int] = ..., pages_skipped_pinned: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("namespace",)
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    def __init__(self, namespace: _Optional[str] = ...) -> None: ...

class NamespaceStats(_message.Message):
    __slots__ = ("name", "page_bytes", "pages_total", "pages_free", "pages_reserved", "pages_sealed", "pages_pinned", "hit_tokens", "miss_tokens", "evictions", "lookups", "deduplicated_pages", "sequences", "policy", "budget_dropped_pages", "pages_quarantined", "pages_free_unzeroed", "committed_bytes", "hit_bytes", "max_session_pages", "session_pages_refused", "pages_checksummed", "pages_scrubbed", "pages_corrupt", "copies_refused", "pages_zeroed", "pages_zeroed_inline", "pages_unchecked", "replies_waited_zeroing", "pages_sums_given", "tier_share", "share_evictions", "host_bytes", "disk_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAGES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PAGES_FREE_FIELD_NUMBER: _ClassVar[int]
    PAGES_RESERVED_FIELD_NUMBER: _ClassVar[int]
    PAGES_SEALED_FIELD_NUMBER: _ClassVar[int]
    PAGES_PINNED_FIELD_NUMBER: _ClassVar[int]
    HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MISS_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    DEDUPLICATED_PAGES_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    BUDGET_DROPPED_PAGES_FIELD_NUMBER: _ClassVar[int]
    PAGES_QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    PAGES_FREE_UNZEROED_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    HIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSION_PAGES_FIELD_NUMBER: _ClassVar[int]
    SESSION_PAGES_REFUSED_FIELD_NUMBER: _ClassVar[int]
    PAGES_CHECKSUMMED_FIELD_NUMBER: _ClassVar[int]
    PAGES_SCRUBBED_FIELD_NUMBER: _ClassVar[int]
    PAGES_CORRUPT_FIELD_NUMBER: _ClassVar[int]
    COPIES_REFUSED_FIELD_NUMBER: _ClassVar[int]
    PAGES_ZEROED_FIELD_NUMBER: _ClassVar[int]
    PAGES_ZEROED_INLINE_FIELD_NUMBER: _ClassVar[int]
    PAGES_UNCHECKED_FIELD_NUMBER: _ClassVar[int]
    REPLIES_WAITED_ZEROING_FIELD_NUMBER: _ClassVar[int]
    PAGES_SUMS_GIVEN_FIELD_NUMBER: _ClassVar[int]
    TIER_SHARE_FIELD_NUMBER: _ClassVar[int]
    SHARE_EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    HOST_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
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
    budget_dropped_pages: int
    pages_quarantined: int
    pages_free_unzeroed: int
    committed_bytes: int
    hit_bytes: int
    max_session_pages: int
    session_pages_refused: int
    pages_checksummed: int
    pages_scrubbed: int
    pages_corrupt: int
    copies_refused: int
    pages_zeroed: int
    pages_zeroed_inline: int
    pages_unchecked: int
    replies_waited_zeroing: int
    pages_sums_given: int
    tier_share: float
    share_evictions: int
    host_bytes: int
    disk_bytes: int
    def __init__(self, name: _Optional[str] = ..., page_bytes: _Optional[int] = ..., pages_total: _Optional[int] = ..., pages_free: _Optional[int] = ..., pages_reserved: _Optional[int] = ..., pages_sealed: _Optional[int] = ..., pages_pinned: _Optional[int] = ..., hit_tokens: _Optional[int] = ..., miss_tokens: _Optional[int] = ..., evictions: _Optional[int] = ..., lookups: _Optional[int] = ..., deduplicated_pages: _Optional[int] = ..., sequences: _Optional[int] = ..., policy: _Optional[str] = ..., budget_dropped_pages: _Optional[int] = ..., pages_quarantined: _Optional[int] = ..., pages_free_unzeroed: _Optional[int] = ..., committed_bytes: _Optional[int] = ..., hit_bytes: _Optional[int] = ..., max_session_pages: _Optional[int] = ..., session_pages_refused: _Optional[int] = ..., pages_checksummed: _Optional[int] = ..., pages_scrubbed: _Optional[int] = ..., pages_corrupt: _Optional[int] = ..., copies_refused: _Optional[int] = ..., pages_zeroed: _Optional[int] = ..., pages_zeroed_inline: _Optional[int] = ..., pages_unchecked: _Optional[int] = ..., replies_waited_zeroing: _Optional[int] = ..., pages_sums_given: _Optional[int] = ..., tier_share: _Optional[float] = ..., share_evictions: _Optional[int] = ..., host_bytes: _Optional[int] = ..., disk_bytes: _Optional[int] = ...) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("host_capacity_bytes", "host_bytes_used", "host_pages", "disk_capacity_bytes", "disk_bytes_used", "disk_pages", "disk_full_events", "corrupt_pages", "demoted_pages", "promoted_pages", "prefetched_pages", "promotion_failures", "swapped_pages", "write_through", "reindex_running", "reindex_done", "reindex_total", "disk_queued", "disk_disabled", "disk_moved_aside", "disk_io_errors", "disk_fs_full_errors", "disk_queued_bytes", "disk_queue_dropped", "flushes_running", "host_bytes_represented", "disk_bytes_represented", "quantized_pages", "quant_layers_fp", "quant_layers_int8", "quant_layers_int4", "quant_fallbacks", "quant_bytes_stored", "quant_bytes_represented", "quantize_seconds", "dequantized_pages", "dequantize_seconds", "dequantize_failures", "not_requantized", "reindex_bytes_done", "reindex_bytes_total")
    HOST_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOST_BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    HOST_PAGES_FIELD_NUMBER: _ClassVar[int]
    DISK_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    DISK_PAGES_FIELD_NUMBER: _ClassVar[int]
    DISK_FULL_EVENTS_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_PAGES_FIELD_NUMBER: _ClassVar[int]
    DEMOTED_PAGES_FIELD_NUMBER: _ClassVar[int]
    PROMOTED_PAGES_FIELD_NUMBER: _ClassVar[int]
    PREFETCHED_PAGES_FIELD_NUMBER: _ClassVar[int]
    PROMOTION_FAILURES_FIELD_NUMBER: _ClassVar[int]
    SWAPPED_PAGES_FIELD_NUMBER: _ClassVar[int]
    WRITE_THROUGH_FIELD_NUMBER: _ClassVar[int]
    REINDEX_RUNNING_FIELD_NUMBER: _ClassVar[int]
    REINDEX_DONE_FIELD_NUMBER: _ClassVar[int]
    REINDEX_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DISK_QUEUED_FIELD_NUMBER: _ClassVar[int]
    DISK_DISABLED_FIELD_NUMBER: _ClassVar[int]
    DISK_MOVED_ASIDE_FIELD_NUMBER: _ClassVar[int]
    DISK_IO_ERRORS_FIELD_NUMBER: _ClassVar[int]
    DISK_FS_FULL_ERRORS_FIELD_NUMBER: _ClassVar[int]
    DISK_QUEUED_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_QUEUE_DROPPED_FIELD_NUMBER: _ClassVar[int]
    FLUSHES_RUNNING_FIELD_NUMBER: _ClassVar[int]
    HOST_BYTES_REPRESENTED_FIELD_NUMBER: _ClassVar[int]
    DISK_BYTES_REPRESENTED_FIELD_NUMBER: _ClassVar[int]
    QUANTIZED_PAGES_FIELD_NUMBER: _ClassVar[int]
    QUANT_LAYERS_FP_FIELD_NUMBER: _ClassVar[int]
    QUANT_LAYERS_INT8_FIELD_NUMBER: _ClassVar[int]
    QUANT_LAYERS_INT4_FIELD_NUMBER: _ClassVar[int]
    QUANT_FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    QUANT_BYTES_STORED_FIELD_NUMBER: _ClassVar[int]
    QUANT_BYTES_REPRESENTED_FIELD_NUMBER: _ClassVar[int]
    QUANTIZE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEQUANTIZED_PAGES_FIELD_NUMBER: _ClassVar[int]
    DEQUANTIZE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEQUANTIZE_FAILURES_FIELD_NUMBER: _ClassVar[int]
    NOT_REQUANTIZED_FIELD_NUMBER: _ClassVar[int]
    REINDEX_BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    REINDEX_BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    host_capacity_bytes: int
    host_bytes_used: int
    host_pages: int
    disk_capacity_bytes: int
    disk_bytes_used: int
    disk_pages: int
    disk_full_events: int
    corrupt_pages: int
    demoted_pages: int
    promoted_pages: int
    prefetched_pages: int
    promotion_failures: int
    swapped_pages: int
    write_through: bool
    reindex_running: bool
    reindex_done: int
    reindex_total: int
    disk_queued: int
    disk_disabled: str
    disk_moved_aside: str
    disk_io_errors: int
    disk_fs_full_errors: int
    disk_queued_bytes: int
    disk_queue_dropped: int
    flushes_running: int
    host_bytes_represented: int
    disk_bytes_represented: int
    quantized_pages: int
    quant_layers_fp: int
    quant_layers_int8: int
    quant_layers_int4: int
    quant_fallbacks: int
    quant_bytes_stored: int
    quant_bytes_represented: int
    quantize_seconds: float
    dequantized_pages: int
    dequantize_seconds: float
    dequantize_failures: int
    not_requantized: int
    reindex_bytes_done: int
    reindex_bytes_total: int
    def __init__(self, host_capacity_bytes: _Optional[int] = ..., host_bytes_used: _Optional[int] = ..., host_pages: _Optional[int] = ..., disk_capacity_bytes: _Optional[int] = ..., disk_bytes_used: _Optional[int] = ..., disk_pages: _Optional[int] = ..., disk_full_events: _Optional[int] = ..., corrupt_pages: _Optional[int] = ..., demoted_pages: _Optional[int] = ..., promoted_pages: _Optional[int] = ..., prefetched_pages: _Optional[int] = ..., promotion_failures: _Optional[int] = ..., swapped_pages: _Optional[int] = ..., write_through: _Optional[bool] = ..., reindex_running: _Optional[bool] = ..., reindex_done: _Optional[int] = ..., reindex_total: _Optional[int] = ..., disk_queued: _Optional[int] = ..., disk_disabled: _Optional[str] = ..., disk_moved_aside: _Optional[str] = ..., disk_io_errors: _Optional[int] = ..., disk_fs_full_errors: _Optional[int] = ..., disk_queued_bytes: _Optional[int] = ..., disk_queue_dropped: _Optional[int] = ..., flushes_running: _Optional[int] = ..., host_bytes_represented: _Optional[int] = ..., disk_bytes_represented: _Optional[int] = ..., quantized_pages: _Optional[int] = ..., quant_layers_fp: _Optional[int] = ..., quant_layers_int8: _Optional[int] = ..., quant_layers_int4: _Optional[int] = ..., quant_fallbacks: _Optional[int] = ..., quant_bytes_stored: _Optional[int] = ..., quant_bytes_represented: _Optional[int] = ..., quantize_seconds: _Optional[float] = ..., dequantized_pages: _Optional[int] = ..., dequantize_seconds: _Optional[float] = ..., dequantize_failures: _Optional[int] = ..., not_requantized: _Optional[int] = ..., reindex_bytes_done: _Optional[int] = ..., reindex_bytes_total: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("namespaces", "sessions", "uptime_s", "version", "tiers", "internal_errors", "malformed_requests", "build", "rpc_calls", "quotas", "pool_socket", "hash_memo", "lane")
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    INTERNAL_ERRORS_FIELD_NUMBER: _ClassVar[int]
    MALFORMED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    BUILD_FIELD_NUMBER: _ClassVar[int]
    RPC_CALLS_FIELD_NUMBER: _ClassVar[int]
    QUOTAS_FIELD_NUMBER: _ClassVar[int]
    POOL_SOCKET_FIELD_NUMBER: _ClassVar[int]
    HASH_MEMO_FIELD_NUMBER: _ClassVar[int]
    LANE_FIELD_NUMBER: _ClassVar[int]
    namespaces: _containers.RepeatedCompositeFieldContainer[NamespaceStats]
    sessions: int
    uptime_s: float
    version: str
    tiers: TierStats
    internal_errors: int
    malformed_requests: int
    build: BuildInfo
    rpc_calls: _containers.RepeatedCompositeFieldContainer[RpcCalls]
    quotas: QuotaStats
    pool_socket: PoolSocketStats
    hash_memo: HashMemoStats
    lane: LaneStats
    def __init__(self, namespaces: _Optional[_Iterable[_Union[NamespaceStats, _Mapping]]] = ..., sessions: _Optional[int] = ..., uptime_s: _Optional[float] = ..., version: _Optional[str] = ..., tiers: _Optional[_Union[TierStats, _Mapping]] = ..., internal_errors: _Optional[int] = ..., malformed_requests: _Optional[int] = ..., build: _Optional[_Union[BuildInfo, _Mapping]] = ..., rpc_calls: _Optional[_Iterable[_Union[RpcCalls, _Mapping]]] = ..., quotas: _Optional[_Union[QuotaStats, _Mapping]] = ..., pool_socket: _Optional[_Union[PoolSocketStats, _Mapping]] = ..., hash_memo: _Optional[_Union[HashMemoStats, _Mapping]] = ..., lane: _Optional[_Union[LaneStats, _Mapping]] = ...) -> None: ...

class HashMemoStats(_message.Message):
    __slots__ = ("hits", "misses", "evictions", "entries", "bytes", "max_entries", "max_bytes")
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    max_entries: int
    max_bytes: int
    def __init__(self, hits: _Optional[int] = ..., misses: _Optional[int] = ..., evictions: _Optional[int] = ..., entries: _Optional[int] = ..., bytes: _Optional[int] = ..., max_entries: _Optional[int] = ..., max_bytes: _Optional[int] = ...) -> None: ...

class LaneStats(_message.Message):
    __slots__ = ("calls", "connections", "open", "refused", "puts_followed")
    CALLS_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    PUTS_FOLLOWED_FIELD_NUMBER: _ClassVar[int]
    calls: int
    connections: int
    open: int
    refused: int
    puts_followed: int
    def __init__(self, calls: _Optional[int] = ..., connections: _Optional[int] = ..., open: _Optional[int] = ..., refused: _Optional[int] = ..., puts_followed: _Optional[int] = ...) -> None: ...

class PoolSocketStats(_message.Message):
    __slots__ = ("granted", "refused")
    class RefusedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    granted: int
    refused: _containers.ScalarMap[str, int]
    def __init__(self, granted: _Optional[int] = ..., refused: _Optional[_Mapping[str, int]] = ...) -> None: ...

class BuildInfo(_message.Message):
    __slots__ = ("version", "git_commit", "python", "grpc", "backend")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    GIT_COMMIT_FIELD_NUMBER: _ClassVar[int]
    PYTHON_FIELD_NUMBER: _ClassVar[int]
    GRPC_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    version: str
    git_commit: str
    python: str
    grpc: str
    backend: str
    def __init__(self, version: _Optional[str] = ..., git_commit: _Optional[str] = ..., python: _Optional[str] = ..., grpc: _Optional[str] = ..., backend: _Optional[str] = ...) -> None: ...

class RpcCalls(_message.Message):
    __slots__ = ("method", "code", "calls")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    method: str
    code: str
    calls: int
    def __init__(self, method: _Optional[str] = ..., code: _Optional[str] = ..., calls: _Optional[int] = ...) -> None: ...

class QuotaStats(_message.Message):
    __slots__ = ("max_sessions", "max_sessions_per_client", "max_request_tokens", "refused")
    class RefusedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_PER_CLIENT_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    max_sessions: int
    max_sessions_per_client: int
    max_request_tokens: int
    refused: _containers.ScalarMap[str, int]
    def __init__(self, max_sessions: _Optional[int] = ..., max_sessions_per_client: _Optional[int] = ..., max_request_tokens: _Optional[int] = ..., refused: _Optional[_Mapping[str, int]] = ...) -> None: ...

class NamespaceSpec(_message.Message):
    __slots__ = ("name", "geometry", "num_pages", "policy", "salt", "model_fingerprint", "device", "tier_precision", "max_session_pages", "tier_share")
    NAME_FIELD_NUMBER: _ClassVar[int]
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    NUM_PAGES_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    SALT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TIER_PRECISION_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSION_PAGES_FIELD_NUMBER: _ClassVar[int]
    TIER_SHARE_FIELD_NUMBER: _ClassVar[int]
    name: str
    geometry: Geometry
    num_pages: int
    policy: str
    salt: bytes
    model_fingerprint: str
    device: str
    tier_precision: TierPrecision
    max_session_pages: int
    tier_share: float
    def __init__(self, name: _Optional[str] = ..., geometry: _Optional[_Union[Geometry, _Mapping]] = ..., num_pages: _Optional[int] = ..., policy: _Optional[str] = ..., salt: _Optional[bytes] = ..., model_fingerprint: _Optional[str] = ..., device: _Optional[str] = ..., tier_precision: _Optional[_Union[TierPrecision, _Mapping]] = ..., max_session_pages: _Optional[int] = ..., tier_share: _Optional[float] = ...) -> None: ...

class CreateNamespaceRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: NamespaceSpec
    def __init__(self, spec: _Optional[_Union[NamespaceSpec, _Mapping]] = ...) -> None: ...

class DeleteNamespaceRequest(_message.Message):
    __slots__ = ("namespace", "force", "pool_epoch")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    POOL_EPOCH_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    force: bool
    pool_epoch: int
    def __init__(self, namespace: _Optional[str] = ..., force: _Optional[bool] = ..., pool_epoch: _Optional[int] = ...) -> None: ...

class DeleteNamespaceResponse(_message.Message):
    __slots__ = ("sequences_released", "pins_released")
    SEQUENCES_RELEASED_FIELD_NUMBER: _ClassVar[int]
    PINS_RELEASED_FIELD_NUMBER: _ClassVar[int]
    sequences_released: int
    pins_released: int
    def __init__(self, sequences_released: _Optional[int] = ..., pins_released: _Optional[int] = ...) -> None: ...

class ListNamespacesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNamespacesResponse(_message.Message):
    __slots__ = ("namespaces",)
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    namespaces: _containers.RepeatedCompositeFieldContainer[NamespaceInfo]
    def __init__(self, namespaces: _Optional[_Iterable[_Union[NamespaceInfo, _Mapping]]] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "client_name", "sequences", "pins", "idle_s", "stream_attached")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    PINS_FIELD_NUMBER: _ClassVar[int]
    IDLE_S_FIELD_NUMBER: _ClassVar[int]
    STREAM_ATTACHED_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    client_name: str
    sequences: int
    pins: int
    idle_s: float
    stream_attached: bool
    def __init__(self, session_id: _Optional[int] = ..., client_name: _Optional[str] = ..., sequences: _Optional[int] = ..., pins: _Optional[int] = ..., idle_s: _Optional[float] = ..., stream_attached: _Optional[bool] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionInfo]
    def __init__(self, sessions: _Optional[_Iterable[_Union[SessionInfo, _Mapping]]] = ...) -> None: ...

class FlushRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FlushResponse(_message.Message):
    __slots__ = ("pages_written", "disk_pages", "seconds")
    PAGES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    DISK_PAGES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    pages_written: int
    disk_pages: int
    seconds: float
    def __init__(self, pages_written: _Optional[int] = ..., disk_pages: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("namespace", "token_ids", "extra_keys", "model_fingerprint")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    EXTRA_KEYS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    extra_keys: bytes
    model_fingerprint: str
    def __init__(self, namespace: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., extra_keys: _Optional[bytes] = ..., model_fingerprint: _Optional[str] = ...) -> None: ...

class PageExplanation(_message.Message):
    __slots__ = ("index", "token_start", "token_count", "block_hash", "verdict", "where", "evicted_unix_ms", "evicted_by", "evicted_for", "other_namespace", "detail")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    WHERE_FIELD_NUMBER: _ClassVar[int]
    EVICTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    EVICTED_BY_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FOR_FIELD_NUMBER: _ClassVar[int]
    OTHER_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    index: int
    token_start: int
    token_count: int
    block_hash: bytes
    verdict: ExplainVerdict
    where: ExplainVerdict
    evicted_unix_ms: int
    evicted_by: str
    evicted_for: str
    other_namespace: str
    detail: str
    def __init__(self, index: _Optional[int] = ..., token_start: _Optional[int] = ..., token_count: _Optional[int] = ..., block_hash: _Optional[bytes] = ..., verdict: _Optional[_Union[ExplainVerdict, str]] = ..., where: _Optional[_Union[ExplainVerdict, str]] = ..., evicted_unix_ms: _Optional[int] = ..., evicted_by: _Optional[str] = ..., evicted_for: _Optional[str] = ..., other_namespace: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("namespace", "policy", "model_fingerprint", "page_tokens", "num_tokens", "hit_tokens", "pages", "summary")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    policy: str
    model_fingerprint: str
    page_tokens: int
    num_tokens: int
    hit_tokens: int
    pages: _containers.RepeatedCompositeFieldContainer[PageExplanation]
    summary: str
    def __init__(self, namespace: _Optional[str] = ..., policy: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., page_tokens: _Optional[int] = ..., num_tokens: _Optional[int] = ..., hit_tokens: _Optional[int] = ..., pages: _Optional[_Iterable[_Union[PageExplanation, _Mapping]]] = ..., summary: _Optional[str] = ...) -> None: ...

class MrcRequest(_message.Message):
    __slots__ = ("namespace", "capacities", "fractions")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    CAPACITIES_FIELD_NUMBER: _ClassVar[int]
    FRACTIONS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    capacities: _containers.RepeatedScalarFieldContainer[int]
    fractions: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, namespace: _Optional[str] = ..., capacities: _Optional[_Iterable[int]] = ..., fractions: _Optional[_Iterable[float]] = ...) -> None: ...

class MrcPoint(_message.Message):
    __slots__ = ("capacity_pages", "capacity_bytes", "hit_rate", "current")
    CAPACITY_PAGES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    capacity_pages: int
    capacity_bytes: int
    hit_rate: float
    current: bool
    def __init__(self, capacity_pages: _Optional[int] = ..., capacity_bytes: _Optional[int] = ..., hit_rate: _Optional[float] = ..., current: _Optional[bool] = ...) -> None: ...

class MrcResponse(_message.Message):
    __slots__ = ("namespace", "policy", "pool_pages", "page_bytes", "sample_rate", "sampled_accesses", "accesses", "sampled_blocks", "points")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    POOL_PAGES_FIELD_NUMBER: _ClassVar[int]
    PAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_ACCESSES_FIELD_NUMBER: _ClassVar[int]
    ACCESSES_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    policy: str
    pool_pages: int
    page_bytes: int
    sample_rate: float
    sampled_accesses: int
    accesses: int
    sampled_blocks: int
    points: _containers.RepeatedCompositeFieldContainer[MrcPoint]
    def __init__(self, namespace: _Optional[str] = ..., policy: _Optional[str] = ..., pool_pages: _Optional[int] = ..., page_bytes: _Optional[int] = ..., sample_rate: _Optional[float] = ..., sampled_accesses: _Optional[int] = ..., accesses: _Optional[int] = ..., sampled_blocks: _Optional[int] = ..., points: _Optional[_Iterable[_Union[MrcPoint, _Mapping]]] = ...) -> None: ...
