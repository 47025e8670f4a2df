"""Another local user against the daemon (issue 19, "How it will be checked").

The daemon runs as this user; a second process runs as `nobody` (setpriv, all capabilities
and groups dropped) and tries every method of every service over the unix socket, the pool
socket and the lane socket beside it, and the daemon's /proc entries. Its socket directory is
made 0755 before the start, as a careless operator would, so the test covers the daemon's own
fix of it (0700), not just mkdtemp's default. Needs root to switch users: skipped with a reason otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from daemon import SERVING, DaemonProcess

NOBODY = 65534

PROBE = r"""
import json, os, socket, sys
import grpc
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

sock, pool_sock, pid, lane_sock = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
out = {"uid": os.getuid(), "calls": {}, "raw": {}}
channel = grpc.insecure_channel(f"unix:{sock}")
for service in pb.DESCRIPTOR.services_by_name.values():
    for m in service.methods:
        path = f"/{service.full_name}/{m.name}"
        # Empty requests: whatever the method, the call must not get past the socket.
        if m.server_streaming:
            call = channel.unary_stream(path, request_serializer=lambda b: b, response_deserializer=bytes)
            try:
                next(iter(call(b"", timeout=2)))
                out["calls"][path] = "OK"
            except grpc.RpcError as e:
                out["calls"][path] = e.code().name
        else:
            call = channel.unary_unary(path, request_serializer=lambda b: b, response_deserializer=bytes)
            try:
                call(b"", timeout=2)
                out["calls"][path] = "OK"
            except grpc.RpcError as e:
                out["calls"][path] = e.code().name
for name, path in (("socket", sock), ("pool_socket", pool_sock), ("lane_socket", lane_sock)):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        out["raw"][name] = "connected"
    except OSError as e:
        out["raw"][name] = type(e).__name__
    finally:
        s.close()
for name in ("fd", "mem", "maps"):
    try:
        if name == "fd":
            os.listdir(f"/proc/{pid}/fd")
        else:
            open(f"/proc/{pid}/{name}", "rb").read(1)
        out["raw"]["proc_" + name] = "opened"
    except OSError as e:
        out["raw"]["proc_" + name] = type(e).__name__
print(json.dumps(out))
"""


@pytest.fixture
def as_nobody() -> list[str]:
    if os.geteuid() != 0:
        pytest.skip(f"switching to another user needs root (this runs as uid {os.geteuid()})")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all"]


def test_another_user_reaches_no_method_no_pool_and_no_proc_entry(
    as_nobody, daemon_factory, tmp_path
) -> None:
    d: DaemonProcess = daemon_factory()
    d.dir.chmod(0o755)  # the careless operator: the daemon must make it private again
    d.start()
    assert stat.S_IMODE(d.dir.stat().st_mode) == 0o700
    pool_socket = Path(f"{d.socket_path}.pool")
    assert pool_socket.is_socket()
    lane_socket = Path(f"{d.socket_path}.lane")  # the put/get calls' plain socket (docs/api.md)
    assert lane_socket.is_socket()
    env = {k: v for k, v in os.environ.items() if k not in ("HOME", "KVSTORE_TOKEN")}
    proc = subprocess.run(
        [
            *as_nobody,
            sys.executable,
            "-c",
            PROBE,
            str(d.socket_path),
            str(pool_socket),
            str(d.proc.pid),
            str(lane_socket),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["uid"] == NOBODY
    assert len(out["calls"]) >= 30, out["calls"]  # every KVStore and Admin method
    assert set(out["calls"].values()) == {"UNAVAILABLE"}, out["calls"]
    assert out["raw"] == {
        "socket": "PermissionError",
        "pool_socket": "PermissionError",
        "lane_socket": "PermissionError",
        "proc_fd": "PermissionError",
        "proc_mem": "PermissionError",
        "proc_maps": "PermissionError",
    }
    # ...and the daemon serves on for its own user.
    assert d.health() == SERVING
    assert "Traceback" not in d.stderr_text()
