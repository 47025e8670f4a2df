"""The fast path: a put in one RPC (Put, into the credit of reserved pages its previous put's
reply granted; the first put of a session is Reserve + Seal: _put.py), a get in one (Lookup
with a pin that ends by itself), several prompts a call (BatchLookup, BatchReserve, BatchSeal).

    kv.put("ns", tokens, kv_bytes)         # copy into the credit, Put: visible (_put.py)
    hit = kv.get("ns", tokens, out)        # Lookup, copy the hit into `out`, check the deadline

Each operation is written once, as a generator that yields the `Call`s it needs and gets
their replies back (`drive` and `drive_async` send them), so the sync and asyncio clients
share every line of it.

A get's pin ends by itself at its deadline; the daemon never frees its pages before. The
library checks the deadline after copying, against the earlier of the daemon's deadline
(CLOCK_MONOTONIC, which every process on the host shares) and its own send time + the
granted ttl (right even if the two clocks disagreed: the daemon's pin started after the
request left). A copy that ended late raises `PinExpired` and never returns the bytes.
A pin the client is done with is released by its next fast call (`release_pin_ids`), or
by its deadline, whichever comes first.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Generator, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

from . import _copy, _wire
from ._tokens import fill_tokens
from .errors import InvalidArgument, KVStoreClientError, PinExpired, PoolError, from_status
from .namespace import Namespace
from .results import Page, SequenceOptions, pages_from_proto

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
Flow = Generator[_wire.Call[Any], Any, T]
DEFAULT_PIN_TTL_S = 1.0  # the daemon caps it (server.pin_ttl_max_s, 2 s by default)
# `data` of a put: the KV of page i at bytes [i * page_bytes, (i+1) * page_bytes) of a buffer
# (bytes, bytearray, memoryview, numpy array, CPU tensor), or a function that writes the
# WRITABLE pages itself: write(pages, views), views as `Namespace.page` gives them.
PutData = Any


@dataclass(frozen=True, slots=True)
class PutResult:
    num_tokens: int
    cached_tokens: int  # tokens in pages someone had sealed already: not written
    written_pages: int  # pages this put copied (into a credit: every page, cached ones too)
    sealed_pages: int  # pages made visible by this put
    deduplicated_pages: int  # written, but sealed by someone else first (ours freed)


@dataclass(frozen=True, slots=True)
class GetResult:
    hit_tokens: int  # leading tokens whose KV was copied (a multiple of page_tokens)
    pages: int
    # The copied bytes, uint8: page i at [i * page_bytes, (i+1) * page_bytes); a view of `out`
    # when one was given, else a new tensor.
    data: torch.Tensor
    pin_deadline_ns: int = 0  # when its pin ends (CLOCK_MONOTONIC ns: time.monotonic_ns())


def _same(reply: Any) -> Any:
    return reply


def drive(run: Callable[[_wire.Call[Any]], Any], flow: Flow[T]) -> T:
    """Run a flow, sending each call with `run` (blocking)."""
    try:
        call = next(flow)
        while True:
            try:
                reply = run(call)
            except BaseException as e:
                call = flow.throw(e)
            else:
                call = flow.send(reply)
    except StopIteration as stop:
        return stop.value


async def drive_async(run: Callable[[_wire.Call[Any]], Awaitable[Any]], flow: Flow[T]) -> T:
    """Run a flow, sending each call with `run` (awaited)."""
    try:
        call = next(flow)
        while True:
            try:
                reply = await run(call)
            except BaseException as e:
                call = flow.throw(e)
            else:
                call = flow.send(reply)
    except StopIteration as stop:
        return stop.value


class PinsDone:
    """Pins a client's gets are done with: sent for release with its next fast call."""

    def __init__(self) -> None:
        self._ids: list[int] = []

    def add(self, pin_id: int) -> None:
        if pin_id:
            self._ids.append(pin_id)

    def take(self) -> list[int]:
        # (A pin added while another thread takes may wait for a later call, or its deadline.)
        ids, self._ids = self._ids, []
        return ids


# ---------------------------------------------------------------- requests


def lookup_request(
    sid: int, ns: Namespace, tokens: _wire.Tokens, extra_keys: bytes, pin_ttl_s: float, fingerprint: str
) -> pb.LookupRequest:
    if not pin_ttl_s > 0:
        raise InvalidArgument(f"pin_ttl_s={pin_ttl_s} must be > 0: a get's pages are pinned while it copies")
    req = pb.LookupRequest(
        session_id=sid,
        namespace=ns.name,
        extra_keys=_wire.extra_bytes(extra_keys),
        model_fingerprint=fingerprint,
        pin_ttl_ms=max(1, round(pin_ttl_s * 1000)),
    )
    fill_tokens(req, tokens)
    return req


def reserve_request(
    sid: int,
    ns: Namespace,
    tokens: _wire.Tokens,
    extra_keys: bytes,
    max_tokens: int,
    options: SequenceOptions | None,
    fingerprint: str,
) -> pb.ReserveRequest:
    req = pb.ReserveRequest(
        session_id=sid,
        namespace=ns.name,
        extra_keys=_wire.extra_bytes(extra_keys),
        max_tokens=max_tokens,
        model_fingerprint=fingerprint,
    )
    if options is not None:
        req.options.CopyFrom(_wire.sequence_options(options))
    fill_tokens(req, tokens)
    return req


def seal_request(sid: int, seq_id: int, num_tokens: int) -> pb.SealRequest:
    return pb.SealRequest(session_id=sid, sequence_id=seq_id, num_tokens=num_tokens, release=True)


# ---------------------------------------------------------------- bytes in and out


def write_pages(ns: Namespace, pages: list[Page], data: PutData) -> int:
    """Write the WRITABLE pages of a reserve from `data`; how many."""
    writable = [p for p in pages if p.writable]
    if not writable:
        return 0
    if callable(data):
        data(writable, ns.pages(p.slot for p in writable))
        return len(writable)
    src = src_of(ns, data, max(p.index for p in writable) + 1)
    _copy.copy_in(ns, src, [p.index for p in writable], [p.slot for p in writable])
    return len(writable)


def src_of(ns: Namespace, data: PutData, pages: int) -> Any:
    """`data` as flat bytes, checked to hold `pages` pages."""
    src = _copy.flat_bytes(data, "data")
    size = ns.pool.page_bytes
    if len(src) < pages * size:
        raise InvalidArgument(f"data has {len(src)} bytes; its pages need {pages * size} (page_bytes={size})")
    return src


def copy_out(
    ns: Namespace,
    reply: pb.LookupResponse,
    out: Any,
    sent_ns: int,
    after_copy: Callable[[], None] | None,
) -> GetResult:
    """Copy a get's hit into `out`, then check its pin's deadline (PinExpired if passed)."""
    import torch

    slots = reply.slots
    n = len(slots)
    size = ns.pool.page_bytes if n else 0
    if out is None:
        dst = torch.empty(n * size, dtype=torch.uint8)
    else:
        dst = _copy.flat_bytes(out, "out")
        if dst.shape[0] < n * size:  # (a tensor's len() is Python code: 10x shape's)
            raise InvalidArgument(f"out has {len(dst)} bytes; the {n} pages hit need {n * size}")
        if isinstance(dst, np.ndarray):
            if not dst.flags.writeable:
                raise InvalidArgument("out is read-only")
            dst = torch.from_numpy(dst)
    _copy.copy_out(ns, dst, slots)
    if after_copy is not None:
        after_copy()
    if reply.pin_ttl_ms:
        now = time.monotonic_ns()
        deadline = min(reply.pin_deadline_ns, sent_ns + reply.pin_ttl_ms * 1_000_000)
        if now >= deadline:
            raise PinExpired(
                f"the copy of {n} pages ended {(now - deadline) / 1e6:.3f} ms after the pin's deadline "
                f"(pin_ttl_ms={reply.pin_ttl_ms}): the bytes may be another page's and were not returned"
            )
    return GetResult(reply.hit_tokens, n, dst[: n * size], reply.pin_deadline_ns)


# ---------------------------------------------------------------- the flows


def namespace_of(client: Any, namespace: str | Namespace) -> Flow[Namespace]:
    if isinstance(namespace, Namespace):
        return namespace
    cached = client._namespaces.get(namespace)
    return cached if cached is not None else (yield client._namespace_call(namespace))


def get(
    client: Any,
    namespace: str | Namespace,
    tokens: _wire.Tokens,
    out: Any,
    after_copy: Callable[[], None] | None = None,
    **kw: Any,
) -> Flow[GetResult]:
    ns = yield from namespace_of(client, namespace)
    req = lookup_request(client.session_id, ns, tokens, **kw)
    req.release_pin_ids.extend(client._pins_done.take())
    sent = time.monotonic_ns()
    reply = yield _wire.Call("kv", "Lookup", req, _same, pool=ns)
    try:
        return copy_out(ns, reply, out, sent, after_copy)
    finally:
        client._pins_done.add(reply.pin_id)


def _item_error(status: pb.ItemStatus, ns: Namespace, epoch: int) -> KVStoreClientError | None:
    if status.code:
        return from_status(status.code, status.message)
    if not ns.is_current(epoch):
        return PoolError(
            f"namespace {ns.name!r}: an item's slots index pool epoch {epoch:016x}, not the "
            f"mapped {ns.epoch:016x} (the namespace was created again); retry it"
        )
    return None


def get_many(
    client: Any,
    namespace: str | Namespace,
    prompts: Iterable[_wire.Tokens],
    outs: Iterable[Any] | None,
    **kw: Any,
) -> Flow[list[GetResult | KVStoreClientError]]:
    ns = yield from namespace_of(client, namespace)
    reqs = [lookup_request(client.session_id, ns, t, **kw) for t in prompts]
    outs = [None] * len(reqs) if outs is None else list(outs)
    if reqs:
        reqs[0].release_pin_ids.extend(client._pins_done.take())
    sent = time.monotonic_ns()
    batch = yield _wire.Call("kv", "BatchLookup", pb.BatchLookupRequest(items=reqs), _same)
    results: list[GetResult | KVStoreClientError] = []
    for item, out in zip(batch.items, outs, strict=True):
        client._pins_done.add(item.reply.pin_id)
        err = _item_error(item.status, ns, item.reply.pool_epoch)
        try:
            results.append(err or copy_out(ns, item.reply, out, sent, None))
        except KVStoreClientError as e:
            results.append(e)
    return results


def put_many(
    client: Any,
    namespace: str | Namespace,
    prompts: Iterable[_wire.Tokens],
    datas: Iterable[PutData],
    **kw: Any,
) -> Flow[list[PutResult | KVStoreClientError]]:
    ns = yield from namespace_of(client, namespace)
    sid = client.session_id
    reqs = [reserve_request(sid, ns, t, **kw) for t in prompts]
    datas = list(datas)
    if len(datas) != len(reqs):
        raise InvalidArgument(f"{len(reqs)} prompts but {len(datas)} data")
    if reqs:
        reqs[0].release_pin_ids.extend(client._pins_done.take())
    batch = yield _wire.Call("kv", "BatchReserve", pb.BatchReserveRequest(items=reqs), _same)
    results: list[Any] = []
    seals: list[pb.SealRequest] = []
    sealing: list[tuple[int, pb.ReserveResponse, int | None]] = []  # written None: only given back
    for i, (item, data) in enumerate(zip(batch.items, datas, strict=True)):
        r = item.reply
        err = _item_error(item.status, ns, r.pool_epoch)
        if item.status.code == 0:  # the daemon holds a sequence for it
            written = None
            if err is None:
                try:
                    written = write_pages(ns, pages_from_proto(r.pages), data)
                except KVStoreClientError as e:
                    err = e
            seals.append(seal_request(sid, r.sequence_id, 0 if written is None else r.num_tokens))
            sealing.append((i, r, written))
        results.append(err)
    if not seals:
        return results
    try:
        sealed = yield _wire.Call("kv", "BatchSeal", pb.BatchSealRequest(items=seals), _same, sync_first=ns)
    except BaseException:
        if client.alive:
            for _, r, _ in sealing:
                yield _wire.release_sequence(sid, r.sequence_id)
        raise
    for (i, r, written), s in zip(sealing, sealed.items, strict=True):
        if written is not None:
            err = _item_error(s.status, ns, 0)
            results[i] = err or PutResult(
                r.num_tokens, r.cached_tokens, written, s.reply.sealed_pages, s.reply.deduplicated_pages
            )
    return results
