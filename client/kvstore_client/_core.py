"""State shared by the sync and asyncio clients: the session and its lease, the
namespace cache, and the client-side tables of sequences and lookups. Nothing
here does I/O but trading a pool ticket (`_remember_namespace`, which AsyncClient
runs in a thread); the subclasses in client.py and aio.py send the `Call`s."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2_grpc
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb
from kvstore_proto.kvstore.v1 import kvstore_pb2_grpc as pb_grpc

from . import _wire, device, pool_fd
from .errors import KVStoreClientError, SessionLost, ShuttingDown, Unavailable, from_rpc_error
from .namespace import Namespace, remember
from .results import (
    AppendResult,
    CommitResult,
    Page,
    PageState,
    PreemptResult,
    ReleaseResult,
    pages_from_proto,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger("kvstore_client")

KEEPALIVE_S = 10.0  # HTTP/2 ping interval; the daemon accepts pings every 5 s or more
KEEPALIVE_TIMEOUT_S = 5.0
# A call that fails UNAVAILABLE or CANCELLED may be the daemon going away: the KeepAlive stream
# then ends within moments with the reason ("daemon shutting down"); wait that long for it.
LEASE_SETTLE_S = 1.0


def channel_options(keepalive_s: float = KEEPALIVE_S) -> tuple[tuple[str, int], ...]:
    return (
        # Replies for long prompts carry one PageRef per page; gRPC's 4 MiB default is too small.
        ("grpc.max_receive_message_length", 256 << 20),
        ("grpc.max_send_message_length", 256 << 20),
        # Ping the daemon, so a daemon that stopped answering (host gone, process stopped) fails
        # the calls under way with UNAVAILABLE, even a call without a deadline (timeout_s=None).
        ("grpc.keepalive_time_ms", round(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", round(KEEPALIVE_TIMEOUT_S * 1000)),
        ("grpc.http2.ping_timeout_ms", round(KEEPALIVE_TIMEOUT_S * 1000)),  # else a minute
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    )


def make_stubs(channel: Any) -> dict[str, Any]:
    """The stubs `Call.service` names; the same for a sync and an aio channel."""
    return {
        "kv": pb_grpc.KVStoreStub(channel),
        "admin": pb_grpc.AdminStub(channel),
        "health": health_pb2_grpc.HealthStub(channel),
    }


class ClientCore:
    """Session bookkeeping common to `Client` and `AsyncClient`."""

    def __init__(self, target: str, *, timeout_s: float | None, token: str = "") -> None:
        self.target = target
        self.timeout_s = timeout_s  # deadline of every unary call; None = no deadline
        self.session_id = 0  # set once, when OpenSession answers
        self.lease_ttl_s = 0.0
        self.lane_put_follow = False  # the daemon's lane takes a Put with bytes_follow (OpenSession)
        self.lease_expires_unix_ms = 0  # written by the keepalive consumer only
        self._token = token  # the bearer token, presented again with pool tickets
        self._namespaces: dict[str, Namespace] = {}
        self._all_pools = device.AllPools(self._namespaces)  # (ReleasePin, CloseSession: sync all)
        self._closed = False  # set by close() before the stream is cancelled
        self._lease_error: SessionLost | None = None  # set by the keepalive consumer only
        # Set by the keepalive consumer at the first event (the daemon sends one on attach)
        # or when the stream ends; a threading.Event (sync) or an asyncio.Event (aio).
        self._lease_attached: Any = None
        self._lease_ended: Any = None  # set when the stream ends; the same kind of event

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def alive(self) -> bool:
        """True while the session is open and its lease is held."""
        return not self._closed and self._lease_error is None and self.session_id != 0

    def __repr__(self) -> str:
        state = "alive" if self.alive else "closed" if self._closed else "lost"
        return f"{type(self).__name__}({self.target!r}, session_id={self.session_id}, {state})"

    def _check_usable(self) -> None:
        if self._closed:
            raise KVStoreClientError(f"client for {self.target} (session {self.session_id}) is closed")
        if self._lease_error is not None:
            raise type(self._lease_error)(self._lease_error.details, code=self._lease_error.code)

    def _may_be_shutdown(self, err: grpc.RpcError) -> bool:
        """A failure that the KeepAlive stream's end may explain (see LEASE_SETTLE_S)."""
        return (
            self._lease_ended is not None
            and self._lease_error is None
            and not self._closed
            and err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        )

    def _error(self, err: grpc.RpcError) -> KVStoreClientError:
        mapped = from_rpc_error(err)
        if isinstance(self._lease_error, ShuttingDown) and mapped.code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.CANCELLED,
        ):  # the daemon said so on the KeepAlive stream, then closed the socket or the call
            return ShuttingDown(self._lease_error.details, code=grpc.StatusCode.UNAVAILABLE)
        if not self.session_id and mapped.code in (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.UNAVAILABLE,
        ):
            # Still connecting: the daemon is not there (yet), whatever the transport said.
            return Unavailable(
                f"no kvstore daemon answered at {self.target} ({mapped.args[0]}); is `kvstore serve` running?"
            )
        if isinstance(mapped, Unavailable):
            return type(mapped)(f"kvstore daemon at {self.target}: {mapped.details}", code=mapped.code)
        return mapped

    def _open_call(self, client_name: str, lease_ttl_s: float | None) -> _wire.Call[None]:
        def opened(reply: pb.OpenSessionResponse) -> None:
            self.session_id = reply.session_id
            self.lease_ttl_s = reply.lease_ttl_ms / 1000
            self.lane_put_follow = reply.lane_put_follow

        return replace(_wire.open_session(client_name, lease_ttl_s), convert=opened)

    def _on_keepalive_event(self, event: pb.KeepAliveEvent) -> None:
        self.lease_expires_unix_ms = event.lease_expires_unix_ms
        self._lease_attached.set()

    def _on_keepalive_end(self, err: BaseException | None) -> None:
        try:
            self._lease_ended_because(err)
            if self._lease_error is not None:
                device.close_device_pools(self._namespaces)
        finally:
            self._lease_attached.set()  # wakes open(), which then sees _lease_error
            self._lease_ended.set()

    def _lease_ended_because(self, err: BaseException | None) -> None:
        if self._closed:
            return
        why = from_rpc_error(err).args[0] if isinstance(err, grpc.RpcError) else "the daemon ended the stream"
        code = err.code() if isinstance(err, grpc.RpcError) else None
        lost = (
            ShuttingDown
            if isinstance(err, grpc.RpcError) and isinstance(from_rpc_error(err), ShuttingDown)
            else SessionLost
        )
        self._lease_error = lost(
            f"session {self.session_id} at {self.target}: KeepAlive stream ended ({why}); the daemon "
            "released everything it held. Connect again.",
            code=code,
        )
        log.warning("%s", self._lease_error.details)

    def _namespace_call(self, name: str) -> _wire.Call[Namespace]:
        return replace(_wire.get_namespace(name), convert=self._remember_namespace)

    def _remember_namespace(self, info: pb.NamespaceInfo) -> Namespace:
        return remember(self._namespaces, info, pool_fd.fetch_for(self.target, info, self._token))

    def _close_namespaces(self) -> None:
        namespaces, self._namespaces = list(self._namespaces.values()), {}
        for ns in namespaces:
            ns.close()


class Held:
    """Something the session holds in the daemon until released (a sequence, a pin)."""

    def __init__(self, client: Any, namespace: Namespace) -> None:
        self._client = client
        self.namespace = namespace
        self.released = False
        # The pool our slots index (the reply that gave them was checked against it).
        self._epoch = namespace.epoch

    def _views(self, slots: Iterable[int]) -> list[torch.Tensor]:
        return self.namespace.pages_of(self._epoch, slots, holder=repr(self))

    def _release_request(self) -> _wire.Call[ReleaseResult]:
        raise NotImplementedError

    def _release_call(self) -> _wire.Call[ReleaseResult] | None:
        """None when there is nothing to send: released already, or the session is over
        (the daemon released everything the session held)."""
        if self.released:
            return None
        self.released = True
        return replace(self._release_request(), sync_first=self.namespace) if self._client.alive else None

    def _release_failed(self, exc: BaseException | None, err: KVStoreClientError) -> None:
        """Releasing on the way out of a failed `with` block must not hide the first error."""
        if exc is None:
            raise err
        log.warning("releasing %r while handling an exception failed: %s", self, err)


class SequenceBase(Held):
    """A sequence's client-side page table, kept in step with append/commit replies.

    Not thread-safe: one thread (or task) drives a sequence.
    """

    def __init__(self, client: Any, namespace: Namespace, sequence_id: int, reserved_pages: int) -> None:
        super().__init__(client, namespace)
        self.sequence_id = sequence_id
        self.reserved_pages = reserved_pages
        # index -> page; token_count = tokens present in the page. None: dropped by the
        # sequence's budget (SequenceOptions); never for an unconstrained sequence.
        self.pages: list[Page | None] = []
        self.num_tokens = 0
        self.committed_tokens = 0

    @property
    def held_pages(self) -> list[Page]:
        """The pages the sequence holds, by index (dropped ones left out)."""
        return [p for p in self.pages if p is not None]

    @property
    def dropped(self) -> list[int]:
        """Page indices the budget has dropped, ascending."""
        return [i for i, p in enumerate(self.pages) if p is None]

    @property
    def slots(self) -> list[int]:
        return [p.slot for p in self.held_pages]

    def views(self, pages: Iterable[Page] | None = None) -> list[torch.Tensor]:
        """Pool views of `pages` (default: every held page), in order, no copy."""
        return self._views(p.slot for p in (self.held_pages if pages is None else pages))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(id={self.sequence_id}, namespace={self.namespace.name!r}, "
            f"num_tokens={self.num_tokens}, committed={self.committed_tokens}, pages={len(self.pages)})"
        )

    def _append_call(self, tokens: _wire.Tokens) -> _wire.Call[AppendResult]:
        call = _wire.append(self._client.session_id, self.sequence_id, tokens, self._apply_append)
        return replace(call, pool=self.namespace)

    def _commit_call(
        self, num_tokens: int | None, written_slots: Iterable[int] | None
    ) -> _wire.Call[CommitResult]:
        n = self.num_tokens if num_tokens is None else num_tokens
        call = _wire.commit(
            self._client.session_id, self.sequence_id, n, written_slots, lambda r: self._apply_commit(r, n)
        )
        return replace(call, pool=self.namespace, sync_first=self.namespace)  # seal after sync (release too)

    def _report_importance_call(self, scores: Iterable[float]) -> _wire.Call[int]:
        return _wire.report_importance(
            self._client.session_id, self.sequence_id, scores, lambda r: r.pages_held
        )

    def _refresh_call(self) -> _wire.Call[Any]:
        call = _wire.get_sequence(self._client.session_id, self.sequence_id, self._apply_sequence)
        return replace(call, pool=self.namespace)

    def _preempt_call(self, drop: bool) -> _wire.Call[PreemptResult]:
        return _wire.preempt(
            self._client.session_id, self.sequence_id, drop, partial(self._apply_preempt, drop)
        )

    def _apply_preempt(self, drop: bool, result: PreemptResult) -> PreemptResult:
        self.pages = []  # swapped out: no page is ours until swap_in; dropped: empty
        if drop:
            self.num_tokens = self.committed_tokens = 0
        return result

    def _swap_in_call(self) -> _wire.Call[Any]:
        call = _wire.swap_in(self._client.session_id, self.sequence_id, self._apply_sequence)
        return replace(call, pool=self.namespace)

    def _release_request(self) -> _wire.Call[ReleaseResult]:
        return _wire.release_sequence(self._client.session_id, self.sequence_id)

    def _apply_append(self, reply: pb.AppendResponse) -> AppendResult:
        result = AppendResult(
            reply.num_tokens, pages_from_proto(reply.pages), reply.cached_tokens, list(reply.dropped_indices)
        )
        dropped = set(result.dropped)
        for index in result.dropped:
            if index < len(self.pages):
                self.pages[index] = None
        for page in result.pages:
            entry = replace(page, token_start=0, token_count=page.token_end)
            while page.index > len(self.pages) and len(self.pages) in dropped:
                self.pages.append(None)  # created and dropped by this append
            if page.index < len(self.pages):
                self.pages[page.index] = entry
            elif page.index == len(self.pages):
                self.pages.append(entry)
            else:
                raise KVStoreClientError(
                    f"sequence {self.sequence_id}: append reply names page index={page.index} but the "
                    f"client's table has {len(self.pages)} pages; call refresh()"
                )
        while len(self.pages) in dropped:
            self.pages.append(None)
        self.num_tokens = reply.num_tokens
        return result

    def _apply_commit(self, reply: pb.CommitResponse, num_tokens: int) -> CommitResult:
        moved = pages_from_proto(reply.pages)
        for page in moved:
            old = self.pages[page.index] if page.index < len(self.pages) else None
            if old is not None:
                self.pages[page.index] = replace(
                    old, slot=page.slot, state=page.state, block_hash=page.block_hash or old.block_hash
                )
        self.committed_tokens = max(self.committed_tokens, num_tokens)
        # Full committed pages are sealed now: never write them again.
        sealed = min(self.committed_tokens // max(self.namespace.page_tokens, 1), len(self.pages))
        for i in range(sealed):
            entry = self.pages[i]
            if entry is not None and entry.writable and not entry.private:
                self.pages[i] = replace(entry, state=PageState.CACHED)
        return CommitResult(reply.sealed_pages, reply.deduplicated_pages, moved)

    def _apply_sequence(self, reply: pb.GetSequenceResponse) -> Any:
        table: list[Page | None] = [None] * (len(reply.pages) + len(reply.dropped_indices))
        for page in pages_from_proto(reply.pages):
            table[page.index] = page
        self.pages = table
        self._epoch = self.namespace.epoch
        self.num_tokens = reply.num_tokens
        self.committed_tokens = reply.committed_tokens
        return self


class LookupBase(Held):
    """The result of a lookup: the cached prefix's pages, pinned if asked."""

    def __init__(self, client: Any, namespace: Namespace, reply: pb.LookupResponse) -> None:
        super().__init__(client, namespace)
        self.hit_tokens = reply.hit_tokens
        self.slots: list[int] = list(reply.slots)  # pool slots of the hit pages, in order
        self._block_hashes = reply.block_hashes  # 16 bytes a page, concatenated
        self.pin_id = reply.pin_id  # 0 = not pinned (pin=False or nothing hit)
        self.released = reply.pin_id == 0
        # Pages [0, ready_pages) are in the pool now; the rest are still coming up from a tier
        # below it (only with return_in_flight=True): wait() for them before reading.
        self.ready_pages = reply.ready_pages

    def _wait_call(self, pages: int) -> _wire.Call[Any]:
        call = _wire.wait_pages(self._client.session_id, self.pin_id, pages, self._apply_wait)
        return replace(call, pool=self.namespace)

    def _apply_wait(self, reply: pb.WaitPagesResponse) -> Any:
        """A page that failed (checksum, or gone below the pool) ends the hit before it."""
        self.slots = list(reply.slots) + self.slots[reply.ready_pages : reply.hit_pages]
        self._block_hashes = self._block_hashes[: 16 * reply.hit_pages]
        self.hit_tokens = reply.hit_pages * self.namespace.page_tokens
        self.ready_pages = reply.ready_pages
        return self

    @property
    def pages(self) -> list[Page]:
        """The hit pages as `Page`s (built on demand: most callers only need `slots`)."""
        tokens = self.namespace.page_tokens
        hashes = self._block_hashes
        return [
            Page(i, slot, PageState.CACHED, 0, tokens, hashes[16 * i : 16 * (i + 1)])
            for i, slot in enumerate(self.slots)
        ]

    @property
    def pinned(self) -> bool:
        return not self.released

    def views(self) -> list[torch.Tensor]:
        """Pool views of the hit pages, in order (read only by convention: they are sealed)."""
        return self._views(self.slots)

    def __len__(self) -> int:
        return len(self.slots)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(hit_tokens={self.hit_tokens}, pages={len(self.slots)}, pin_id={self.pin_id})"

    def _release_request(self) -> _wire.Call[ReleaseResult]:
        return _wire.release_pin(self._client.session_id, self.pin_id)
