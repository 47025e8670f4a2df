"""What every benchmark shares: server processes it starts and stops, progress on stderr,
machine information, and small statistics.

A benchmark starts its own daemon (`BenchDaemon`): a child process with a private temp
directory (config file, unix socket, stderr log) and a /dev/shm prefix unique to this run,
so it never touches a daemon or segment of anyone else. Readiness is the gRPC health check
saying SERVING (no sleeps). `stop()` sends SIGTERM, waits, and checks that the daemon left
nothing under /dev/shm; whatever it left is removed and reported. The echo server of the
rpc benchmark (echo_server.py) is started the same way (`ChildServer`).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from kvstore_client import wait_until_serving
from kvstore_client.errors import Unavailable

SHM_DIR = Path("/dev/shm")
_T0 = time.monotonic()


class BenchError(RuntimeError):
    """A benchmark could not run (a server did not start, a setup step failed)."""


# ---------------------------------------------------------------- progress


def progress(message: str, *args: object) -> None:
    """One progress line on stderr (stdout carries only results)."""
    text = message % args if args else message
    print(f"[{time.monotonic() - _T0:7.2f}s] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- child servers


def _short_tmp() -> str:
    # A unix socket path must fit in 107 bytes; a long $TMPDIR may not leave room.
    tmp = tempfile.gettempdir()
    return tmp if len(tmp) <= 40 else "/tmp"


# Where the model is, not how the store behaves: a child loads the model the caller loads.
MODEL_ENV = ("KVSTORE_SMOLLM2_GGUF", "KVSTORE_MODEL_CACHE")


def clean_env() -> dict[str, str]:
    """The environment for a child: the caller's own KVSTORE_* settings must not leak in
    (those of MODEL_ENV do)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_") or k in MODEL_ENV}


class ChildServer:
    """A gRPC server in a child process, serving on a unix socket in its own temp dir.

    `argv` is its command line; `{socket}` in it is replaced by the socket path. The server
    must serve grpc.health.v1 and say SERVING when ready. Use as a context manager: started
    on enter (returns once SERVING), stopped with SIGTERM on exit, temp dir removed.
    """

    def __init__(self, name: str, argv: Sequence[str], *, workdir: Path | None = None) -> None:
        self.name = name
        self.dir = workdir or Path(tempfile.mkdtemp(prefix="kvsb-", dir=_short_tmp()))
        self.socket_path = self.dir / f"{name}.sock"
        self.argv = [a.replace("{socket}", str(self.socket_path)) for a in argv]
        self.stderr_path = self.dir / f"{name}.stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] = {}  # on top of clean_env(), set before start

    @property
    def target(self) -> str:
        return f"unix:{self.socket_path}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> ChildServer:
        progress("%s: starting %s", self.name, " ".join(self.argv[1:]))
        t0 = time.monotonic()
        # stderr goes to a file, not a pipe: a chatty server can never block on a full pipe.
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=clean_env() | self.env
            )
        self._wait_ready(timeout)
        progress("%s: SERVING after %.2fs (pid %d)", self.name, time.monotonic() - t0, self.pid)
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        proc = self.proc
        try:
            wait_until_serving(self.target, timeout, still_starting=lambda: proc.poll() is None)
        except Unavailable as e:
            if proc.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with status {proc.returncode} before it was ready; "
                    f"stderr:\n{self.stderr_tail()}"
                ) from None
            raise BenchError(f"{self.name}: {e.details}; stderr:\n{self.stderr_tail()}") from None

    def cpu_seconds(self) -> float:
        """User + system CPU time the child has used so far (all its threads)."""
        return proc_cpu_seconds(self.pid)

    def main_thread_cpu_seconds(self) -> float:
        """The same for the child's main thread only (where an asyncio server runs its loop;
        gRPC's own threads are the rest)."""
        return proc_cpu_seconds(self.pid, self.pid)

    def stderr_tail(self, lines: int = 40) -> str:
        if not self.stderr_path.exists():
            return ""
        return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait (SIGKILL if it does not stop in `timeout`); the exit status."""
        proc, self.proc = self.proc, None
        status = None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    status = proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    progress("%s: did not stop %gs after SIGTERM; killing it", self.name, timeout)
                    proc.kill()
                    status = proc.wait()
            else:
                status = proc.returncode
            if status != 0:
                progress("%s: exited with status %s; stderr:\n%s", self.name, status, self.stderr_tail())
            else:
                progress("%s: stopped", self.name)
        self._cleanup()
        return status

    def _cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> ChildServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


class BenchDaemon(ChildServer):
    """A kvstore daemon for a benchmark: `python -m kvstore serve --config <tmp>/kvstore.toml`
    with the given namespaces, a private socket and a /dev/shm prefix unique to this run."""

    def __init__(self, namespaces: list[dict[str, Any]], server: dict[str, Any] | None = None) -> None:
        workdir = Path(tempfile.mkdtemp(prefix="kvsb-", dir=_short_tmp()))
        self.config_path = workdir / "kvstore.toml"
        super().__init__(
            "daemon",
            [sys.executable, "-m", "kvstore", "serve", "--config", str(self.config_path)],
            workdir=workdir,
        )
        self.shm_prefix = f"kvsbench-{uuid.uuid4().hex[:12]}-"
        self.server = {
            "socket": str(self.socket_path),
            "shm_prefix": self.shm_prefix,
            "log_level": "warning",  # no per-request logging in the measured path
            "shutdown_grace_s": 2.0,
        } | (server or {})
        self.namespaces = namespaces

    def start(self, timeout: float = 120.0) -> BenchDaemon:
        self.config_path.write_text(to_toml(self.server, self.namespaces))
        super().start(timeout)
        return self

    def shm_segments(self) -> list[str]:
        return sorted(p.name for p in SHM_DIR.glob(f"{self.shm_prefix}*"))

    def _cleanup(self) -> None:
        left = self.shm_segments()
        if left:
            progress("daemon: left %d segment(s) in /dev/shm (%s); removing them", len(left), ", ".join(left))
            for name in left:
                (SHM_DIR / name).unlink(missing_ok=True)
        super()._cleanup()


def to_toml(server: dict[str, Any], namespaces: list[dict[str, Any]]) -> str:
    """Enough TOML for a config: scalars only (a JSON string is a valid TOML basic string)."""

    def value(v: Any) -> str:
        return ("true" if v else "false") if isinstance(v, bool) else json.dumps(v)

    lines = ["[server]", *(f"{k} = {value(v)}" for k, v in server.items())]
    for ns in namespaces:
        lines += ["", "[[namespace]]", *(f"{k} = {value(v)}" for k, v in ns.items())]
    return "\n".join(lines) + "\n"


def server_settings(items: Sequence[str], prog: str) -> dict[str, Any]:
    """`--set KEY=VALUE` items as [server] config keys: true / false as booleans, integers and
    floats as numbers, anything else (a size such as 64MiB, a path) as the string given."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"{prog}: --set {item!r}: give KEY=VALUE")
        out[key.strip()] = _setting(value.strip())
    return out


def _setting(value: str) -> Any:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def install_signal_exit() -> None:
    """Turn the first SIGTERM into SystemExit, so the `finally`/`with` blocks stop the children;
    later ones are ignored, or one landing during that cleanup (`timeout` signals the process
    and its group, make passes its own on) would cut it short and leave children behind."""
    stopping = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)


# ---------------------------------------------------------------- measurements


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int, tid: int = 0) -> float:
    """utime + stime of a process (or of its thread `tid`) from /proc (10 ms resolution)."""
    with open(f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat") as f:
        # The command name may contain spaces; fields after its closing paren are fixed.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def system_busy_seconds() -> float:
    """CPU seconds all CPUs spent busy since boot (user, nice, system, irq, softirq, steal),
    from /proc/stat. Minus what our own processes used over the same window, it is what
    other processes took: a benchmark on a shared machine reports it as contention."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def self_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in [0, 100])."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------- machine


def cpu_model() -> str:
    """`model name` from /proc/cpuinfo, with family/model/stepping (a VM often shows only
    the marketing family, e.g. "AMD EPYC")."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model", "stepping") and key not in info:
                    info[key] = value.strip()
                if not line.strip() and info:
                    break
    except OSError:
        return platform.processor() or "unknown"
    name = info.get("model name", "unknown")
    detail = ", ".join(f"{k} {info[k]}" for k in ("cpu family", "model", "stepping") if k in info)
    return f"{name} ({detail})" if detail else name


def machine_info(**extra: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
    }
    with open("/proc/loadavg") as f:
        info["loadavg_at_end"] = " ".join(f.read().split()[:3])
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists():
        info["transparent_hugepage"] = thp.read_text().strip()
    return info | extra


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def emit(result: dict[str, Any], as_json: bool, text: str) -> None:
    """Results on stdout: one JSON object, or the human-readable text."""
    if as_json:
        print(json.dumps(result, indent=2, sort_keys=False))
    else:
        print(text)
