"""Bearer tokens at the edge: every call but health and reflection presents a token
(`authorization: Bearer <token>` metadata) and needs the scopes kvstore/server/scopes.py
lists for its method, checked before the servicer runs (docs/security.md).

A missing or unknown token is UNAUTHENTICATED with the same words either way; a token
without the scope is PERMISSION_DENIED naming the namespace and the scope. The token itself
is never logged nor put in an error; the token's name (from the tokens file) is.

The edge (kvstore/server/edge.py) calls `Guard.wrap` on each method as it registers it, inside
its own wrapping (so a request that does not parse is INVALID_ARGUMENT before this runs, and a
bug here is INTERNAL, not UNKNOWN); a method without an entry in the table stops the daemon's
start instead of going unchecked.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from kvstore.caller import CALLER
from kvstore.server.scopes import RULES, SOME, Needs, Resolve, is_open
from kvstore.store.store import Store
from kvstore.tokens import ALL, READ, WRITE, Token, Tokens

log = logging.getLogger(__name__)

UNAUTHENTICATED = "a valid bearer token is required (metadata `authorization: Bearer <token>`)"
_OPEN_SESSION = "/kvstore.v1.KVStore/OpenSession"


class Guard:
    def __init__(self, tokens: Tokens, store: Store) -> None:
        self.tokens = tokens
        self.store = store
        self.owners: dict[int, str] = {}  # session id -> the name of the token that opened it

    def wrap(self, method: str, h: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`h` with the token checked first; raises for a method without a rule."""
        if is_open(method):
            return h
        resolve = RULES.get(method)
        if resolve is None:
            raise TypeError(f"{method} has no entry in kvstore/server/scopes.py RULES: say what it needs")
        if h.unary_unary is not None:
            return h._replace(unary_unary=self._unary(method, resolve, h.unary_unary))
        if h.unary_stream is not None and inspect.isasyncgenfunction(h.unary_stream):
            return h._replace(unary_stream=self._stream(method, resolve, h.unary_stream))
        raise TypeError(f"{method}: the guard checks unary requests only")

    def _unary(self, method: str, resolve: Resolve, behavior: Callable[..., Any]) -> Callable[..., Any]:
        opens = method == _OPEN_SESSION

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            token = await self.check(method, resolve, request, context)
            reply = await behavior(request, context)
            if opens:
                self._opened(reply.session_id, token)
            return reply

        return call

    def _stream(self, method: str, resolve: Resolve, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def gen(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await self.check(method, resolve, request, context)
            async for reply in behavior(request, context):
                yield reply

        return gen

    async def check(
        self, method: str, resolve: Resolve, request: Any, context: grpc.aio.ServicerContext
    ) -> Token:
        """The caller's token, once it may make this call; else aborts the call."""
        token = self._token(context)
        if token is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)
        denied = self.denied(method.rsplit("/", 1)[-1], token, resolve(request, self.store))
        if denied:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, denied)
        CALLER.set(token)  # (this call's task only) what its answers may reveal: kvstore/caller.py
        return token

    def _token(self, context: grpc.aio.ServicerContext) -> Token | None:
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str):
                scheme, _, secret = value.partition(" ")
                if scheme.lower() == "bearer" and secret:
                    return self.tokens.find(secret.strip())
        return None

    def denied(self, name: str, token: Token, needs: Needs) -> str:
        """Why `token` may not make this call, or ""."""
        for sid in needs.sessions:
            if sid in self.store.sessions and self.owners.get(sid) != token.name:
                return f"{name}: session {sid} was opened with another token; a session is only its token's"
        for scope, namespace in needs.grants:
            if namespace == SOME:
                if not token.has_anywhere(scope):
                    return f"{name} needs the {scope} scope; token {token.name!r} has it on no namespace"
            elif not token.allows(scope, namespace):
                where = "every namespace ('*')" if namespace == ALL else f"namespace {namespace!r}"
                return f"{name} needs the {scope} scope on {where}; token {token.name!r} does not have it"
        return ""

    def grant(self, context: grpc.aio.ServicerContext, namespace: str) -> tuple[str, bool] | None:
        """The pool access of the (already checked) caller on `namespace`, for its pool ticket
        (kvstore/server/pool_tickets.py): read-write with the write scope, read-only with read
        alone, None without either."""
        token = self._token(context)
        if token is None:
            return None
        if token.allows(WRITE, namespace):
            return token.name, True
        return (token.name, False) if token.allows(READ, namespace) else None

    def _opened(self, sid: int, token: Token) -> None:
        self.owners[sid] = token.name
        sessions = self.store.sessions
        if len(self.owners) > 2 * len(sessions) + 1024:  # forget ended sessions now and then
            self.owners = {s: name for s, name in self.owners.items() if s in sessions}
