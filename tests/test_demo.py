"""The demo (examples/demo.py, what `make run` runs) end to end: it starts the real daemon itself (default config), runs its two
processes, and leaves nothing behind: no socket, no lock file, nothing in /dev/shm. Each run
gets its own socket directory and shm prefix (KVSTORE_SHM_PREFIX), so the leftover checks
see only this run's files."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import kvstore_client
import pytest
from daemon import SERVING, DaemonProcess

SHM_DIR = Path("/dev/shm")
READ_LINE = re.compile(
    r"^B \(pid (\d+)\): hit ([\d,]+) of ([\d,]+) tokens \((\d+) pages\) written by pid (\d+), "
    r"read zero-copy, bytes match$",
    re.M,
)


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _demo_argv() -> list[str]:
    return [sys.executable, str(EXAMPLES / "demo.py")]


@dataclass
class Run:
    dir: Path
    shm_prefix: str

    @property
    def socket(self) -> Path:
        return self.dir / "s.sock"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
        return env | {"KVSTORE_SHM_PREFIX": self.shm_prefix}

    def argv(self, *args: str) -> list[str]:
        return [*_demo_argv(), "--socket", str(self.socket), *args]

    def demo(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        """Run the demo to its end. It starts a daemon of its own, in a process group of its
        own: on a timeout the demo gets SIGINT (it stops its daemon), and whatever still runs
        on this run's socket is killed, so a slow run leaves no daemon behind."""
        proc = subprocess.Popen(
            self.argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env()
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
            self.kill_daemons()
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def kill_daemons(self) -> None:
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if str(self.socket).encode() in cmdline.read_bytes():
                    os.kill(int(cmdline.parent.name), signal.SIGKILL)
            except (OSError, ValueError):
                pass  # gone meanwhile

    def segments(self) -> list[str]:
        return sorted(p.name for p in SHM_DIR.glob(f"{self.shm_prefix}*"))

    def assert_nothing_left(self) -> None:
        assert sorted(p.name for p in self.dir.iterdir()) == []  # socket and its lock file
        assert self.segments() == []


@pytest.fixture
def run() -> Iterator[Run]:
    # A short directory: a unix socket path must fit in 107 bytes.
    r = Run(Path(tempfile.mkdtemp(prefix="kvdemo-", dir="/tmp")), f"kvdemotest-{uuid.uuid4().hex[:12]}-")
    yield r
    for name in r.segments():  # only after a failure: our prefix is ours alone
        (SHM_DIR / name).unlink(missing_ok=True)
    shutil.rmtree(r.dir, ignore_errors=True)


def _pids(out: str) -> tuple[int, int, int]:
    """(daemon pid, A's pid, B's pid) as the demo reports them."""
    daemon = re.search(r"^daemon: started `.*` \(pid (\d+)\)$", out, re.M)
    a = re.search(r"^A \(pid (\d+)\): wrote the KV of 2,000 tokens", out, re.M)
    b = READ_LINE.search(out)
    assert daemon and a and b, out
    assert b.group(5) == a.group(1), "B names A as the writer"
    return int(daemon.group(1)), int(a.group(1)), int(b.group(1))


@pytest.mark.slow
def test_demo_no_serve_shares_kv_between_two_processes_and_cleans_up(run: Run) -> None:
    proc = run.demo("--no-serve", "--plain", timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{proc.stderr}"

    daemon_pid, a_pid, b_pid = _pids(out)
    assert len({daemon_pid, a_pid, b_pid}) == 3, "daemon, A and B are three processes"
    hit = READ_LINE.search(out)
    assert hit is not None
    assert hit.group(2, 3, 4) == ("2,000", "2,037", "125")  # every full page of A's prompt
    assert re.search(r"125 pages CACHED \(A's slots", out), out
    assert re.search(r"in a cpu pool \(epoch [0-9a-f]{16}, handed out by the daemon\)", out), out
    # The admin stats table, with what A and B did in it.
    assert "namespace default" in out
    assert re.search(r"pages +2,048 total: 1,921 free, 0 reserved, 127 sealed", out), out
    assert "daemon: stopped (exit status 0)" in out
    assert "Traceback" not in proc.stderr
    run.assert_nothing_left()


class ServingDemo:
    """`examples/demo.py --plain` (what `make run` runs, without the model) started and read
    until it serves; its output lines as they come, its stderr (and its daemon's) in `err`."""

    def __init__(self, run: Run, err: IO[str]) -> None:
        self.run = run
        self.err = err  # (a file: a pipe nobody reads could fill and stall the daemon)
        self.proc = subprocess.Popen(
            run.argv("--plain"), stdout=subprocess.PIPE, stderr=err, text=True, env=run.env()
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_serving(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not (self.seen and "press Ctrl-C to stop" in self.seen[-1]):
            line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            assert line is not None, "the demo exited before serving:\n" + "".join(self.seen)
            self.seen.append(line)
        assert self.seen[-1] == f"daemon serving on unix:{self.run.socket} — press Ctrl-C to stop\n"
        assert self.run.socket.exists() and self.run.segments() == []  # pools are memfds

    def output(self) -> str:
        """All it printed, once it has exited."""
        while (line := self.lines.get(timeout=10)) is not None:
            self.seen.append(line)
        return "".join(self.seen)

    def errors(self) -> str:
        self.err.seek(0)
        return self.err.read()


@contextlib.contextmanager
def serving_demo(run: Run) -> Iterator[ServingDemo]:
    with tempfile.TemporaryFile("w+") as err:
        demo = ServingDemo(run, err)
        try:
            yield demo
        finally:
            if demo.proc.poll() is None:
                demo.proc.terminate()  # the demo stops its daemon on SIGTERM too
                demo.proc.wait(timeout=60)
            run.kill_daemons()  # (only after a failure: a daemon the demo left behind)


@pytest.mark.slow
def test_sigint_stops_a_serving_demo_cleanly(run: Run) -> None:
    with serving_demo(run) as demo:
        demo.wait_serving()
        demo.proc.send_signal(signal.SIGINT)
        # The demo gives its daemon STOP_TIMEOUT_S (30 s) before a SIGKILL; on a loaded 2-core
        # machine (load ~10) the whole exit once took over 60 s, so the bound leaves room for both.
        assert demo.proc.wait(timeout=120) == 0, demo.errors()
    out = demo.output()
    _pids(out)
    assert out.endswith("daemon: stopped (exit status 0)\n"), out
    run.assert_nothing_left()


@pytest.mark.slow
def test_a_burst_of_sigterms_still_stops_the_daemon_in_order(run: Run) -> None:
    """`timeout make run` signals make and its process group, and make passes its own SIGTERM
    on: the demo gets several at once. One that landed while the first was being handled
    killed the demo with a traceback and left its daemon serving (its own process group)."""
    with serving_demo(run) as demo:
        demo.wait_serving()
        daemon_pid = _pids("".join(demo.seen))[0]
        # SIGTERMs back to back until the demo says it is stopping its daemon (by then it ignores
        # them) or exits: the first may reach another of its threads and wait for the main one.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and demo.proc.poll() is None:
            os.kill(demo.proc.pid, signal.SIGTERM)
            with contextlib.suppress(queue.Empty):
                line = demo.lines.get_nowait()
                if line is None:
                    demo.lines.put(None)  # (for output())
                    break
                demo.seen.append(line)
                if line.startswith("daemon: stopping"):
                    break
        assert demo.proc.wait(timeout=120) == 0, demo.errors()
        errors = demo.errors()
    out = demo.output()
    assert "Traceback" not in errors, errors
    assert out.endswith("daemon: stopped (exit status 0)\n"), out
    assert not Path(f"/proc/{daemon_pid}").exists()  # (stopped, and reaped by the demo)
    run.assert_nothing_left()


@pytest.mark.slow
def test_demo_uses_a_daemon_that_is_already_serving(daemon: DaemonProcess) -> None:
    # The test daemon's namespace is small (64 pages of 4 tokens): a shorter prompt fits.
    argv = [*_demo_argv(), "--no-serve", "--plain", "--socket", str(daemon.socket_path)]
    argv += ["--tokens", "100", "--question-tokens", "10"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert f"daemon: one is already serving on {daemon.target}; using it" in proc.stdout
    assert "daemon: started" not in proc.stdout and "daemon: stop" not in proc.stdout
    hit = READ_LINE.search(proc.stdout)
    assert hit is not None, proc.stdout
    assert hit.group(2, 3, 4) == ("100", "110", "25")
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert daemon.health() == SERVING


MODEL_ANSWER = re.compile(
    r"^B \(pid (\d+)\):   hit ([\d,]+) of ([\d,]+) tokens written by pid (\d+): prefilled only ([\d,]+) tokens",
    re.M,
)


@pytest.mark.slow
def test_model_demo_answers_from_the_cache_like_the_model_alone(run: Run) -> None:
    """`examples/demo.py --model`: A reads the document with SmolLM2, B's questions hit A's pages
    and B's greedy answers are the model alone's tokens (~50 s on 2 cores)."""
    from kvstore_client import hf

    if (missing := hf.smollm2_missing()) is not None:
        pytest.skip(f"the model demo needs the `model` extra: {missing}")
    proc = run.demo("--no-serve", "--model", timeout=280)
    out = proc.stdout
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{proc.stderr}"
    a = re.search(r"^A \(pid (\d+)\): read a ([\d,]+)-token document", out, re.M)
    assert a is not None, out
    answers = MODEL_ANSWER.findall(out)
    assert len(answers) == 2, out
    for b_pid, hit, total, writer, computed in answers:
        assert b_pid != a.group(1) and writer == a.group(1)
        assert int(hit.replace(",", "")) > 0
        assert int(hit.replace(",", "")) + int(computed.replace(",", "")) == int(total.replace(",", ""))
    assert out.count("same tokens as the model alone: yes") == 2, out
    assert "namespace smollm2-135m" in out and "daemon: stopped (exit status 0)" in out
    assert "Traceback" not in proc.stderr
    run.assert_nothing_left()


def test_demo_with_a_bad_config_exits_2(run: Run) -> None:
    config = run.dir / "bad.toml"
    config.write_text("[server]\nlease_ttl_s = -1\n")
    proc = run.demo("--no-serve", "--plain", "--config", str(config), timeout=60)
    assert proc.returncode == 2
    assert "config error: server.lease_ttl_s=-1" in proc.stderr and "Traceback" not in proc.stderr
    config.unlink()
    run.assert_nothing_left()


def _worker(daemon: DaemonProcess, role: str, *args: str) -> dict:
    argv = [sys.executable, str(EXAMPLES / "demo_worker.py"), role, "--target", daemon.target]
    argv += ["--namespace", "test", "--tokens", "40", "--seed", "5", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_reader_detects_bytes_that_differ_from_what_the_writer_wrote(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    # The scrubber off: it would drop the page corrupted below (tests/test_e2e_integrity.py);
    # this test is about the reader's own digest check, the last line of defence.
    daemon = daemon_factory(server={"scrub_bytes_per_s": 0}).start()
    a = _worker(daemon, "write")
    assert (a["writable_pages"], a["sealed_pages"]) == (10, 10)
    reader = ("--question-tokens", "3", "--writer-pid", str(a["pid"]), "--writer-digest", a["digest"])
    b = _worker(daemon, "read", *reader)
    assert b["pid"] != a["pid"]
    assert (b["hit_tokens"], b["zero_copy"], b["digest_matches_writer"], b["matches_recomputed"]) == (
        40,
        True,
        True,
        True,
    )
    assert b["cached_slots_are_writers"] and b["slots"] == a["slots"]

    # Corrupt one element of A's last page behind the daemon's back: B must notice.
    with kvstore_client.connect(daemon.target) as kv:
        kv.namespace("test").page(a["slots"][-1])[1, 1, 3, 1, 15] += 1
    b = _worker(daemon, "read", *reader)
    assert b["hit_tokens"] == 40
    assert (b["digest_matches_writer"], b["matches_recomputed"]) == (False, False)
