"""What guards the daemon's listeners: the bearer tokens of every call (kvstore/server/auth.py)
and TLS on the TCP one (docs/security.md)."""

from __future__ import annotations

import logging

import grpc

from kvstore.config import ServerConfig
from kvstore.errors import StartupError
from kvstore.server.auth import Guard
from kvstore.store.store import Store
from kvstore.tokens import TokensFileError, load

log = logging.getLogger(__name__)


def guard_for(s: ServerConfig, store: Store) -> Guard | None:
    """The edge's token check (`.wrap`; its `.tokens` guard the metrics too), when the daemon
    has a tokens file."""
    if not s.tokens_file:
        log.info(
            "no server.tokens_file: calls on the unix socket need no token (its mode 0600 is the boundary)"
        )
        return None
    try:
        tokens = load(s.tokens_file)  # checked at config time too; read again as the daemon starts
    except TokensFileError as e:
        raise StartupError(str(e), exit_code=2) from e
    log.info("bearer tokens required on every listener: %d token(s) from %s", len(tokens), s.tokens_file)
    return Guard(tokens, store)


def bind_tcp(server: grpc.aio.Server, s: ServerConfig) -> int:
    """Listen on server.tcp (TLS when configured); returns the bound port."""
    try:
        port = server.add_secure_port(s.tcp, _tls(s)) if s.tls_cert else server.add_insecure_port(s.tcp)
    except RuntimeError as e:
        raise StartupError(f"cannot listen on tcp {s.tcp}: {e}") from e
    if not port:  # older grpc reports a failed bind as port 0
        raise StartupError(f"cannot listen on tcp {s.tcp} (address in use?)")
    tls = "TLS" + (" with client certificates" if s.tls_client_ca else "") if s.tls_cert else "no TLS"
    auth = "bearer tokens" if s.tokens_file else "NO AUTHENTICATION"
    log.info("also serving on tcp %s (port %d): %s, %s", s.tcp, port, tls, auth)
    if not s.tokens_file:
        log.warning(
            "server.tcp_insecure_no_auth=true: ANYONE WHO CAN REACH tcp %s (port %d) CAN READ, WRITE, EVICT "
            "AND DELETE EVERY NAMESPACE; set server.tokens_file",
            s.tcp,
            port,
        )
    elif not s.tls_cert:
        log.warning(
            "tcp %s has no TLS: tokens and KV cross the network in the clear (server.tls_cert)", s.tcp
        )
    return port


def _tls(s: ServerConfig) -> grpc.ServerCredentials:
    try:
        key, cert = _read(s.tls_key), _read(s.tls_cert)
        ca = _read(s.tls_client_ca) if s.tls_client_ca else None
    except OSError as e:
        raise StartupError(f"cannot read a TLS file: {e}") from e
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()
