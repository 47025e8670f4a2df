"""The gRPC channel to the daemon: TLS when given a CA file, and the bearer token on every call
(streams included) when the daemon wants one (docs/security.md).

The token is the `token` argument, else `$KVSTORE_TOKEN`, else none (a daemon without a tokens
file, on its unix socket). TLS (`TLS`): the CA file that signed the daemon's certificate, and a
client certificate for a daemon that asks for one. It travels as `authorization: Bearer <token>` metadata, added by a
channel interceptor, so every stub and every call of the client carries it.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from ._core import channel_options
from .target import resolve_target

TOKEN_ENV = "KVSTORE_TOKEN"


@dataclass(frozen=True)
class TLS:
    """TLS to a daemon's TCP listener (server.tls_cert)."""

    ca: str  # PEM CA bundle that signed the daemon's certificate
    cert: str | None = None  # PEM certificate of this client, for a daemon with server.tls_client_ca
    key: str | None = None  # its private key

    def credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert) != bool(self.key):
            raise ValueError("give both a client certificate and its key, or neither")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca),
            private_key=_read(self.key) if self.key else None,
            certificate_chain=_read(self.cert) if self.cert else None,
        )


def bearer(token: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The token to send: `token`, else $KVSTORE_TOKEN, else "" (none)."""
    return (token if token is not None else (environ or os.environ).get(TOKEN_ENV, "")).strip()


def open_sync(
    target: str | os.PathLike[str] | None, keepalive_s: float, token: str | None, tls: TLS | None
) -> tuple[grpc.Channel, str]:
    """A channel to `target` (resolved: kvstore_client.target) and the resolved target."""
    resolved, options = resolve_target(target), channel_options(keepalive_s)
    channel = (
        grpc.secure_channel(resolved, tls.credentials(), options=options)
        if tls is not None
        else grpc.insecure_channel(resolved, options=options)
    )
    secret = bearer(token)
    return (grpc.intercept_channel(channel, _Bearer(secret)) if secret else channel), resolved


def open_aio(
    target: str | os.PathLike[str] | None, keepalive_s: float, token: str | None, tls: TLS | None
) -> tuple[grpc.aio.Channel, str]:
    resolved, options = resolve_target(target), channel_options(keepalive_s)
    secret = bearer(token)
    interceptors = list(_aio_bearer(secret)) if secret else None
    if tls is not None:
        channel = grpc.aio.secure_channel(
            resolved, tls.credentials(), options=options, interceptors=interceptors
        )
    else:
        channel = grpc.aio.insecure_channel(resolved, options=options, interceptors=interceptors)
    return channel, resolved


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _metadata(token: str, metadata: Any) -> list[tuple[str, str]]:
    return [*(metadata or ()), ("authorization", f"Bearer {token}")]


class _Details(
    collections.namedtuple(
        "_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class _Bearer(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, d: grpc.ClientCallDetails) -> _Details:
        return _Details(
            d.method,
            d.timeout,
            _metadata(self._token, d.metadata),
            d.credentials,
            getattr(d, "wait_for_ready", None),
            getattr(d, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def _aio_bearer(token: str) -> tuple[grpc.aio.ClientInterceptor, ...]:
    def details(d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return grpc.aio.ClientCallDetails(
            d.method,
            d.timeout,
            grpc.aio.Metadata(*_metadata(token, d.metadata)),
            d.credentials,
            d.wait_for_ready,
        )

    class UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation: Any, d: Any, request: Any) -> Any:
            return await continuation(details(d), request)

    class UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation: Any, d: Any, request: Any) -> Any:
            return await continuation(details(d), request)

    class StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(self, continuation: Any, d: Any, requests: Any) -> Any:
            return await continuation(details(d), requests)

    class StreamStream(grpc.aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(self, continuation: Any, d: Any, requests: Any) -> Any:
            return await continuation(details(d), requests)

    return (UnaryUnary(), UnaryStream(), StreamUnary(), StreamStream())
