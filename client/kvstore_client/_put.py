"""`put` (docs/api.md, "The fast path"): one call when the session holds a credit big enough
(copy page i into credit slot i, then Put, whose reply grants the next credit), else
Reserve, write the WRITABLE pages, Seal (whose reply grants the credit). A put with a
callable `data`, `max_tokens` or `options` always takes Reserve + Seal: only Reserve says
which pages are cached, and only the pages not cached are written then."""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

from . import _copy, _wire
from ._tokens import fill_tokens, token_count
from .errors import FailedPrecondition, InvalidArgument, KVStoreClientError
from .fastpath import (
    Flow,
    PutData,
    PutResult,
    namespace_of,
    reserve_request,
    seal_request,
    src_of,
    write_pages,
)
from .namespace import Namespace
from .results import pages_from_proto

# `KVSTORE_PAGE_SUMS=0`: never hash pages as they are copied (the daemon then reads them
# again after the seal); read once, at import.
SEND_SUMS = os.environ.get("KVSTORE_PAGE_SUMS", "1").strip() != "0"
# `KVSTORE_UNZEROED_CREDITS=0`: ask for credits of zeroed pages only. By default the library
# says it writes every byte of each page it puts into a credit (it copies whole pages), so the
# daemon may hand out freed pages as they are and zero none for its puts; read at import.
ASK_UNZEROED = os.environ.get("KVSTORE_UNZEROED_CREDITS", "1").strip() != "0"


def _same(reply: Any) -> Any:
    return reply


class Credits:
    """The credits this client holds, by namespace: a put takes one, its reply gives the next."""

    def __init__(self) -> None:
        self._held: dict[str, list[pb.Credit]] = {}
        self._lock = threading.Lock()

    def take(self, ns: Namespace) -> pb.Credit | None:
        """A credit for `ns`'s pool, or None (one of a pool no longer mapped went with it)."""
        with self._lock:
            held = self._held.get(ns.name)
            credit = held.pop() if held else None
        return credit if credit is not None and credit.pool_epoch == ns.epoch else None

    def give(self, ns: Namespace, credit: pb.Credit | None) -> None:
        if credit is not None and credit.sequence_id:
            with self._lock:
                self._held.setdefault(ns.name, []).append(credit)


def put(
    client: Any,
    namespace: str | Namespace,
    tokens: _wire.Tokens,
    data: PutData,
    cached_tokens: int = 0,
    **kw: Any,
) -> Flow[PutResult]:
    ns = yield from namespace_of(client, namespace)
    if cached_tokens < 0:
        raise InvalidArgument(f"cached_tokens={cached_tokens} is negative")
    sid = client.session_id
    credit = None
    if callable(data) or kw["max_tokens"] or kw["options"] is not None:
        req = reserve_request(sid, ns, tokens, **kw)  # (a credit stays for a put that can use it)
        return (yield from _reserve_and_seal(client, ns, req, data, None, 0))
    # The request a credit's Put sends, built first: a ReserveRequest only if there is none.
    call = pb.PutRequest(
        session_id=sid,
        namespace=ns.name,
        extra_keys=_wire.extra_bytes(kw["extra_keys"]),
        model_fingerprint=kw["fingerprint"],
    )
    fill_tokens(call, tokens)
    pages = -(-token_count(call) // ns.page_tokens)
    skip = min(cached_tokens, token_count(call)) // ns.page_tokens
    credit = client._credits.take(ns)
    if credit is not None and len(credit.slots) >= pages - skip:
        try:
            return (yield from _into_credit(client, ns, call, data, credit, pages, skip))
        except FailedPrecondition:
            if not skip:
                raise
            credit = None  # (forgotten) the prefix was evicted meanwhile: Reserve says what to write
    req = pb.ReserveRequest(
        session_id=sid,
        namespace=call.namespace,
        extra_keys=call.extra_keys,
        model_fingerprint=call.model_fingerprint,
        token_ids=call.token_ids,
        token_ids_u32=call.token_ids_u32,
    )
    try:
        return (yield from _reserve_and_seal(client, ns, req, data, credit, pages))
    except BaseException:
        if credit is not None:
            yield from _drop(client, credit)
        raise


def _drop(client: Any, credit: pb.Credit) -> Flow[None]:
    """Give a credit back to the daemon after a failed call: whether that call released it is
    not known, so the library forgets it either way (and the next put asks for a new one)."""
    if client.alive:
        with contextlib.suppress(KVStoreClientError):  # (released already)
            yield _wire.release_sequence(client.session_id, credit.sequence_id)


def _into_credit(
    client: Any,
    ns: Namespace,
    call: pb.PutRequest,
    data: PutData,
    credit: pb.Credit,
    pages: int,
    skip: int,
) -> Flow[PutResult]:
    """Copy pages [skip, pages) into the credit, then Put (`call`: its tokens and keys set).
    Where the client pipelines puts (host pools over the lane: docs/api.md, "A put in one
    round trip"), the Put goes out first with bytes_follow and the copy is its follow-up: the
    daemon prepares the put while the pages are copied, and seals it once they are."""
    try:
        src = src_of(ns, data, pages)
    except BaseException:
        client._credits.give(ns, credit)
        raise
    slots = credit.slots[: pages - skip]
    call.credit_sequence_id = credit.sequence_id
    call.slots[:] = slots
    call.credit_pages = pages
    call.credit_unzeroed_ok = ASK_UNZEROED  # (_into_credit copies every byte of each page it puts)
    call.release_pin_ids[:] = client._pins_done.take()
    call.skip_pages = skip

    def copy() -> bytes | None:
        # (the pages' checksums taken as they are copied, when the daemon keeps checksums: it
        # then need not read the pages again after the seal; docs/security.md)
        return _copy.copy_in(ns, src, range(skip, pages), slots, sums=SEND_SUMS and credit.page_sums)

    if client.pipelines_puts and ns.pool.rows().device.type == "cpu":
        call.bytes_follow = True
        put = _wire.Call(
            "kv",
            "Put",
            call,
            _same,
            pool=ns,
            follow=lambda: pb.PutWritten(page_sums=copy() or b"").SerializeToString(),
        )
    else:
        call.page_sums = copy() or b""
        put = _wire.Call("kv", "Put", call, _same, pool=ns, sync_first=ns)
    try:
        r = yield put
    except BaseException:
        yield from _drop(client, credit)
        raise
    client._credits.give(ns, r.credit)
    return PutResult(r.num_tokens, r.cached_tokens, pages - skip, r.sealed_pages, r.deduplicated_pages)


def _reserve_and_seal(
    client: Any,
    ns: Namespace,
    req: pb.ReserveRequest,
    data: PutData,
    old: pb.Credit | None,
    credit_pages: int,
) -> Flow[PutResult]:
    sid = client.session_id
    req.release_pin_ids.extend(client._pins_done.take())
    r = yield _wire.Call("kv", "Reserve", req, _same, pool=ns)
    try:
        written = write_pages(ns, pages_from_proto(r.pages), data)
        seal = seal_request(sid, r.sequence_id, r.num_tokens)
        seal.credit_pages = credit_pages
        seal.credit_unzeroed_ok = ASK_UNZEROED  # (as in _into_credit)
        seal.credit_sequence_id = old.sequence_id if old is not None else 0
        s = yield _wire.Call("kv", "Seal", seal, _same, sync_first=ns)
    except BaseException:
        # Give the sequence back (a Seal that failed left it held). A Seal whose reply was
        # lost may have sealed it already (then it is the next put's credit, or released):
        # the caller gets the error that stopped the put, not this cleanup's NOT_FOUND.
        if client.alive:
            with contextlib.suppress(KVStoreClientError):
                yield _wire.release_sequence(sid, r.sequence_id)
        raise
    client._credits.give(ns, s.credit)
    return PutResult(r.num_tokens, r.cached_tokens, written, s.sealed_pages, s.deduplicated_pages)
