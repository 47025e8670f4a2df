"""The blocking client.

    with kvstore_client.connect(client_name="worker-0") as kv:
        with kv.allocate("llama3-8b") as seq:
            res = seq.append(prompt_ids)
            for page, view in zip(res.writable_pages, seq.views(res.writable_pages)):
                view.copy_(kv_of(page))          # write KV in place, no copy over gRPC
            seq.commit()

The session's lease is held by a KeepAlive stream that a daemon thread
consumes: it lasts exactly as long as the client is open and this process is
alive, so a crashed worker leaks nothing in the daemon.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import replace
from functools import partial
from typing import Any, TypeVar

import grpc
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

from . import _wire, device, pool_fd
from . import lane as _lane
from ._core import (
    KEEPALIVE_S,
    LEASE_SETTLE_S,
    ClientCore,
    log,
    make_stubs,
)
from ._fast_api import FastPath
from ._held import Lookup, Sequence
from .channel import TLS, bearer, open_sync
from .errors import KVStoreClientError
from .namespace import Namespace, pool_moved
from .results import (
    CloseResult,
    DeleteNamespaceResult,
    EvictResult,
    FlushResult,
    ReleaseResult,
    SequenceOptions,
    Stats,
)

T = TypeVar("T")


class Client(FastPath, ClientCore):
    """One session with the daemon. Build it with `connect()`.

    Thread-safe for calls; each `Sequence`/`Lookup` is driven by one thread.
    Errors are `kvstore_client.errors.KVStoreClientError` subclasses, one per status code.
    """

    def __init__(
        self,
        channel: grpc.Channel,
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
        self._lane: _lane.Lane | None = None  # the put/get calls' way when the daemon offers it
        self._keepalive: Any = None  # the KeepAlive call, owned by open()/close()
        self._keepalive_thread: threading.Thread | None = None

    # ------------------------------------------------------------ session

    def open(
        self, client_name: str, lease_ttl_s: float | None = None, *, connect_timeout_s: float = 10.0
    ) -> None:
        """Open the session (waiting up to `connect_timeout_s` for the daemon) and start
        holding its lease; returns once the daemon has the KeepAlive stream (its first
        event), so from then on a crash of this process frees everything. `connect()`
        calls this."""
        self._send(self._open_call(client_name, lease_ttl_s), timeout=connect_timeout_s, wait_for_ready=True)
        self._lease_attached = threading.Event()
        self._lease_ended = threading.Event()
        self._lane = _lane.offered(self.target, self._lane_wanted, self._token, self._lease_ended)
        self._keepalive = self._stubs["kv"].KeepAlive(_wire.keepalive_request(self.session_id))
        self._keepalive_thread = threading.Thread(
            target=self._hold_lease,
            args=(self._keepalive,),
            name=f"kvstore-keepalive-{self.session_id}",
            daemon=True,
        )
        self._keepalive_thread.start()
        if not self._lease_attached.wait(connect_timeout_s):
            log.debug("session %d: no KeepAlive event within %.1fs", self.session_id, connect_timeout_s)
        self._check_usable()

    def _hold_lease(self, stream: Any) -> None:
        err = None
        try:
            for event in stream:
                self._on_keepalive_event(event)
        except grpc.RpcError as e:
            err = e
        self._on_keepalive_end(err)

    @property
    def pipelines_puts(self) -> bool:
        """Whether a put into a credit goes out before its pages are copied, the daemon
        preparing it meanwhile (docs/api.md, "A put in one round trip"): over the lane, to a
        daemon that says it takes them, unless `$KVSTORE_PUT_FOLLOW=0`."""
        return self._lane is not None and self._lane.put_follow and self.lane_put_follow

    @property
    def lane(self) -> bool:
        """Whether the put/get calls go over the daemon's lane socket (else gRPC; docs/api.md
        "The lane")."""
        return self._lane is not None

    def heartbeat(self) -> int:
        """Renew the lease by hand (the KeepAlive stream already does); returns its expiry (unix ms)."""
        return self._run(_wire.heartbeat(self.session_id))

    def close(self) -> CloseResult | None:
        """Close the session (the daemon releases what it still holds), stop the lease and
        unmap the pools. Idempotent; never raises for a daemon that is already gone."""
        if self._closed:
            return None
        self._closed = True
        result = None
        try:
            if self.session_id and self._lease_error is None:
                close = _wire.close_session(self.session_id, self._all_pools)  # after sync
                result = self._send(close, timeout=min(self.timeout_s or 5.0, 5.0))
        except KVStoreClientError as err:
            log.warning("closing session %d at %s: %s", self.session_id, self.target, err)
        finally:
            if self._keepalive is not None:
                self._keepalive.cancel()
            if self._keepalive_thread is not None:
                self._keepalive_thread.join(timeout=5.0)
            if self._lane is not None:
                self._lane.close()
            self._close_namespaces()
            self._channel.close()
        return result

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ calls

    def _send(
        self, call: _wire.Call[T], *, timeout: float | None = None, wait_for_ready: bool | None = None
    ) -> T:
        device.synchronize(call)  # seal/release after sync (device pools; docs/gpu.md)
        try:
            if self._lane is not None and call.method in _lane.METHODS:  # (all of them KVStore's)
                reply = self._lane.call(call.method, call.request, timeout, call.follow)
            elif call.follow is not None:  # (pipelines_puts was true: the lane is not closed early)
                raise RuntimeError(f"{call.method} with a follow-up frame needs the lane, which is closed")
            else:
                method = getattr(self._stubs[call.service], call.method)
                reply = method(call.request, timeout=timeout, wait_for_ready=wait_for_ready)
        except grpc.RpcError as err:  # (a lane.LaneError too: the same codes and messages)
            if self._may_be_shutdown(err):
                self._lease_ended.wait(LEASE_SETTLE_S)
            raise self._error(err) from err
        moved = pool_moved(call.pool, reply)
        if moved is not None:
            info = self._send(_wire.get_namespace(moved.name), timeout=timeout)
            moved.rebind(info, reply.pool_epoch, pool_fd.fetch_for(self.target, info, self._token))
        return call.convert(reply)

    def _run(self, call: _wire.Call[T]) -> T:
        self._check_usable()
        return self._send(call, timeout=self.timeout_s)

    # ------------------------------------------------------------ namespaces

    def namespace(self, name: str | Namespace) -> Namespace:
        """The namespace's info and pool (cached per client: one GetNamespace, one mapping)."""
        if isinstance(name, Namespace):
            return name
        cached = self._namespaces.get(name)
        return cached if cached is not None else self._run(self._namespace_call(name))

    def create_namespace(self, spec: pb.NamespaceSpec | str, **fields: Any) -> Namespace:
        """Admin: create a namespace from a spec, or from a name and the keyword arguments
        of `kvstore_client.namespace_spec` (num_layers, num_kv_heads, head_dim, dtype,
        page_tokens, num_pages, ...)."""
        return self._run(_wire.create_namespace(spec, fields, self._remember_namespace))

    def delete_namespace(
        self, name: str, *, force: bool = False, pool_epoch: int | None = None
    ) -> DeleteNamespaceResult:
        """Admin: delete a namespace and unlink its pool. Refused (FailedPrecondition) while
        a session holds a sequence or pin in it, unless `force` (they are released).
        `pool_epoch`: the pool to delete (default: the one the daemon serves now); another
        epoch is refused, so a namespace created again since is never deleted by mistake."""
        if pool_epoch is None:
            pool_epoch = (self._run(_wire.get_namespace(name))).pool.pool_epoch
        result = self._run(_wire.delete_namespace(name, force, pool_epoch))
        ns = self._namespaces.pop(name, None)
        if ns is not None:
            ns.unmap()
        return result

    def list_namespaces(self) -> list[pb.NamespaceInfo]:
        return self._run(_wire.list_namespaces())

    def list_sessions(self) -> list[pb.SessionInfo]:
        return self._run(_wire.list_sessions())

    def stats(self, namespace: str = "") -> Stats:
        """The daemon's counters (`namespaces`, `sessions`, `uptime_s`, `version`, `tiers`);
        empty `namespace` = all of them."""
        return self._run(_wire.stats(namespace))

    def health(self, service: str = "") -> str:
        """The grpc.health.v1 status: "SERVING", "NOT_SERVING", ..."""
        return self._run(_wire.health(service))

    # ------------------------------------------------------------ sequences and lookups

    def allocate(
        self,
        namespace: str | Namespace,
        max_tokens: int = 0,
        extra_keys: bytes = b"",
        *,
        options: SequenceOptions | None = None,
        model_fingerprint: str = "",
    ) -> Sequence:
        """A new sequence. `max_tokens` > 0 reserves its pages now (or raises ResourceExhausted).
        `options`: a cache budget (sliding window, importance); `model_fingerprint`: refused
        with FailedPrecondition if the namespace holds another model's KV."""
        ns = self.namespace(namespace)
        make = partial(Sequence, self, ns)
        return self._run(
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
    ) -> Lookup:
        """The longest cached prefix of `tokens`. With `pin=True` its pages stay put until released.
        Pages below the pool are promoted into it first; `return_in_flight=True` (with pin)
        answers at once instead: `ready_pages` are readable, `wait()` for the rest."""
        ns = self.namespace(namespace)
        make = partial(Lookup, self, ns)
        return self._run(
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

    def flush(self) -> FlushResult:
        """Admin: write every sealed page not yet on disk and fsync (needs a disk tier)."""
        return self._run(_wire.flush())

    def explain(
        self, namespace: str, tokens: _wire.Tokens, extra_keys: bytes = b"", *, model_fingerprint: str = ""
    ) -> pb.ExplainResponse:
        """Admin: for each full page of `tokens`, hit (which tier) or why not (ExplainResponse)."""
        return self._run(_wire.explain(namespace, tokens, extra_keys, model_fingerprint))

    def mrc(
        self, namespace: str, capacities: Iterable[int] = (), fractions: Iterable[float] = ()
    ) -> pb.MrcResponse:
        """Admin: estimated hit rate at other capacities (pages, or fractions of the pool)."""
        return self._run(_wire.mrc(namespace, capacities, fractions))

    def release_pin(self, pin_id: int) -> ReleaseResult:
        return self._run(_wire.release_pin(self.session_id, pin_id, self._all_pools))

    def evict(
        self,
        namespace: str,
        all: bool = False,
        prefix: _wire.Tokens | None = None,
        nbytes: int | None = None,
        extra_keys: bytes = b"",
    ) -> EvictResult:
        """Evict unpinned sealed pages: all of them, a prefix and its extensions, or `nbytes` bytes."""
        return self._run(_wire.evict(namespace, all, prefix, nbytes, extra_keys))


def connect(
    target: str | os.PathLike[str] | None = None,
    *,
    client_name: str = "",
    lease_ttl_s: float | None = None,
    timeout_s: float | None = 30.0,
    connect_timeout_s: float = 10.0,
    keepalive_s: float = KEEPALIVE_S,
    token: str | None = None,
    tls: TLS | None = None,
    lane: bool | None = None,
) -> Client:
    """Connect to the daemon and open a session.

    `target`: None = `default_target()`; a socket path; or any gRPC target (`host:port`,
    `unix:/path`). `lease_ttl_s`: None = the daemon's default. `timeout_s`: deadline of
    each call (None = none). Waits up to `connect_timeout_s` for the daemon to come up.
    `keepalive_s`: HTTP/2 ping interval (>= 5 s, the daemon's limit): a daemon that stops
    answering pings fails the calls under way within `keepalive_s` + 5 s, deadline or not.
    `token` (None = `$KVSTORE_TOKEN`, if set) and `tls`: kvstore_client.channel, docs/security.md.
    `lane`: the put/get calls over the daemon's lane socket when it offers one (a local unix
    socket; kvstore_client.lane); None = on unless `$KVSTORE_LANE=0`.
    """
    client = Client(
        *open_sync(target, keepalive_s, token, tls), timeout_s=timeout_s, token=bearer(token), lane=lane
    )
    try:
        client.open(client_name or f"pid-{os.getpid()}", lease_ttl_s, connect_timeout_s=connect_timeout_s)
    except BaseException:
        client.close()
        raise
    return client
