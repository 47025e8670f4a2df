"""The checks of kvstore/config.py's table: each returns None when the value is fine, else the
phrase that follows "key=value: " in the error."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

from kvstore import tokens
from kvstore.policy import policy_names

U32_MAX = 2**32 - 1  # the wire carries geometry as uint32
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the terminating NUL

Check = Callable[[Any], "str | None"]


def in_range(lo: float, hi: float | None = None) -> Check:
    def check(v: Any) -> str | None:
        if v < lo or (hi is not None and v > hi):
            return f"must be >= {lo}" if hi is None else f"must be in {lo}..{hi}"
        return None

    return check


def positive(v: float) -> str | None:
    return None if v > 0 else "must be > 0"


def _matches(pattern: str) -> Check:
    regex = re.compile(pattern)
    return lambda v: None if regex.fullmatch(v) else f"must match {pattern}"


# gRPC core's GRPC_EXPERIMENTS syntax: comma-separated experiment names, each optionally negated.
check_grpc_experiments = _matches(r"(-?[a-z0-9_]+(,-?[a-z0-9_]+)*)?")
check_ns_name = _matches(r"[A-Za-z0-9_.-]{1,64}")
# The prefix becomes part of a memfd's name: no slashes, nothing a shell would trip on.
check_shm_prefix = _matches(r"[A-Za-z0-9_.-]{1,200}")


def check_socket_path(v: str) -> str | None:
    if not v:
        return "must not be empty"
    if len(os.fsencode(v)) > SUN_PATH_MAX - len(".pool"):
        return (
            f"must be at most {SUN_PATH_MAX - len('.pool')} bytes long (the unix socket path limit, less the "
            "pool socket's `.pool` beside it)"
        )
    return None


def check_host_port(v: str) -> str | None:
    if not v:
        return None  # off
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        return "must be HOST:PORT with PORT in 0..65535 (e.g. 127.0.0.1:50051), or empty for off"
    return None


def check_policy(v: str) -> str | None:
    return None if v in policy_names() else f"must be one of {', '.join(policy_names())}"


def check_salt(v: str) -> str | None:
    if v.startswith("hex:"):
        try:
            bytes.fromhex(v[4:])
        except ValueError:
            return "must be hex digits after 'hex:'"
    return None


def check_tokens_file(v: str) -> str | None:
    """Readable, private (no group or other bits) and well-formed: tokens.load says why not."""
    if not v:
        return None  # off
    try:
        tokens.load(v)
    except tokens.TokensFileError as e:
        return str(e)
    return None


def check_tls_file(v: str) -> str | None:
    if v and not os.access(v, os.R_OK):
        return "cannot be read (a PEM file)"
    return None


def listener_problems(s: Any) -> list[str]:
    """The listeners of a ServerConfig: TCP is reachable by more than this user, so it needs
    tokens unless explicitly left open; TLS keys come in pairs and only for TCP."""
    problems = []
    if s.tcp and not s.tokens_file and not s.tcp_insecure_no_auth:
        problems.append(
            f"server.tcp={s.tcp}: a TCP listener needs server.tokens_file (bearer tokens), or "
            "server.tcp_insecure_no_auth=true to serve it without any authentication"
        )
    if bool(s.tls_cert) != bool(s.tls_key):
        problems.append("server.tls_cert and server.tls_key: give both (TLS) or neither")
    if (s.tls_cert or s.tls_client_ca) and not s.tcp:
        problems.append("server.tls_*: TLS is for server.tcp, which is not set")
    if s.tls_client_ca and not s.tls_cert:
        problems.append(
            "server.tls_client_ca: client certificates need TLS (server.tls_cert, server.tls_key)"
        )
    return problems
