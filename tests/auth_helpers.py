"""Tokens files, certificates and raw calls of every RPC method, for the authentication tests."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from daemon import SMALL_NAMESPACE
from google.protobuf import message_factory
from google.protobuf.message import Message
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

WRITER = "writer-secret-0123456789"  # rw on "a"
READER = "reader-secret-0123456789"  # read on "a"
ALICE = "alice-secret-0123456789"  # rw on "a"
BOB = "bob-secret-0123456789-bob"  # rw on "b"
ADMIN = "admin-secret-0123456789"  # everything on "*"
TOKENS = {
    "writer": (WRITER, {"a": ["read", "write"]}),
    "reader": (READER, {"a": ["read"]}),
    "alice": (ALICE, {"a": ["read", "write"]}),
    "bob": (BOB, {"b": ["read", "write"]}),
    "admin": (ADMIN, {"*": ["read", "write", "admin"]}),
}
NAMESPACES = [SMALL_NAMESPACE | {"name": "a"}, SMALL_NAMESPACE | {"name": "b"}]


def write_tokens(path: Path, tokens: dict[str, tuple[str, dict[str, list[str]]]], mode: int = 0o600) -> str:
    lines = []
    for name, (secret, scopes) in tokens.items():
        grants = ", ".join(f'"{ns}" = {list(s)!r}'.replace("'", '"') for ns, s in scopes.items())
        lines += ["[[token]]", f'name = "{name}"', f'token = "{secret}"', f"scopes = {{ {grants} }}", ""]
    path.write_text("\n".join(lines))
    path.chmod(mode)
    return str(path)


def tcp_port(stderr: str) -> int:
    return int(re.search(r"tcp port (\d+)", stderr).group(1))


def make_certs(d: Path) -> dict[str, str]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate (openssl CLI)."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run(
        "req",
        "-x509",
        *ec,
        "-keyout",
        f"{d}/ca.key",
        "-out",
        f"{d}/ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
    )
    for name, ext in (
        ("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        (d / f"{name}.ext").write_text(ext + "\n")
        run("req", *ec, "-keyout", f"{d}/{name}.key", "-out", f"{d}/{name}.csr", "-subj", f"/CN={name}")
        run(
            "x509", "-req", "-in", f"{d}/{name}.csr", "-CA", f"{d}/ca.pem", "-CAkey", f"{d}/ca.key",
            "-CAcreateserial", "-out", f"{d}/{name}.pem", "-days", "2", "-extfile", f"{d}/{name}.ext",
        )  # fmt: skip
    return {k: str(d / k) for k in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def every_method() -> Iterator[tuple[str, type[Message], bool]]:
    """(path, request class, server-streaming) of every method of the kvstore services."""
    for service in pb.DESCRIPTOR.services_by_name.values():
        for m in service.methods:
            yield (
                f"/{service.full_name}/{m.name}",
                message_factory.GetMessageClass(m.input_type),
                m.server_streaming,
            )


def call(
    channel: grpc.Channel,
    path: str,
    request: Message,
    token: str | None,
    streams: bool = False,
    header: str | None = None,
) -> tuple[grpc.StatusCode, str]:
    """(status, details) of one raw call (`header`: the whole authorization value instead of
    `Bearer <token>`); OK and "" when it succeeded."""
    value = header if header is not None else f"Bearer {token}" if token is not None else None
    metadata = (("authorization", value),) if value is not None else None
    kw: dict[str, Any] = {"request_serializer": type(request).SerializeToString}
    try:
        if streams:
            stream = channel.unary_stream(path, **kw)(request, metadata=metadata, timeout=10)
            try:
                next(stream)
            finally:
                stream.cancel()
        else:
            channel.unary_unary(path, **kw)(request, metadata=metadata, timeout=10)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""
