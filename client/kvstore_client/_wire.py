"""Request building and reply conversion shared by the sync and asyncio clients.

Every operation is described once as a `Call`: which service and method, the
request, and how to turn the reply into what the user gets. `Client._run` and
`AsyncClient._run` only differ in how they send it (blocking or awaited).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import numpy as np
from grpc_health.v1 import health_pb2
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

from ._tokens import fill_tokens, set_tokens
from .errors import InvalidArgument
from .pool import wire_dtype
from .results import (
    BUDGET_MODES,
    CloseResult,
    DeleteNamespaceResult,
    EvictResult,
    FlushResult,
    PreemptResult,
    ReleaseResult,
    SequenceOptions,
    Stats,
)

T = TypeVar("T")
Service = Literal["kv", "admin", "health"]
if TYPE_CHECKING:
    import torch

    Tokens = Iterable[int] | np.ndarray | torch.Tensor
else:  # torch is imported only when needed; the alias is for annotations, which stay unevaluated
    Tokens = Iterable[int] | np.ndarray | Any


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    service: Service
    method: str  # RPC name on the service's stub
    request: Any  # the protobuf request
    convert: Callable[[Any], T]  # reply -> result; runs only if the RPC succeeded
    # The namespace whose pool the reply's slots index: its `pool_epoch` is checked against
    # this client's mapping before `convert` runs (kvstore_client.namespace.pool_moved).
    pool: Any = None
    # Device pools: what must have synchronized its device work before the request goes
    # out (seal after sync, release after sync): a Namespace, or the client for all of its
    # namespaces. Anything with `record()` (see kvstore_client/device.py).
    sync_first: Any = None
    # Lane only (a Put with bytes_follow; docs/api.md, "A put in one round trip"): run after
    # the request is sent, before the reply is read (the pages' copy); its bytes, a
    # serialized PutWritten, go out as the call's follow-up frame.
    follow: Callable[[], bytes] | None = None


def _same(reply: Any) -> Any:
    return reply


def extra_bytes(extra_keys: bytes | bytearray | memoryview) -> bytes:
    if not isinstance(extra_keys, bytes | bytearray | memoryview):
        raise InvalidArgument(f"extra_keys must be bytes, got {type(extra_keys).__name__}")
    return bytes(extra_keys)


def _release_result(r: pb.ReleaseResponse) -> ReleaseResult:
    return ReleaseResult(r.pages_freed, r.pages_unpinned)


# ---------------------------------------------------------------- sessions


def open_session(client_name: str, lease_ttl_s: float | None) -> Call[pb.OpenSessionResponse]:
    ttl_ms = 0 if lease_ttl_s is None else max(1, round(lease_ttl_s * 1000))
    # Our pid: a device pool quarantines the pages we leave reserved until we are gone.
    req = pb.OpenSessionRequest(client_name=client_name, lease_ttl_ms=ttl_ms, client_pid=os.getpid())
    req.client_pid_ns = os.stat("/proc/self/ns/pid").st_ino if os.path.exists("/proc/self/ns/pid") else 0
    return Call("kv", "OpenSession", req, _same)


def close_session(session_id: int, sync_first: Any = None) -> Call[CloseResult]:
    return Call(
        "kv",
        "CloseSession",
        pb.CloseSessionRequest(session_id=session_id),
        lambda r: CloseResult(r.sequences_released, r.pins_released),
        sync_first=sync_first,
    )


def heartbeat(session_id: int) -> Call[int]:
    return Call(
        "kv", "Heartbeat", pb.HeartbeatRequest(session_id=session_id), lambda r: r.lease_expires_unix_ms
    )


def keepalive_request(session_id: int) -> pb.KeepAliveRequest:
    return pb.KeepAliveRequest(session_id=session_id)


# ---------------------------------------------------------------- namespaces and admin


def get_namespace(name: str) -> Call[pb.NamespaceInfo]:
    return Call("kv", "GetNamespace", pb.GetNamespaceRequest(namespace=name), _same)


def namespace_spec(
    name: str,
    *,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype | str | int,
    page_tokens: int,
    num_pages: int,
    vocab_size: int = 0,
    policy: str = "",
    salt: bytes = b"",
    model_fingerprint: str = "",
    device: str = "",
    tier_dtype: str = "fp",
    tier_schedule: str = "",
    tier_error_bound: float = 0.0,
    max_session_pages: int = 0,
    tier_share: float = 0.0,
) -> pb.NamespaceSpec:
    """A NamespaceSpec for `create_namespace`. `dtype`: torch dtype, name ("bf16") or DType value;
    empty `policy` = the daemon's default; empty `salt` = derived from the name. `tier_*`: how
    the host and disk tiers store its pages (fp, int8, int4; docs/tiers.md, "Quantized tiers").
    `max_session_pages`: pool pages one session may hold in it (0 = none; docs/security.md).
    `tier_share`: the share of the host and disk tiers its pages may hold (0 = none; docs/tiers.md)."""
    geometry = pb.Geometry(
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=wire_dtype(dtype),
        page_tokens=page_tokens,
        vocab_size=vocab_size,
    )
    return pb.NamespaceSpec(
        name=name,
        geometry=geometry,
        num_pages=num_pages,
        policy=policy,
        salt=extra_bytes(salt),
        model_fingerprint=model_fingerprint,
        device=device,
        tier_precision=pb.TierPrecision(
            dtype=tier_dtype, schedule=tier_schedule, error_bound=tier_error_bound
        ),
        max_session_pages=max_session_pages,
        tier_share=tier_share,
    )


def create_namespace(
    spec: pb.NamespaceSpec | str, fields: dict[str, Any], convert: Callable[[pb.NamespaceInfo], T]
) -> Call[T]:
    if isinstance(spec, str):
        spec = namespace_spec(spec, **fields)
    elif fields:
        raise InvalidArgument(
            f"create_namespace: pass a NamespaceSpec or keyword fields, not both ({sorted(fields)})"
        )
    return Call("admin", "CreateNamespace", pb.CreateNamespaceRequest(spec=spec), convert)


def delete_namespace(name: str, force: bool, pool_epoch: int) -> Call[DeleteNamespaceResult]:
    req = pb.DeleteNamespaceRequest(namespace=name, force=force, pool_epoch=pool_epoch)
    return Call(
        "admin",
        "DeleteNamespace",
        req,
        lambda r: DeleteNamespaceResult(r.sequences_released, r.pins_released),
    )


def list_namespaces() -> Call[list[pb.NamespaceInfo]]:
    return Call("admin", "ListNamespaces", pb.ListNamespacesRequest(), lambda r: list(r.namespaces))


def list_sessions() -> Call[list[pb.SessionInfo]]:
    return Call("admin", "ListSessions", pb.ListSessionsRequest(), lambda r: list(r.sessions))


def stats(namespace: str) -> Call[Stats]:
    return Call("kv", "Stats", pb.StatsRequest(namespace=namespace), Stats.from_proto)


def health(service: str) -> Call[str]:
    return Call(
        "health",
        "Check",
        health_pb2.HealthCheckRequest(service=service),
        lambda r: health_pb2.HealthCheckResponse.ServingStatus.Name(r.status),
    )


# ---------------------------------------------------------------- sequences, lookups, eviction


def sequence_options(options: SequenceOptions) -> pb.SequenceOptions:
    if options.mode not in BUDGET_MODES:
        raise InvalidArgument(f"options.mode={options.mode!r} is unknown; known: {', '.join(BUDGET_MODES)}")
    return pb.SequenceOptions(
        mode=BUDGET_MODES[options.mode],
        sink_tokens=options.sink_tokens,
        window_tokens=options.window_tokens,
        budget_pages=options.budget_pages,
    )


def allocate(
    session_id: int,
    namespace: str,
    max_tokens: int,
    extra_keys: bytes,
    make: Callable[[int, int], T],
    options: SequenceOptions | None = None,
    model_fingerprint: str = "",
) -> Call[T]:
    """`make(sequence_id, reserved_pages)` builds the client's sequence object."""
    req = pb.AllocateRequest(
        session_id=session_id,
        namespace=namespace,
        max_tokens=max_tokens,
        extra_keys=extra_bytes(extra_keys),
        model_fingerprint=model_fingerprint,
    )
    if options is not None:
        req.options.CopyFrom(sequence_options(options))
    return Call("kv", "Allocate", req, lambda r: make(r.sequence_id, r.reserved_pages))


def report_importance(
    session_id: int, sequence_id: int, scores: Iterable[float], apply: Callable[[Any], T]
) -> Call[T]:
    req = pb.ReportImportanceRequest(session_id=session_id, sequence_id=sequence_id)
    if isinstance(scores, np.ndarray) or hasattr(scores, "tolist"):
        scores = scores.tolist()  # numpy array or torch tensor
    try:
        req.scores.extend(scores)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"scores must be numbers ({e})") from None
    return Call("kv", "ReportImportance", req, apply)


def append(session_id: int, sequence_id: int, tokens: Tokens, apply: Callable[[Any], T]) -> Call[T]:
    req = pb.AppendRequest(session_id=session_id, sequence_id=sequence_id)
    set_tokens(req.token_ids, tokens)
    return Call("kv", "Append", req, apply)


def commit(
    session_id: int,
    sequence_id: int,
    num_tokens: int,
    written_slots: Iterable[int] | None,
    apply: Callable[[Any], T],
) -> Call[T]:
    req = pb.CommitRequest(session_id=session_id, sequence_id=sequence_id, num_tokens=num_tokens)
    if written_slots is not None:
        req.written_slots.extend(int(s) for s in written_slots)
    return Call("kv", "Commit", req, apply)


def get_sequence(session_id: int, sequence_id: int, apply: Callable[[Any], T]) -> Call[T]:
    return Call(
        "kv", "GetSequence", pb.GetSequenceRequest(session_id=session_id, sequence_id=sequence_id), apply
    )


def lookup(
    session_id: int,
    namespace: str,
    tokens: Tokens,
    extra_keys: bytes,
    pin: bool,
    make: Callable[[Any], T],
    model_fingerprint: str = "",
    return_in_flight: bool = False,
) -> Call[T]:
    req = pb.LookupRequest(
        session_id=session_id,
        namespace=namespace,
        extra_keys=extra_bytes(extra_keys),
        pin=pin,
        model_fingerprint=model_fingerprint,
        return_in_flight=return_in_flight,
    )
    fill_tokens(req, tokens)
    return Call("kv", "Lookup", req, make)


def wait_pages(session_id: int, pin_id: int, pages: int, apply: Callable[[Any], T]) -> Call[T]:
    return Call(
        "kv", "WaitPages", pb.WaitPagesRequest(session_id=session_id, pin_id=pin_id, pages=pages), apply
    )


def preempt(session_id: int, sequence_id: int, drop: bool, apply: Callable[[PreemptResult], T]) -> Call[T]:
    mode = pb.PREEMPT_DROP if drop else pb.PREEMPT_SWAP_OUT
    req = pb.PreemptRequest(session_id=session_id, sequence_id=sequence_id, mode=mode)
    return Call("kv", "Preempt", req, lambda r: apply(PreemptResult(r.pages_swapped, r.pages_freed)))


def swap_in(session_id: int, sequence_id: int, apply: Callable[[Any], T]) -> Call[T]:
    return Call("kv", "SwapIn", pb.SwapInRequest(session_id=session_id, sequence_id=sequence_id), apply)


def flush() -> Call[FlushResult]:
    return Call(
        "admin", "Flush", pb.FlushRequest(), lambda r: FlushResult(r.pages_written, r.disk_pages, r.seconds)
    )


def explain(
    namespace: str, tokens: Tokens, extra_keys: bytes = b"", model_fingerprint: str = ""
) -> Call[pb.ExplainResponse]:
    request = pb.ExplainRequest(
        namespace=namespace, extra_keys=extra_keys, model_fingerprint=model_fingerprint
    )
    set_tokens(request.token_ids, tokens)
    return Call("admin", "Explain", request, _same)


def mrc(
    namespace: str, capacities: Iterable[int] = (), fractions: Iterable[float] = ()
) -> Call[pb.MrcResponse]:
    request = pb.MrcRequest(namespace=namespace, capacities=list(capacities), fractions=list(fractions))
    return Call("admin", "Mrc", request, _same)


def release_sequence(session_id: int, sequence_id: int) -> Call[ReleaseResult]:
    return Call(
        "kv", "Release", pb.ReleaseRequest(session_id=session_id, sequence_id=sequence_id), _release_result
    )


def release_pin(session_id: int, pin_id: int, sync_first: Any = None) -> Call[ReleaseResult]:
    req = pb.ReleaseRequest(session_id=session_id, pin_id=pin_id)
    return Call("kv", "Release", req, _release_result, sync_first=sync_first)


def evict(
    namespace: str,
    all: bool = False,
    prefix: Tokens | None = None,
    nbytes: int | None = None,
    extra_keys: bytes = b"",
) -> Call[EvictResult]:
    """Exactly one target: every unpinned page (`all`), a prefix and everything extending it
    (`prefix` token ids, with the `extra_keys` they were stored under), or `nbytes` bytes."""
    chosen = [
        name
        for name, on in (("all", all), ("prefix", prefix is not None), ("nbytes", nbytes is not None))
        if on
    ]
    if len(chosen) != 1:
        raise InvalidArgument(
            f"evict needs exactly one of all=True, prefix=..., nbytes=...; got {chosen or 'none'}"
        )
    req = pb.EvictRequest(namespace=namespace)
    if all:
        req.all = True
    elif nbytes is not None:
        req.bytes = nbytes
    else:
        set_tokens(req.prefix.token_ids, prefix, "prefix")
        req.prefix.extra_keys = extra_bytes(extra_keys)
    return Call(
        "kv", "Evict", req, lambda r: EvictResult(r.pages_evicted, r.bytes_freed, r.pages_skipped_pinned)
    )
