"""The Admin service: namespaces and sessions, for operators."""

from __future__ import annotations

import asyncio
import time

import grpc
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb
from kvstore_proto.kvstore.v1 import kvstore_pb2_grpc as pb_grpc

from kvstore import caller
from kvstore.errors import FailedPrecondition
from kvstore.observe import explain, mrc_curve
from kvstore.server import convert
from kvstore.server.pool_tickets import PoolTickets
from kvstore.server.status import grpc_errors
from kvstore.store import namespaces
from kvstore.store.store import Store
from kvstore.store.tiering.flush import flush_to_disk
from kvstore.tokens import ADMIN

Ctx = grpc.aio.ServicerContext


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, store: Store, default_policy: str = "lru", tickets: PoolTickets | None = None) -> None:
        self.store = store
        self.default_policy = default_policy
        self.tickets = (
            PoolTickets() if tickets is None else tickets
        )  # pool tickets in CreateNamespace replies

    @grpc_errors
    async def CreateNamespace(self, request: pb.CreateNamespaceRequest, context: Ctx) -> pb.NamespaceInfo:
        spec = convert.namespace_spec(request.spec, self.default_policy)
        reply = convert.namespace_info(await namespaces.create(self.store, spec))
        self.tickets.stamp(reply, context)
        return reply

    @grpc_errors
    async def DeleteNamespace(
        self, request: pb.DeleteNamespaceRequest, context: Ctx
    ) -> pb.DeleteNamespaceResponse:
        r = await namespaces.delete(self.store, request.namespace, request.force, request.pool_epoch)
        return pb.DeleteNamespaceResponse(
            sequences_released=r.sequences_released, pins_released=r.pins_released
        )

    @grpc_errors
    async def ListNamespaces(
        self, request: pb.ListNamespacesRequest, context: Ctx
    ) -> pb.ListNamespacesResponse:
        # Those the caller's token may administer (all of them without tokens).
        return pb.ListNamespacesResponse(
            namespaces=[
                convert.namespace_info(ns.info())
                for name, ns in self.store.namespaces.items()
                if caller.sees(name, ADMIN)
            ]
        )

    @grpc_errors
    async def ListSessions(self, request: pb.ListSessionsRequest, context: Ctx) -> pb.ListSessionsResponse:
        # Admin on "*": every session; admin on some namespaces: the token's own sessions.
        whole, mine = caller.sees_all(ADMIN), caller.client_key("", 0, 0)
        sessions = self.store.sessions
        return pb.ListSessionsResponse(
            sessions=[
                convert.session_info(s)
                for s in self.store.session_infos()
                if whole or sessions[s.session_id].client == mine
            ]
        )

    @grpc_errors
    async def Flush(self, request: pb.FlushRequest, context: Ctx) -> pb.FlushResponse:
        t0 = time.monotonic()
        tiers = self.store.tiers
        if tiers is None:
            raise FailedPrecondition(
                "the daemon has no disk tier (server.disk_tier_dir): nothing to flush to"
            )
        queued = await flush_to_disk(tiers, list(self.store.namespaces.values()))
        return pb.FlushResponse(
            pages_written=queued,
            disk_pages=len(tiers.disk) if tiers.disk else 0,
            seconds=time.monotonic() - t0,
        )

    @grpc_errors
    async def Explain(self, request: pb.ExplainRequest, context: Ctx) -> pb.ExplainResponse:
        e = explain.explain(
            self.store, request.namespace, request.token_ids, request.extra_keys, request.model_fingerprint
        )
        return convert.explain_response(e)

    @grpc_errors
    async def Mrc(self, request: pb.MrcRequest, context: Ctx) -> pb.MrcResponse:
        # The copy is taken on the loop; the curve (O(n log n) over the sample) runs off it.
        compute = mrc_curve.snapshot(self.store, request.namespace, request.capacities, request.fractions)
        return convert.mrc_response(await asyncio.to_thread(compute))
