"""The fast path's RPCs (Reserve, Seal, Put, the batches): convert, call kvstore/store/fastpath.py,
convert. A batch runs its items one after another, each as its own call would, and answers
each with its reply or the status that call would have failed with."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

from kvstore.errors import InvalidArgument, KVStoreError
from kvstore.server import batch_limits, convert
from kvstore.server.status import grpc_errors, status_and_message
from kvstore.server.tokens import request_tokens
from kvstore.store import credit as credits
from kvstore.store import fastpath, namespaces, waits, zero_later
from kvstore.store.store import Store
from kvstore.store.types import AppendResult, CommitResult

Ctx = grpc.aio.ServicerContext
_parse_lookup = pb.LookupResponse.FromString


async def lookup_reply(store: Store, request: Any) -> bytes:
    """One Lookup's reply, serialized: the Lookup RPC answers with these bytes as they are
    (kvstore/server/edge.py ENCODED_REPLIES); a BatchLookup item is them parsed. `request`:
    a LookupRequest, or its fields as the edge reads them (kvstore/server/request_scan.py).
    A get's steps (kvstore/store/fastpath.py `begin_lookup`): awaits only promotions."""
    sid, namespace = request.session_id, request.namespace  # (each read of a str field builds one)
    fastpath.release_pins(store, sid, request.release_pin_ids)
    pin_ttl_ms, in_flight = request.pin_ttl_ms, request.return_in_flight
    r = fastpath.begin_lookup(
        store,
        sid,
        namespace,
        request_tokens(request),
        request.extra_keys,
        request.pin,
        request.model_fingerprint,
        in_flight,
        pin_ttl_ms,
    )
    if r.promotions and not in_flight:
        r = await waits.settled(store, sid, r)
    ttl_ms = deadline_ns = 0
    if pin_ttl_ms and r.pin_id:
        ttl_ms, deadline_ns = fastpath.pin_deadline(store, sid, r.pin_id, pin_ttl_ms)
    return convert.lookup_reply_bytes(
        r.hit_tokens,
        r.pin_id,
        r.slots,
        r.block_hashes,
        len(r.slots) if r.ready_pages is None else r.ready_pages,
        namespaces.namespace_epoch(store, namespace),
        ttl_ms,
        deadline_ns,
    )


def _reserve_reply(store: Store, request: pb.ReserveRequest) -> pb.ReserveResponse:
    fastpath.release_pins(store, request.session_id, request.release_pin_ids)
    seq_id, reserved, r = fastpath.reserve(
        store,
        request.session_id,
        request.namespace,
        request_tokens(request),
        request.extra_keys,
        request.max_tokens,
        convert.sequence_options(request.options),
        request.model_fingerprint,
    )
    reply = pb.ReserveResponse(
        sequence_id=seq_id,
        reserved_pages=reserved,
        num_tokens=r.num_tokens,
        cached_tokens=r.cached_tokens,
        dropped_indices=r.dropped,
        pool_epoch=namespaces.namespace_epoch(store, request.namespace),
    )
    convert.add_page_refs(reply.pages, r.pages)
    return reply


def _seal_reply(store: Store, request: pb.SealRequest) -> pb.SealResponse:
    # The epoch first: a released sequence is no longer there to ask.
    epoch = namespaces.sequence_epoch(store, request.session_id, request.sequence_id)
    committed, released, credit = fastpath.seal(
        store,
        request.session_id,
        request.sequence_id,
        request.num_tokens,
        request.written_slots,
        request.release,
        request.credit_pages,
        request.credit_sequence_id,
        request.credit_unzeroed_ok,
    )
    reply = pb.SealResponse(
        sealed_pages=committed.sealed_pages,
        deduplicated_pages=committed.deduplicated_pages,
        pool_epoch=epoch,
        pages_freed=released.pages_freed,
        pages_unpinned=released.pages_unpinned,
        credit=_credit(credit),
    )
    convert.add_page_refs(reply.pages, committed.moved)
    return reply


def _credit(c: credits.Credit) -> pb.Credit:
    return pb.Credit(
        sequence_id=c.sequence_id,
        slots=c.slots,
        pool_epoch=c.pool_epoch,
        page_sums=c.page_sums,
        unzeroed=c.unzeroed,
    )


def _put_fields(request: pb.PutRequest) -> tuple[Any, ...]:
    """The PutRequest's fields credits.put and credits.prepare_put take first, in their order."""
    return (
        request.session_id,
        request.namespace,
        request_tokens(request),
        request.extra_keys,
        request.model_fingerprint,
        request.credit_sequence_id,
        request.slots,
        request.credit_pages,
        request.skip_pages,
    )


def _put_reply(store: Store, request: pb.PutRequest) -> pb.PutResponse:
    fastpath.release_pins(store, request.session_id, request.release_pin_ids)
    done = credits.put(store, *_put_fields(request), request.page_sums, request.credit_unzeroed_ok)
    return _put_response(store, request.namespace, *done)


def _put_response(
    store: Store, namespace: str, appended: AppendResult, committed: CommitResult, credit: credits.Credit
) -> pb.PutResponse:
    return pb.PutResponse(
        num_tokens=appended.num_tokens,
        cached_tokens=appended.cached_tokens,
        sealed_pages=committed.sealed_pages,
        deduplicated_pages=committed.deduplicated_pages,
        pool_epoch=namespaces.namespace_epoch(store, namespace),
        credit=_credit(credit),
    )


async def _put_following(store: Store, request: pb.PutRequest, context: Ctx) -> pb.PutResponse:
    """A lane Put sent before its pages were copied (bytes_follow; docs/api.md, "A put in one
    round trip"): prepared now, while the client copies; sealed once the connection's
    PutWritten frame says the pages are written; answered after that frame whatever the
    outcome, so each put has one reply and the connection stays in step."""
    follow_up = getattr(context, "follow_up", None)  # (LaneContext's: a gRPC context has none)
    if follow_up is None:
        raise InvalidArgument(
            'bytes_follow=true is for the lane (docs/api.md, "A put in one round trip"): over gRPC '
            "copy the pages first, then Put without it"
        )
    # (Refused here, the lane takes the follow-up frame before it answers: server/lane.py.)
    with zero_later.deferred() as jobs:  # (synchronous code only inside)
        fastpath.release_pins(store, request.session_id, request.release_pin_ids)
        prepared = credits.prepare_put(store, *_put_fields(request), request.credit_unzeroed_ok)
    try:
        written = _written(await follow_up())
        with zero_later.deferred() as sealing:
            done = credits.finish_put(store, prepared, written.page_sums)
    except BaseException:
        credits.abandon_put(store, prepared)  # (nothing of it was sealed: nobody saw a page)
        raise
    jobs += sealing
    if jobs:
        await zero_later.settle(jobs)
    return _put_response(store, request.namespace, *done)


def _written(payload: bytes) -> pb.PutWritten:
    try:
        return pb.PutWritten.FromString(payload)
    except Exception as e:  # DecodeError, or any other reason the bytes cannot be taken
        raise InvalidArgument(
            f"the {len(payload)}-byte follow-up of a Put is not a valid kvstore.v1.PutWritten: {e}"
        ) from None


async def _batch(
    items: Any, run: Callable[[Any], Awaitable[Any]], undo: Callable[[Any, Any], None]
) -> list[tuple[pb.ItemStatus, Any]]:
    """Run each item (batch_limits.check passed); a domain error answers that item only. If the call itself ends (its
    deadline, a cancel, a bug), `undo` gives back what the finished items took (nobody
    will learn their ids)."""
    done: list[tuple[pb.ItemStatus, Any]] = []
    try:
        for item in items:
            try:
                done.append((pb.ItemStatus(), await run(item)))
            except (KVStoreError, OSError) as e:
                code, message = status_and_message(e)
                if code == grpc.StatusCode.INTERNAL:
                    raise
                done.append((pb.ItemStatus(code=code.value[0], message=message), None))
    except BaseException:
        for item, (_status, reply) in zip(items, done, strict=False):
            if reply is not None:
                with contextlib.suppress(KVStoreError):  # (its session ended meanwhile)
                    undo(item, reply)
        raise
    return done


async def _zeroed_first(reply: Callable[[Store, Any], Any], store: Store, request: Any) -> Any:
    """`reply(store, request)`, the dirty pages it took zeroed off the loop before it is
    returned (store/zero_later.py): its slots reach the client only in that reply."""
    with zero_later.deferred() as jobs:
        r = reply(store, request)
    if jobs:
        await zero_later.settle(jobs)
    return r


class FastPathServicer:
    """Mixed into KVStoreServicer."""

    store: Store

    @grpc_errors
    async def Reserve(self, request: pb.ReserveRequest, context: Ctx) -> pb.ReserveResponse:
        return await _zeroed_first(_reserve_reply, self.store, request)

    @grpc_errors
    async def Seal(self, request: pb.SealRequest, context: Ctx) -> pb.SealResponse:
        return await _zeroed_first(_seal_reply, self.store, request)

    @grpc_errors
    async def Put(self, request: pb.PutRequest, context: Ctx) -> pb.PutResponse:
        if request.bytes_follow:
            return await _put_following(self.store, request, context)
        return await _zeroed_first(_put_reply, self.store, request)

    @grpc_errors
    async def BatchLookup(self, request: pb.BatchLookupRequest, context: Ctx) -> pb.BatchLookupResponse:
        store = self.store

        async def run(item: pb.LookupRequest) -> pb.LookupResponse:
            return _parse_lookup(await lookup_reply(store, item))

        def undo(item: pb.LookupRequest, reply: pb.LookupResponse) -> None:
            if reply.pin_id:
                store.release_pin(item.session_id, reply.pin_id)

        batch_limits.check("BatchLookup", request.items, store.limits)
        done = await _batch(request.items, run, undo)
        return pb.BatchLookupResponse(items=[pb.BatchLookupItem(status=s, reply=r) for s, r in done])

    @grpc_errors
    async def BatchReserve(self, request: pb.BatchReserveRequest, context: Ctx) -> pb.BatchReserveResponse:
        store = self.store

        async def run(item: pb.ReserveRequest) -> pb.ReserveResponse:
            return await _zeroed_first(_reserve_reply, store, item)

        def undo(item: pb.ReserveRequest, reply: pb.ReserveResponse) -> None:
            store.release_sequence(item.session_id, reply.sequence_id)

        batch_limits.check("BatchReserve", request.items, store.limits)
        done = await _batch(request.items, run, undo)
        return pb.BatchReserveResponse(items=[pb.BatchReserveItem(status=s, reply=r) for s, r in done])

    @grpc_errors
    async def BatchSeal(self, request: pb.BatchSealRequest, context: Ctx) -> pb.BatchSealResponse:
        store = self.store

        async def run(item: pb.SealRequest) -> pb.SealResponse:
            return await _zeroed_first(_seal_reply, store, item)

        def undo(item: pb.SealRequest, reply: pb.SealResponse) -> None:
            pass  # a seal gives back nothing: its pages are visible, as the item's call would leave them

        batch_limits.check("BatchSeal", request.items, None)  # (a seal carries no token ids)
        done = await _batch(request.items, run, undo)
        return pb.BatchSealResponse(items=[pb.BatchSealItem(status=s, reply=r) for s, r in done])
