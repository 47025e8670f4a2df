"""The KVStore service: convert, call the store, convert. No logic here."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import grpc
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb
from kvstore_proto.kvstore.v1 import kvstore_pb2_grpc as pb_grpc

from kvstore import __version__, caller
from kvstore.errors import InvalidArgument, KVStoreError, QuotaExceeded
from kvstore.server import convert, ops_stats
from kvstore.server.edge import SHUTTING_DOWN, EdgeCounts
from kvstore.server.fast_servicer import FastPathServicer, lookup_reply
from kvstore.server.pool_tickets import PoolTickets
from kvstore.server.rpc_metrics import RpcMetrics
from kvstore.server.status import abort_for, grpc_errors
from kvstore.store import namespaces, waits
from kvstore.store.store import Store
from kvstore.store.types import PreemptMode, SequenceView

Ctx = grpc.aio.ServicerContext


class KVStoreServicer(FastPathServicer, pb_grpc.KVStoreServicer):
    def __init__(
        self,
        store: Store,
        edge: EdgeCounts | None = None,
        rpc: RpcMetrics | None = None,
        tickets: PoolTickets | None = None,
    ) -> None:
        self.store = store
        self.tickets = PoolTickets() if tickets is None else tickets  # pool tickets in GetNamespace replies
        self.edge = edge or EdgeCounts()
        self.rpc = rpc  # the edge's per-method calls, for Stats
        self.started = time.monotonic()
        self._closing = asyncio.Event()  # set when the daemon begins to shut down

    def begin_shutdown(self) -> None:
        """End every KeepAlive stream now with UNAVAILABLE "daemon shutting down" (the edge has
        drained the other calls already), so the server's stop does not wait for them."""
        self._closing.set()

    @grpc_errors
    async def OpenSession(self, request: pb.OpenSessionRequest, context: Ctx) -> pb.OpenSessionResponse:
        info = self.store.open_session(
            request.client_name, request.lease_ttl_ms / 1000, request.client_pid, request.client_pid_ns
        )
        return pb.OpenSessionResponse(
            session_id=info.session_id,
            lease_ttl_ms=int(info.lease_ttl_s * 1000),
            lane_put_follow=True,  # (fast_servicer._put_following: the lane's Put takes bytes_follow)
        )

    async def KeepAlive(self, request: pb.KeepAliveRequest, context: Ctx) -> AsyncIterator[pb.KeepAliveEvent]:
        try:
            session = self.store.attach_stream(request.session_id)
        except KVStoreError as e:
            await abort_for(context, e)
            return
        try:
            while request.session_id in self.store.sessions and not self._closing.is_set():
                yield pb.KeepAliveEvent(
                    session_id=session.id, lease_expires_unix_ms=_unix_ms(session.lease_ttl_s)
                )
                # The event is a heartbeat both ways: a dead peer makes the write fail.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), session.lease_ttl_s / 3)
            if self._closing.is_set():
                await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        finally:
            # Runs when the client goes away (the call is cancelled) or closed its session.
            self.store.detach_stream(request.session_id)

    @grpc_errors
    async def Heartbeat(self, request: pb.HeartbeatRequest, context: Ctx) -> pb.HeartbeatResponse:
        ttl = self.store.heartbeat(request.session_id)
        return pb.HeartbeatResponse(lease_expires_unix_ms=_unix_ms(ttl))

    @grpc_errors
    async def CloseSession(self, request: pb.CloseSessionRequest, context: Ctx) -> pb.CloseSessionResponse:
        session = self.store.session(request.session_id)
        seqs, pins = len(session.sequences), len(session.pins)
        self.store.close_session(request.session_id)
        return pb.CloseSessionResponse(sequences_released=seqs, pins_released=pins)

    @grpc_errors
    async def GetNamespace(self, request: pb.GetNamespaceRequest, context: Ctx) -> pb.NamespaceInfo:
        reply = convert.namespace_info(self.store.namespace(request.namespace).info())
        self.tickets.stamp(reply, context)
        return reply

    @grpc_errors
    async def Allocate(self, request: pb.AllocateRequest, context: Ctx) -> pb.AllocateResponse:
        seq_id, reserved = self.store.allocate(
            request.session_id,
            request.namespace,
            request.max_tokens,
            request.extra_keys,
            convert.sequence_options(request.options),
            request.model_fingerprint,
        )
        return pb.AllocateResponse(
            sequence_id=seq_id,
            reserved_pages=reserved,
            pool_epoch=namespaces.namespace_epoch(self.store, request.namespace),
        )

    @grpc_errors
    async def Append(self, request: pb.AppendRequest, context: Ctx) -> pb.AppendResponse:
        r = self.store.append(request.session_id, request.sequence_id, request.token_ids)
        reply = pb.AppendResponse(
            num_tokens=r.num_tokens,
            cached_tokens=r.cached_tokens,
            dropped_indices=r.dropped,
            pool_epoch=namespaces.sequence_epoch(self.store, request.session_id, request.sequence_id),
        )
        convert.add_page_refs(reply.pages, r.pages)
        return reply

    @grpc_errors
    async def Commit(self, request: pb.CommitRequest, context: Ctx) -> pb.CommitResponse:
        r = self.store.commit(
            request.session_id, request.sequence_id, request.num_tokens, request.written_slots
        )
        reply = pb.CommitResponse(
            sealed_pages=r.sealed_pages,
            deduplicated_pages=r.deduplicated_pages,
            pool_epoch=namespaces.sequence_epoch(self.store, request.session_id, request.sequence_id),
        )
        convert.add_page_refs(reply.pages, r.moved)
        return reply

    @grpc_errors
    async def GetSequence(self, request: pb.GetSequenceRequest, context: Ctx) -> pb.GetSequenceResponse:
        view = self.store.sequence_view(request.session_id, request.sequence_id)
        return _sequence_reply(view, namespaces.namespace_epoch(self.store, view.namespace))

    @grpc_errors
    async def Preempt(self, request: pb.PreemptRequest, context: Ctx) -> pb.PreemptResponse:
        mode = {pb.PREEMPT_SWAP_OUT: PreemptMode.SWAP_OUT, pb.PREEMPT_DROP: PreemptMode.DROP}.get(
            request.mode
        )
        if mode is None:
            raise InvalidArgument(
                f"mode={request.mode} is not a preemption; give PREEMPT_SWAP_OUT or PREEMPT_DROP"
            )
        moved, freed = self.store.preempt(request.session_id, request.sequence_id, mode)
        return pb.PreemptResponse(pages_swapped=moved, pages_freed=freed)

    @grpc_errors
    async def SwapIn(self, request: pb.SwapInRequest, context: Ctx) -> pb.GetSequenceResponse:
        view = await waits.swap_in(self.store, request.session_id, request.sequence_id)
        return _sequence_reply(view, namespaces.namespace_epoch(self.store, view.namespace))

    @grpc_errors
    async def WaitPages(self, request: pb.WaitPagesRequest, context: Ctx) -> pb.WaitPagesResponse:
        slots, total = await waits.wait_pages(self.store, request.session_id, request.pin_id, request.pages)
        return pb.WaitPagesResponse(
            ready_pages=len(slots),
            hit_pages=total,
            slots=slots,
            pool_epoch=namespaces.pin_epoch(self.store, request.session_id, request.pin_id),
        )

    @grpc_errors
    async def ReportImportance(
        self, request: pb.ReportImportanceRequest, context: Ctx
    ) -> pb.ReportImportanceResponse:
        held = self.store.report_importance(request.session_id, request.sequence_id, request.scores)
        return pb.ReportImportanceResponse(pages_held=held)

    def Lookup(self, request: pb.LookupRequest, context: Ctx) -> Coroutine[Any, Any, bytes]:
        """lookup_reply's coroutine, for the edge to await (a LookupResponse's bytes:
        edge.ENCODED_REPLIES): no layer of its own. Its errors are mapped by the edge, as
        grpc_errors would (kvstore/server/edge.py, `_fail`)."""
        return lookup_reply(self.store, request)

    @grpc_errors
    async def Release(self, request: pb.ReleaseRequest, context: Ctx) -> pb.ReleaseResponse:
        target = request.WhichOneof("target")
        if target == "sequence_id":
            r = self.store.release_sequence(request.session_id, request.sequence_id)
        elif target == "pin_id":
            r = self.store.release_pin(request.session_id, request.pin_id)
        else:
            raise InvalidArgument("target is not set: give sequence_id or pin_id")
        return pb.ReleaseResponse(pages_freed=r.pages_freed, pages_unpinned=r.pages_unpinned)

    @grpc_errors
    async def Evict(self, request: pb.EvictRequest, context: Ctx) -> pb.EvictResponse:
        target = request.WhichOneof("target")
        if target == "all" and request.all:
            r = self.store.evict_all(request.namespace)
        elif target == "prefix":
            r = self.store.evict_prefix(
                request.namespace, request.prefix.token_ids, request.prefix.extra_keys
            )
        elif target == "bytes":
            r = self.store.evict_bytes(request.namespace, request.bytes)
        else:
            raise InvalidArgument("target is not set: give all=true, prefix or bytes")
        return convert.evict_response(r)

    @grpc_errors
    async def Stats(self, request: pb.StatsRequest, context: Ctx) -> pb.StatsResponse:
        tiers = self.store.tiers
        # A token that does not read every namespace gets its share only (docs/security.md).
        whole = caller.sees_all()
        table = self.store.table
        reply = pb.StatsResponse(
            namespaces=[
                convert.namespace_stats(s) for s in self.store.stats(request.namespace) if caller.sees(s.name)
            ],
            sessions=len(self.store.sessions) if whole else table.per_client[caller.client_key("", 0, 0)],
            uptime_s=time.monotonic() - self.started,
            version=__version__,
            tiers=convert.tier_stats(tiers.stats()) if tiers is not None and whole else None,
            quotas=convert.quota_stats(self.store.limits, QuotaExceeded.refused),
            internal_errors=self.edge.internal,
            malformed_requests=self.edge.malformed,
        )
        if whole and not request.namespace:  # every tenant's traffic
            reply.pool_socket.granted = self.edge.pool.granted
            reply.pool_socket.refused.update(self.edge.pool.refused)
            lane = self.edge.lane
            reply.lane.calls, reply.lane.connections = lane.calls, lane.connections
            reply.lane.open, reply.lane.refused = lane.open, lane.refused
            reply.lane.puts_followed = lane.puts_followed
        return ops_stats.fill(reply, self.store, self.rpc, daemon_wide=whole and not request.namespace)


def _unix_ms(ttl_s: float) -> int:
    return int((time.time() + ttl_s) * 1000)


def _sequence_reply(v: SequenceView, pool_epoch: int) -> pb.GetSequenceResponse:
    reply = pb.GetSequenceResponse(
        namespace=v.namespace,
        num_tokens=v.num_tokens,
        committed_tokens=v.committed_tokens,
        dropped_indices=v.dropped,
        options=convert.sequence_options_pb(v.options),
        pool_epoch=pool_epoch,
    )
    convert.add_page_refs(reply.pages, v.pages)
    return reply
