"""The asyncio client: the same API as `kvstore_client.Client`, awaited.

    async with kvstore_client.aio.connect(client_name="worker-0") as kv:
        async with kv.allocate("llama3-8b") as seq:
            res = await seq.append(prompt_ids)
            ...
            await seq.commit()

The lease is held by a KeepAlive stream consumed by a task on the loop that
connected; requests and replies are built by the same code as the sync client. The put/get
calls go over the daemon's lane when it offers one (kvstore_client/aio_lane.py: a connection
per call in flight), every other call over gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Generator, Iterable
from dataclasses import replace
from functools import partial
from types import TracebackType
from typing import Any, Generic, TypeVar

import grpc
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

from . import _core, _wire, aio_lane, device, pool_fd
from ._core import ClientCore, Held, LookupBase, SequenceBase, log, make_stubs
from ._fast_api import AsyncFastPath
from .channel import TLS, bearer, open_aio
from .errors import KVStoreClientError
from .namespace import Namespace, pool_moved, remember
from .results import (
    AppendResult,
    CloseResult,
    CommitResult,
    DeleteNamespaceResult,
    EvictResult,
    FlushResult,
    PreemptResult,
    ReleaseResult,
    SequenceOptions,
    Stats,
)

T = TypeVar("T")
_R = TypeVar("_R", bound="_AsyncReleaseOnExit")
_C = TypeVar("_C", "AsyncClient", "AsyncSequence", "AsyncLookup")


class Opening(Generic[_C]):
    """What `connect`, `allocate` and `lookup` return: await it for the object, or use
    it directly in `async with` (the object is closed/released on exit)."""

    def __init__(self, pending: Awaitable[_C]) -> None:
        self._pending = pending
        self._opened: _C | None = None

    def __await__(self) -> Generator[Any, None, _C]:
        return self._pending.__await__()

    async def __aenter__(self) -> _C:
        self._opened = await self._pending
        return self._opened

    async def __aexit__(self, *exc: Any) -> None:
        if self._opened is not None:
            await self._opened.__aexit__(*exc)


class _AsyncReleaseOnExit(Held):
    _client: AsyncClient

    async def release(self) -> ReleaseResult | None:
        call = self._release_call()
        return None if call is None else await self._client._run(call)

    async def __aenter__(self: _R) -> _R:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.release()
        except KVStoreClientError as err:
            self._release_failed(exc, err)


class AsyncSequence(SequenceBase, _AsyncReleaseOnExit):
    """See `kvstore_client.Sequence`."""

    _client: AsyncClient

    async def append(self, tokens: _wire.Tokens) -> AppendResult:
        return await self._client._run(self._append_call(tokens))

    async def commit(
        self, num_tokens: int | None = None, *, written_slots: Iterable[int] | None = None
    ) -> CommitResult:
        return await self._client._run(self._commit_call(num_tokens, written_slots))

    async def report_importance(self, scores: Iterable[float]) -> int:
        """See `kvstore_client.Sequence.report_importance`."""
        return await self._client._run(self._report_importance_call(scores))

    async def refresh(self) -> AsyncSequence:
        return await self._client._run(self._refresh_call())

    async def swap_out(self) -> PreemptResult:
        """See `kvstore_client.Sequence.swap_out`."""
        return await self._client._run(self._preempt_call(drop=False))

    async def swap_in(self) -> AsyncSequence:
        return await self._client._run(self._swap_in_call())

    async def drop(self) -> PreemptResult:
        return await self._client._run(self._preempt_call(drop=True))


class AsyncLookup(LookupBase, _AsyncReleaseOnExit):
    """See `kvstore_client.Lookup`."""

    async def wait(self, pages: int = 0) -> AsyncLookup:
        if self.ready_pages >= (pages or len(self.slots)):
            return self
        return await self._client._run(self._wait_call(pages))


class AsyncClient(AsyncFastPath, ClientCore):
    """One session with the daemon, for asyncio. Build it with `await aio.connect()`;
    use it from the loop that built it. Method docs: `kvstore_client.Client`."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        target: str,
        *,
        timeout_s: float | None = 30.0,
        token: str = "",
        lane: bool | None = None,
    ) -> None:
        super().__init__(target, timeout_s=timeout_s, token=token)
        self._channel = channel
        self._stubs = make_stubs(channel)
        self._lane_wanted = lane
        self._lane: aio_lane.AsyncLane | None = None  # the put/get calls' way when the daemon offers it
        self._keepalive: Any = None  # the KeepAlive call, owned by open()/close()
        self._keepalive_task: asyncio.Task[None] | None = None

    async def open(
        self, client_name: str, lease_ttl_s: float | None = None, *, connect_timeout_s: float = 10.0
    ) -> None:
        """See `Client.open`."""
        await self._send(
            self._open_call(client_name, lease_ttl_s), timeout=connect_timeout_s, wait_for_ready=True
        )
        self._lease_attached = asyncio.Event()
        self._lease_ended = asyncio.Event()
        self._lane = await aio_lane.offered(self.target, self._lane_wanted, self._token)
        self._keepalive = self._stubs["kv"].KeepAlive(_wire.keepalive_request(self.session_id))
        self._keepalive_task = asyncio.get_running_loop().create_task(
            self._hold_lease(self._keepalive), name=f"kvstore-keepalive-{self.session_id}"
        )
        try:
            await asyncio.wait_for(self._lease_attached.wait(), connect_timeout_s)
        except TimeoutError:
            log.debug("session %d: no KeepAlive event within %.1fs", self.session_id, connect_timeout_s)
        self._check_usable()

    async def _hold_lease(self, stream: Any) -> None:
        err = None
        try:
            async for event in stream:
                self._on_keepalive_event(event)
        except grpc.RpcError as e:
            err = e
        except asyncio.CancelledError:
            if not self._closed:
                raise
        finally:
            # The lease goes with the stream: a call waiting on a hung daemon's lane fails
            # UNAVAILABLE, deadline or not, as on gRPC (whose pings ended the stream).
            if self._lane is not None and not self._closed:  # (close() closes it itself)
                self._lane.close("the session's KeepAlive stream ended (the daemon stopped answering)")
        self._on_keepalive_end(err)

    @property
    def pipelines_puts(self) -> bool:
        """As `Client.pipelines_puts`: a put into a credit goes out before its pages are copied
        (docs/api.md, "A put in one round trip"), unless `$KVSTORE_PUT_FOLLOW=0`."""
        return self._lane is not None and self._lane.put_follow and self.lane_put_follow

    @property
    def lane(self) -> bool:
        """Whether the put/get calls go over the daemon's lane socket (else gRPC; docs/api.md
        "The lane")."""
        return self._lane is not None

    async def heartbeat(self) -> int:
        return await self._run(_wire.heartbeat(self.session_id))

    async def close(self) -> CloseResult | None:
        if self._closed:
            return None
        self._closed = True
        result = None
        try:
            if self.session_id and self._lease_error is None:
                close = _wire.close_session(self.session_id, self._all_pools)
                result = await self._send(close, timeout=min(self.timeout_s or 5.0, 5.0))
        except KVStoreClientError as err:
            log.warning("closing session %d at %s: %s", self.session_id, self.target, err)
        finally:
            if self._keepalive is not None:
                self._keepalive.cancel()
            if self._keepalive_task is not None:
                with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                    await asyncio.wait_for(self._keepalive_task, 5.0)
            if self._lane is not None:
                self._lane.close()
            self._close_namespaces()
            await self._channel.close()
        return result

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _send(
        self, call: _wire.Call[T], *, timeout: float | None = None, wait_for_ready: bool | None = None
    ) -> T:
        if (event := device.sync_event(call)) is not None:  # recorded on the caller's stream
            await asyncio.to_thread(event.synchronize)  # seal/release after sync (docs/gpu.md)
        try:
            if self._lane is not None and call.method in aio_lane.METHODS:  # (all of them KVStore's)
                reply = await self._lane.call(call.method, call.request, timeout, call.follow)
            elif call.follow is not None:  # (pipelines_puts was true: the lane is not closed early)
                raise RuntimeError(f"{call.method} with a follow-up frame needs the lane, which is closed")
            else:
                method = getattr(self._stubs[call.service], call.method)
                reply = await method(call.request, timeout=timeout, wait_for_ready=wait_for_ready)
        except grpc.RpcError as err:  # (a lane.LaneError too: the same codes and messages)
            if self._may_be_shutdown(err):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._lease_ended.wait(), _core.LEASE_SETTLE_S)
            raise self._error(err) from err
        fetch = partial(asyncio.to_thread, pool_fd.fetch_for, self.target)  # pool tickets: off the loop
        if (moved := pool_moved(call.pool, reply)) is not None:
            info = await self._send(_wire.get_namespace(moved.name), timeout=timeout)
            moved.rebind(info, reply.pool_epoch, await fetch(info, self._token))
        if call.convert == self._remember_namespace:
            return remember(self._namespaces, reply, await fetch(reply, self._token))  # type: ignore[return-value]
        return call.convert(reply)

    async def _run(self, call: _wire.Call[T]) -> T:
        self._check_usable()
        return await self._send(call, timeout=self.timeout_s)

    async def namespace(self, name: str | Namespace) -> Namespace:
        if isinstance(name, Namespace):
            return name
        cached = self._namespaces.get(name)
        return cached if cached is not None else await self._run(self._namespace_call(name))

    async def create_namespace(self, spec: pb.NamespaceSpec | str, **fields: Any) -> Namespace:
        return await self._run(_wire.create_namespace(spec, fields, self._remember_namespace))

    async def delete_namespace(
        self, name: str, *, force: bool = False, pool_epoch: int | None = None
    ) -> DeleteNamespaceResult:
        """See `Client.delete_namespace`."""
        if pool_epoch is None:
            pool_epoch = (await self._run(_wire.get_namespace(name))).pool.pool_epoch
        result = await self._run(_wire.delete_namespace(name, force, pool_epoch))
        ns = self._namespaces.pop(name, None)
        if ns is not None:
            ns.unmap()
        return result

    async def list_namespaces(self) -> list[pb.NamespaceInfo]:
        return await self._run(_wire.list_namespaces())

    async def list_sessions(self) -> list[pb.SessionInfo]:
        return await self._run(_wire.list_sessions())

    async def stats(self, namespace: str = "") -> Stats:
        return await self._run(_wire.stats(namespace))

    async def health(self, service: str = "") -> str:
        return await self._run(_wire.health(service))

    def allocate(
        self,
        namespace: str | Namespace,
        max_tokens: int = 0,
        extra_keys: bytes = b"",
        *,
        options: SequenceOptions | None = None,
        model_fingerprint: str = "",
    ) -> Opening[AsyncSequence]:
        return Opening(self._allocate(namespace, max_tokens, extra_keys, options, model_fingerprint))

    async def _allocate(
        self,
        namespace: str | Namespace,
        max_tokens: int,
        extra_keys: bytes,
        options: SequenceOptions | None,
        model_fingerprint: str,
    ) -> AsyncSequence:
        ns = await self.namespace(namespace)
        make = partial(AsyncSequence, self, ns)
        return await self._run(
            replace(
                _wire.allocate(
                    self.session_id, ns.name, max_tokens, extra_keys, make, options, model_fingerprint
                ),
                pool=ns,
            )
        )

    def lookup(
        self,
        namespace: str | Namespace,
        tokens: _wire.Tokens,
        extra_keys: bytes = b"",
        pin: bool = False,
        *,
        model_fingerprint: str = "",
        return_in_flight: bool = False,
    ) -> Opening[AsyncLookup]:
        return Opening(self._lookup(namespace, tokens, extra_keys, pin, model_fingerprint, return_in_flight))

    async def _lookup(
        self,
        namespace: str | Namespace,
        tokens: _wire.Tokens,
        extra_keys: bytes,
        pin: bool,
        model_fingerprint: str,
        return_in_flight: bool,
    ) -> AsyncLookup:
        ns = await self.namespace(namespace)
        make = partial(AsyncLookup, self, ns)
        return await self._run(
            replace(
                _wire.lookup(
                    self.session_id,
                    ns.name,
                    tokens,
                    extra_keys,
                    pin,
                    make,
                    model_fingerprint,
                    return_in_flight,
                ),
                pool=ns,
            )
        )

    async def flush(self) -> FlushResult:
        return await self._run(_wire.flush())

    async def explain(
        self, namespace: str, tokens: _wire.Tokens, extra_keys: bytes = b"", *, model_fingerprint: str = ""
    ) -> pb.ExplainResponse:
        """Admin: for each full page of `tokens`, hit (which tier) or why not (ExplainResponse)."""
        return await self._run(_wire.explain(namespace, tokens, extra_keys, model_fingerprint))

    async def mrc(
        self, namespace: str, capacities: Iterable[int] = (), fractions: Iterable[float] = ()
    ) -> pb.MrcResponse:
        """Admin: estimated hit rate at other capacities (pages, or fractions of the pool)."""
        return await self._run(_wire.mrc(namespace, capacities, fractions))

    async def release_pin(self, pin_id: int) -> ReleaseResult:
        return await self._run(_wire.release_pin(self.session_id, pin_id, self._all_pools))

    async def evict(
        self,
        namespace: str,
        all: bool = False,
        prefix: _wire.Tokens | None = None,
        nbytes: int | None = None,
        extra_keys: bytes = b"",
    ) -> EvictResult:
        return await self._run(_wire.evict(namespace, all, prefix, nbytes, extra_keys))


def connect(
    target: str | os.PathLike[str] | None = None,
    *,
    client_name: str = "",
    lease_ttl_s: float | None = None,
    timeout_s: float | None = 30.0,
    connect_timeout_s: float = 10.0,
    keepalive_s: float = _core.KEEPALIVE_S,
    token: str | None = None,
    tls: TLS | None = None,
    lane: bool | None = None,
) -> Opening[AsyncClient]:
    """See `kvstore_client.connect`: `kv = await aio.connect()` or `async with aio.connect() as kv`.
    `lane`: as there (the calls in flight each take a lane connection of their own)."""
    dial = partial(open_aio, target, keepalive_s, token, tls)  # (the channel is made on the loop)
    return Opening(
        _connect(dial, client_name, lease_ttl_s, timeout_s, connect_timeout_s, bearer(token), lane)
    )


async def _connect(
    dial: Callable[[], tuple[grpc.aio.Channel, str]],
    client_name: str,
    lease_ttl_s: float | None,
    timeout_s: float | None,
    connect_timeout_s: float,
    token: str,
    lane: bool | None = None,
) -> AsyncClient:
    client = AsyncClient(*dial(), timeout_s=timeout_s, token=token, lane=lane)
    try:
        await client.open(
            client_name or f"pid-{os.getpid()}", lease_ttl_s, connect_timeout_s=connect_timeout_s
        )
    except BaseException:
        await client.close()
        raise
    return client
