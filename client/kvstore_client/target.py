"""Where the daemon listens, found the way the daemon itself chooses its socket.

Order, first that is set wins: an explicit target (an argument, `--target`) >
`$KVSTORE_SOCKET` > `socket` in the `[server]` table of the daemon's config file
(`$KVSTORE_CONFIG`, or a file named by the caller) > `$XDG_RUNTIME_DIR/kvstore/kvstore.sock` >
`/tmp/kvstore-<uid>/kvstore.sock`. A relative socket path is taken from the current
directory, as the daemon does.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping

SOCKET_ENV = "KVSTORE_SOCKET"
CONFIG_ENV = "KVSTORE_CONFIG"


class ConfigFileError(ValueError):
    """The daemon's config file could not be read for its socket; the message names the file."""


def config_socket(path: str) -> str | None:
    """`[server] socket` of the daemon's TOML config file at `path`; None when it sets none."""
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except OSError as e:
        raise ConfigFileError(f"config file {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigFileError(f"config file {path}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:  # (tomllib decodes the bytes first: TOML is UTF-8)
        raise ConfigFileError(
            f"config file {path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})"
        ) from None
    server = doc.get("server", {})
    socket = server.get("socket") if isinstance(server, dict) else None
    if socket is not None and not isinstance(socket, str):
        raise ConfigFileError(f"config file {path}: server.socket={socket!r}: must be a string")
    return socket or None


def default_socket_path(env: Mapping[str, str] | None = None, config_file: str | None = None) -> str:
    """The daemon's socket path when no target is given (the order is in this module's doc).
    `config_file` stands for `$KVSTORE_CONFIG`, as `kvstore serve --config` does."""
    env = os.environ if env is None else env
    path = env.get(SOCKET_ENV) or None
    config_file = config_file or env.get(CONFIG_ENV)
    if path is None and config_file:
        path = config_socket(config_file)
    if path is not None:
        return os.path.abspath(path.removeprefix("unix:"))
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
