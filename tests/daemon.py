"""A real kvstore daemon in a subprocess, for tests.

`DaemonProcess` writes a small TOML config into a private temp dir (socket there, one small
namespace, short lease, a shm prefix unique to this instance so daemons of parallel tests
never touch each other's segments), starts `python -m kvstore serve --config ...` and waits
until the gRPC health check says SERVING: no sleeps, and if the daemon exits first the error
carries its stderr. `start()` may be called again after the daemon stopped: same paths.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kvstore_client import wait_until_serving
from kvstore_client.errors import Unavailable

SERVING = health_pb2.HealthCheckResponse.SERVING
SHM_DIR = Path("/dev/shm")

# One page of this namespace is 2 layers x 2 x 4 tokens x 2 heads x 16 dims x 2 bytes = 1 KiB
# (a 4 KiB stride), so 64 pages make a 256 KiB pool: cheap to create in every test.
SMALL_NAMESPACE = {
    "name": "test",
    "num_layers": 2,
    "num_kv_heads": 2,
    "head_dim": 16,
    "dtype": "float16",
    "page_tokens": 4,
    "num_pages": 64,
}


class DaemonError(RuntimeError):
    """The daemon did not become ready (it exited, or the deadline passed)."""


def _short_tmp() -> str:
    # A unix socket path must fit in 107 bytes; pytest's tmp_path or a long $TMPDIR may not.
    tmp = tempfile.gettempdir()
    return tmp if len(tmp) <= 40 else "/tmp"


def to_toml(server: dict[str, Any], namespaces: list[dict[str, Any]]) -> str:
    """Enough TOML for a config: scalars only (a JSON string is a valid TOML basic string)."""

    def value(v: Any) -> str:
        return ("true" if v else "false") if isinstance(v, bool) else json.dumps(v)

    lines = ["[server]", *(f"{k} = {value(v)}" for k, v in server.items())]
    for ns in namespaces:
        lines += ["", "[[namespace]]", *(f"{k} = {value(v)}" for k, v in ns.items())]
    return "\n".join(lines) + "\n"


class DaemonProcess:
    def __init__(
        self,
        *,
        server: dict[str, Any] | None = None,
        namespaces: list[dict[str, Any]] | None = None,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        socket_path: Path | None = None,
        shm_prefix: str | None = None,
        wrapper: list[str] | None = None,
    ) -> None:
        """`server` and `namespaces` override the test defaults (server keys one by one, the
        namespace list as a whole); `env` and `args` go to the process as given; `wrapper`
        is a command the daemon runs under (e.g. setpriv)."""
        self.dir = Path(tempfile.mkdtemp(prefix="kvs-", dir=_short_tmp()))
        self.socket_path = socket_path or self.dir / "kvstore.sock"
        self.shm_prefix = shm_prefix or f"kvstest-{uuid.uuid4().hex[:12]}-"
        self.config_path = self.dir / "kvstore.toml"
        self.server = {
            "socket": str(self.socket_path),
            "shm_prefix": self.shm_prefix,
            "lease_ttl_s": 2.0,
            "shutdown_grace_s": 2.0,
            "log_level": "info",
        } | (server or {})
        self.namespaces = [SMALL_NAMESPACE] if namespaces is None else namespaces
        self.env = env or {}
        self.args = args or []
        self.wrapper = wrapper or []
        self.proc: subprocess.Popen[bytes] | None = None
        self._runs = 0  # each start gets its own stderr file

    @property
    def target(self) -> str:
        return f"unix:{self.socket_path}"

    @property
    def stderr_path(self) -> Path:
        return self.dir / f"stderr-{self._runs}.log"

    def start(self, *, wait: bool = True, timeout: float = 30.0) -> DaemonProcess:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.config_path.write_text(to_toml(self.server, self.namespaces))
        # A developer's own KVSTORE_* settings must not leak into a test's daemon.
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")} | self.env
        self._runs += 1
        # stderr goes to a file, not a pipe: a chatty daemon can never block on a full pipe.
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [
                    *self.wrapper,
                    sys.executable,
                    "-m",
                    "kvstore",
                    "serve",
                    "--config",
                    str(self.config_path),
                    *self.args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                env=env,
            )
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until health says SERVING; raise DaemonError with its stderr if it exits first.
        (It asks whoever serves the socket: with another live daemon on the same path, use
        start(wait=False) and wait() instead.)"""
        assert self.proc is not None
        proc = self.proc
        try:
            wait_until_serving(self.target, timeout, still_starting=lambda: proc.poll() is None)
        except Unavailable as e:
            if proc.poll() is not None:
                raise DaemonError(
                    f"daemon exited with status {proc.returncode} before it was ready; "
                    f"stderr:\n{self.stderr_text()}"
                ) from None
            raise DaemonError(f"{e.details}; stderr:\n{self.stderr_text()}") from None

    def health(self, service: str = "", timeout: float = 5.0) -> int:
        """The daemon's health status for `service` (a HealthCheckResponse.ServingStatus)."""
        with grpc.insecure_channel(self.target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        return reply.status

    def stderr_text(self) -> str:
        """What the current (or last) run wrote to stderr so far."""
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def shm_segments(self) -> list[str]:
        """Files under /dev/shm with this daemon's prefix: none ever (pools are memfds), but a
        daemon that made one anyway must not leave it behind."""
        return sorted(p.name for p in SHM_DIR.glob(f"{self.shm_prefix}*"))

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then the exit status."""
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> int:
        """SIGKILL, then reap: a zombie's pid would still look alive to the next daemon."""
        self.signal(signal.SIGKILL)
        return self.wait()

    def close(self) -> None:
        """Stop the daemon if it still runs and remove everything this helper made."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.terminate(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        for name in self.shm_segments():  # left by a killed run; our prefix is ours alone
            (SHM_DIR / name).unlink(missing_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
