"""Where the daemon listens: the same default socket path the daemon uses."""

from __future__ import annotations

import os
from collections.abc import Mapping

SOCKET_ENV = "KVSTORE_SOCKET"


def default_socket_path(env: Mapping[str, str] | None = None) -> str:
    """`$KVSTORE_SOCKET`, else `$XDG_RUNTIME_DIR/kvstore/kvstore.sock`, else
    `/tmp/kvstore-<uid>/kvstore.sock`."""
    env = os.environ if env is None else env
    if env.get(SOCKET_ENV):
        return env[SOCKET_ENV].removeprefix("unix:")
    if env.get("XDG_RUNTIME_DIR"):
        return os.path.join(env["XDG_RUNTIME_DIR"], "kvstore", "kvstore.sock")
    return f"/tmp/kvstore-{os.getuid()}/kvstore.sock"


def default_target(env: Mapping[str, str] | None = None) -> str:
    """The gRPC target of the local daemon, e.g. `unix:/run/user/1000/kvstore/kvstore.sock`."""
    return "unix:" + default_socket_path(env)


def resolve_target(target: str | os.PathLike[str] | None) -> str:
    """None -> the default socket; a filesystem path -> `unix:<path>`; anything else
    (`host:port`, `unix:...`, `dns:///...`) is passed to gRPC unchanged."""
    if target is None:
        return default_target()
    target = os.fspath(target)
    if target.startswith(("/", "./", "../", "~")):
        return "unix:" + os.path.abspath(os.path.expanduser(target))
    return target
