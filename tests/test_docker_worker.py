"""docker/kv_worker.py (the image's stand-in worker, numpy only) against a real daemon on this
host, as `make docker-test` runs it in containers: one process writes prompts through the
pool, another reads them zero-copy and checks every byte, the daemon is killed (SIGKILL) and
started again, and a reader gets every page back from the disk tier, while a watching
process that read all along counts no wrong page. The containers themselves: docker/test.sh."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon import DaemonProcess

WORKER = Path(__file__).resolve().parent.parent / "docker" / "kv_worker.py"
NAMESPACE = {"name": "default", "num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "dtype": "float16",
             "page_tokens": 4, "num_pages": 64}  # fmt: skip
ARGS = ["--prompts", "3", "--tokens", "32"]  # 8 pages a prompt


def run_worker(d: DaemonProcess, *args: str) -> dict[str, Any]:
    env = os.environ | {"KVSTORE_SOCKET": str(d.socket_path)}
    r = subprocess.run(
        [sys.executable, str(WORKER), *args, *ARGS], env=env, capture_output=True, text=True, timeout=120
    )
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0, (report, r.stderr)
    return report


def test_worker_reads_right_bytes_across_a_daemon_kill(
    daemon_factory: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    disk = tmp_path / "disk"
    d = daemon_factory(
        namespaces=[NAMESPACE], server={"disk_tier_dir": str(disk), "write_through": True, "lease_ttl_s": 1.0}
    ).start()
    watcher = subprocess.Popen(
        [sys.executable, str(WORKER), "watch", *ARGS],
        env=os.environ | {"KVSTORE_SOCKET": str(d.socket_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stderr is not None
        assert "watch: started" in watcher.stderr.readline()
        wrote = run_worker(d, "write")
        assert wrote["sealed_pages"] == 3 * 8
        first = run_worker(d, "read", "--expect", "hit")
        assert (first["full_hits"], first["pages_checked"], first["wrong_pages"]) == (3, 24, 0)

        d.kill()
        d.start()
        again = run_worker(d, "read", "--expect", "hit")  # promoted from the re-indexed disk tier
        assert (again["full_hits"], again["pages_checked"], again["wrong_pages"]) == (3, 24, 0)
        # The watcher has met the restart once the new daemon logs its new session.
        deadline = time.monotonic() + 60
        while f"opened by 'worker-{watcher.pid}'" not in d.stderr_text():
            assert time.monotonic() < deadline and watcher.poll() is None, d.stderr_text()
            time.sleep(0.05)
    finally:
        watcher.send_signal(signal.SIGTERM)
        out, err = watcher.communicate(timeout=60)
    report = json.loads(out.strip().splitlines()[-1])
    assert report["wrong_pages"] == 0, err
    assert report["errors"] >= 1 and report["full_hits_since_error"] >= 1, (report, err)
