"""The daemon's edge: what every RPC of every service passes through, so no call can end with
UNKNOWN and shutdown reads the same to every caller.

Services register with the edge as they would with the server (the generated
`add_*Servicer_to_server(servicer, edge)`); each method's handler is wrapped once, there, and
`install` puts them all on the server as one generic handler. Not a server interceptor: grpc.aio
runs an interceptor's coroutine chain on every call, and for each method registered with the
server it keeps a request pending in its accept loop, which waits on all of them (~35 for
our services) at every call. One generic handler is one pending request and a dict lookup.

- Request bytes are parsed by a wrapping deserializer: bytes that do not parse, and strings
  or bytes longer than the edge allows, become INVALID_ARGUMENT naming the message type
  and field (grpc would answer UNKNOWN "Unexpected DecodeError" before any servicer ran).
- An exception that escapes a handler is mapped by `status.status_and_message`; an
  unexpected one (or a broken invariant) becomes INTERNAL, logged with its traceback and
  counted (Stats `internal_errors`, metric `kvstore_rpc_internal_errors`).
- With a tokens file, each method's handler is wrapped by the token check first
  (kvstore/server/auth.py): a call without the scopes it needs never reaches its servicer.
- Each call is timed and counted by its method and final status (kvstore/server/rpc_metrics.py):
  one histogram observe and one counter inc, on children bound when the method is wrapped.
- The methods in ENCODED_REPLIES answer with bytes: they are sent as they are.
- Once shutdown begins, new calls get UNAVAILABLE "daemon shutting down"; calls still running
  when the grace ends are cancelled and get the same status rather than CANCELLED.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from kvstore.server import request_scan, status
from kvstore.server.lane_counts import LaneCounts
from kvstore.server.pool_refusals import PoolSocketCounts
from kvstore.server.rpc_metrics import MethodMetrics, RpcMetrics

log = logging.getLogger(__name__)

SHUTTING_DOWN = "daemon shutting down"
HEALTH_PREFIX = "/grpc.health.v1.Health/"  # answers during shutdown: clients see NOT_SERVING
# Longest string (characters) and bytes value (other than extra_keys, token_ids_u32 and
# page_sums, which the store bounds by max_extra_keys_bytes, max_request_tokens and the Put's
# slots) a request may carry: names, fingerprints, salts, client names.
MAX_STRING = 256
UNBOUNDED_BYTES = frozenset({"extra_keys", "token_ids_u32", "page_sums"})
# Reflection's file_containing_symbol etc. are strings too; nothing legitimate is longer.
# The Lookup's reply is its bytes, encoded in C (fast_servicer.lookup_reply): sent as they are,
# no response serializer, over gRPC and the lane. Its request's usual shapes are read in one C
# pass into a named tuple of its fields, the rest parsed as before (server/request_scan.py).
ENCODED_REPLIES = frozenset({"/kvstore.v1.KVStore/Lookup"})
SCANNED_REQUESTS = frozenset({"/kvstore.v1.KVStore/Lookup"})


@dataclass
class EdgeCounts:
    malformed: int = 0  # requests refused because their bytes did not parse (or were too long)
    internal: int = 0  # calls that ended INTERNAL: a bug in the daemon, logged with a traceback
    pool: PoolSocketCounts = field(default_factory=PoolSocketCounts)  # the pool socket's (its own edge)
    lane: LaneCounts = field(default_factory=LaneCounts)  # the lane's (its calls pass this edge)


@dataclass(frozen=True, slots=True)
class Malformed:
    """What the wrapping deserializer hands the handler instead of a message it cannot build."""

    message: str


class Edge:
    def __init__(self) -> None:
        self.counts = EdgeCounts()
        self.rpc = RpcMetrics()  # latency and status of every call, by method (rpc_metrics.py)
        self.closing = False
        self._running: set[asyncio.Task[Any]] = set()  # unary calls under way
        self._idle: asyncio.Event | None = None  # set when _running empties, while drain waits
        # The loop the server runs on, known at `install`: `current_task(loop)` then skips
        # get_running_loop, which in CPython 3.11 makes a getpid() system call every time.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._methods: dict[str, grpc.RpcMethodHandler] = {}  # "/service/Method" -> wrapped handler
        self._services: set[str] = set()
        self._generic: list[grpc.GenericRpcHandler] = []
        # Set before registration when the daemon has tokens: wraps each method's handler with
        # the token check (kvstore/server/auth.py), inside the edge's own wrapping.
        self.guard: Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler] | None = None

    # ------------------------------------------------------------ registration

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        """What generated `add_*Servicer_to_server` hands a server: each method, wrapped now."""
        self._services.add(service)
        for name, handler in handlers.items():
            method = f"/{service}/{name}"
            if self.guard is not None:
                handler = self.guard(method, handler)
            self._methods[method] = self._wrap(method, handler)

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        """The generated code hands the same methods over this way too: kept to check in `install`."""
        self._generic.extend(handlers)

    def install(self, server: grpc.aio.Server) -> None:
        """Serve every method registered here, through the edge, on `server` (before it starts)."""
        other = [h for h in self._generic if getattr(h, "service_name", lambda: None)() not in self._services]
        if other:  # (a handler only a generic handler knows would bypass the edge)
            raise TypeError(f"generic handlers without their methods registered: {other}")
        server.add_generic_rpc_handlers((_Methods(self._methods),))
        with contextlib.suppress(RuntimeError):  # (installed off the loop: looked up per call)
            self._loop = asyncio.get_running_loop()

    # ------------------------------------------------------------ shutdown

    def begin_shutdown(self) -> None:
        """From now on, new calls (but health checks) get UNAVAILABLE "daemon shutting down"."""
        self.closing = True

    async def drain(self, grace_s: float) -> int:
        """Wait up to `grace_s` for the unary calls under way, then cancel the rest (they
        answer UNAVAILABLE "daemon shutting down"). Returns how many were cancelled."""
        if self._running:
            self._idle = idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(idle.wait(), grace_s)
        left = list(self._running)
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left, timeout=grace_s + 1.0)
        return len(left)

    # ------------------------------------------------------------ the wrapping

    def _wrap(self, method: str, h: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        deserializer = _guarded(h.request_deserializer, method in SCANNED_REQUESTS)
        if method in ENCODED_REPLIES:
            h = h._replace(response_serializer=None)
        refuse = not method.startswith(HEALTH_PREFIX)
        m = self.rpc.method(method, timed=h.unary_unary is not None)
        if h.unary_unary is not None:
            return h._replace(
                request_deserializer=deserializer, unary_unary=self._unary(method, h.unary_unary, refuse, m)
            )
        if h.unary_stream is not None:
            return h._replace(
                request_deserializer=deserializer,
                unary_stream=self._stream(method, h.unary_stream, refuse, m),
            )
        if h.stream_unary is not None:
            inner = self._unary(method, h.stream_unary, refuse, m)
            return h._replace(request_deserializer=deserializer, stream_unary=_checking_requests(inner))
        inner = self._stream(method, h.stream_stream, refuse, m)
        return h._replace(request_deserializer=deserializer, stream_stream=_checking_requests(inner))

    async def _check(self, request: Any, context: grpc.aio.ServicerContext, refuse: bool) -> None:
        if isinstance(request, Malformed):
            self.counts.malformed += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        if refuse and self.closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)

    async def _fail(self, method: str, context: grpc.aio.ServicerContext, e: BaseException) -> None:
        """Abort for an exception that escaped the handler (raises)."""
        if isinstance(e, asyncio.CancelledError):
            if not self.closing:
                raise e  # the client went away: nobody to answer
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        code, message = status.status_and_message(e)
        # A call that ended while its handler ran without yielding (the caller's deadline
        # passed, or it cancelled) cannot be answered: aborting it fails. When that failure is
        # all there is (the handler had refused the request properly), it is no bug.
        refused = context.done() and _refusal(e.__context__)
        if code == grpc.StatusCode.INTERNAL and not refused:
            self.counts.internal += 1
            log.error("%s failed: %s", method, e, exc_info=e)
            message = (
                f"internal error in {method.rsplit('/', 1)[-1]}: {message} (a bug: see the daemon's log)"
            )
        elif isinstance(e, OSError):  # (named as status.grpc_errors names it, for a handler without it)
            message = f"{method.rsplit('/', 1)[-1]}: {message}"
        if context.done():
            raise asyncio.CancelledError from None  # nobody to answer
        await context.abort(code, message)

    def _unary(
        self, method: str, behavior: Callable[..., Any], refuse: bool, m: MethodMetrics
    ) -> Callable[..., Any]:
        running = self._running
        observe, ok, ended = m.observe or _no_observe, m.ok, m.ended
        observe_ok = m.observe_ok if m.observe is not None else lambda seconds: ok()
        sets_code = not refuse  # health's Check answers NOT_FOUND by setting the code, not aborting
        current_task = asyncio.current_task

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            t0 = perf_counter()
            try:
                if self.closing or isinstance(request, Malformed):  # (tested first: every call runs this)
                    await self._check(request, context, refuse)
                task = current_task(self._loop) if refuse else None
                if task is not None:
                    running.add(task)
                try:
                    reply = await behavior(request, context)
                except grpc.aio.AbortError:
                    raise
                except (Exception, asyncio.CancelledError) as e:
                    await self._fail(method, context, e)
                finally:
                    if task is not None:
                        running.discard(task)
                        if not running and self._idle is not None:
                            self._idle.set()
            except BaseException as e:
                observe(perf_counter() - t0)
                ended(_code_of(e, context))
                raise
            if sets_code:
                observe(perf_counter() - t0)
                ended(context.code())
            else:
                observe_ok(perf_counter() - t0)
            return reply

        return call

    def _stream(
        self, method: str, behavior: Callable[..., Any], refuse: bool, m: MethodMetrics
    ) -> Callable[..., Any]:
        ok, ended = m.ok, m.ended
        sets_code = not refuse

        def done(context: grpc.aio.ServicerContext) -> None:
            if sets_code:
                ended(context.code())
            else:
                ok()

        if not inspect.isasyncgenfunction(behavior):  # writes with context.write (Health.Watch)

            async def run(request: Any, context: grpc.aio.ServicerContext) -> None:
                try:
                    await self._check(request, context, refuse)
                    try:
                        await behavior(request, context)
                    except grpc.aio.AbortError:
                        raise
                    except (Exception, asyncio.CancelledError) as e:
                        await self._fail(method, context, e)
                except BaseException as e:
                    ended(_code_of(e, context))
                    raise
                done(context)

            return run

        async def gen(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                await self._check(request, context, refuse)
                try:
                    async for reply in behavior(request, context):
                        yield reply
                except grpc.aio.AbortError:
                    raise
                except (Exception, asyncio.CancelledError) as e:
                    await self._fail(method, context, e)
            except BaseException as e:
                ended(_code_of(e, context))
                raise
            done(context)

        return gen


def _no_observe(seconds: float) -> None:
    """(streams are counted, not timed)"""


def _code_of(e: BaseException, context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The status a call that raised `e` out of the edge ends with."""
    if isinstance(e, grpc.aio.AbortError):
        return context.code() or grpc.StatusCode.UNKNOWN
    if isinstance(e, asyncio.CancelledError | GeneratorExit):  # the client went away (or its deadline)
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class _Methods(grpc.GenericRpcHandler):
    def __init__(self, methods: dict[str, grpc.RpcMethodHandler]) -> None:
        self._get = methods.get

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self._get(details.method)


def _checking_requests(behavior: Callable[..., Any]) -> Callable[..., Any]:
    """A request-streaming handler whose stream aborts at the first malformed message."""

    async def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            yield request

    if inspect.isasyncgenfunction(behavior):

        async def gen(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for reply in behavior(checked(requests, context), context):
                yield reply

        return gen

    async def run(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        return await behavior(checked(requests, context), context)

    return run


def _refusal(e: BaseException | None) -> bool:
    """Whether `e` is an error the caller is told about (not a bug)."""
    return e is not None and status.status_and_message(e)[0] != grpc.StatusCode.INTERNAL


def _guarded(
    deserializer: Callable[[bytes], Any] | None, scanned: bool = False
) -> Callable[[bytes], Any] | None:
    """A deserializer that never raises: bytes it cannot take become a `Malformed`.
    `scanned`: the usual shapes are read by request_scan, the rest parsed here."""
    if deserializer is None:
        return None
    cls = getattr(deserializer, "__self__", None)  # pb.X.FromString is bound to the class
    known = isinstance(cls, type) and issubclass(cls, Message)
    type_name = cls.DESCRIPTOR.full_name if known else "request"
    # The fields to check, found now for the type the deserializer builds (any other: per request).
    fields = _bounded_fields(cls.DESCRIPTOR) if known else None
    scan = request_scan.scanner(cls.DESCRIPTOR, UNBOUNDED_BYTES, MAX_STRING) if known and scanned else None

    def parse(data: bytes) -> Any:
        if scan is not None:
            request = scan(data)
            if request is not None:
                return request
        try:
            request = deserializer(data)
        except Exception as e:  # DecodeError, or any other reason the bytes cannot be taken
            return Malformed(f"the request is not a valid {type_name} ({len(data)} bytes): {_short(str(e))}")
        # (No field of a message is longer than the message: most requests skip the walk.)
        if len(data) > MAX_STRING and isinstance(request, Message):
            problem = too_long(request, "", fields if type(request) is cls else None)
            if problem:
                return Malformed(f"{type_name}.{problem}")
        return request

    return parse


def too_long(msg: Message, path: str = "", fields: tuple[tuple[str, int, bool], ...] | None = None) -> str:
    """The first string or bytes field over the edge's limit, described (never echoed), or "".
    `fields`: `_bounded_fields` of msg's type, when the caller has them at hand."""
    for name, kind, repeated in _bounded_fields(msg.DESCRIPTOR) if fields is None else fields:
        if kind == FieldDescriptor.TYPE_MESSAGE:
            if repeated:
                for i, item in enumerate(getattr(msg, name)):
                    problem = too_long(item, f"{path}{name}[{i}].")
                    if problem:
                        return problem
            elif msg.HasField(name):
                problem = too_long(getattr(msg, name), f"{path}{name}.")
                if problem:
                    return problem
            continue
        for item in getattr(msg, name) if repeated else (getattr(msg, name),):
            if len(item) > MAX_STRING:
                unit = "characters" if kind == FieldDescriptor.TYPE_STRING else "bytes"
                return f"{path}{name} has {len(item)} {unit}; the limit is {MAX_STRING}"
    return ""


@functools.cache
def _bounded_fields(descriptor: Descriptor) -> tuple[tuple[str, int, bool], ...]:
    """(name, type, repeated) of the fields `too_long` checks, in field number order (the
    order ListFields reports them): found once per message type, not walked per request."""
    kinds = (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES)
    return tuple(
        (f.name, f.type, bool(f.is_repeated))
        for f in sorted(descriptor.fields, key=lambda f: f.number)
        if f.type in kinds and f.name not in UNBOUNDED_BYTES
    )


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
