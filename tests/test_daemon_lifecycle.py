"""The daemon process from start to exit: readiness, cleanup on SIGTERM/SIGINT, restarts on
the same paths, leftovers of a kill -9, a second daemon on a live socket, garbage on the
socket. Every test runs a real daemon (tests/daemon.py) and waits on its health check."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import stat
from pathlib import Path

import grpc
import pytest
from daemon import SERVING, SMALL_NAMESPACE, DaemonError, DaemonProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc


def test_health_is_serving_for_every_service(daemon: DaemonProcess) -> None:
    for service in ("", "kvstore.v1.KVStore", "kvstore.v1.Admin"):
        assert daemon.health(service) == SERVING, service


def test_reflection_lists_the_services(daemon: DaemonProcess) -> None:
    with grpc.insecure_channel(daemon.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    names = {s.name for s in reply.list_services_response.service}
    assert {
        "kvstore.v1.KVStore",
        "kvstore.v1.Admin",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names


def test_socket_and_its_directory_are_private(daemon: DaemonProcess) -> None:
    assert stat.S_IMODE(os.stat(daemon.socket_path).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(daemon.socket_path).st_mode)


def pool_socket(d: DaemonProcess) -> Path:
    return d.socket_path.with_name(d.socket_path.name + ".pool")


def test_socket_directory_is_created_with_mode_0700(daemon_factory) -> None:
    d = daemon_factory()
    d.socket_path = d.dir / "run" / "kvstore" / "kvstore.sock"
    d.server["socket"] = str(d.socket_path)
    d.start()
    assert stat.S_IMODE(os.stat(d.socket_path.parent).st_mode) == 0o700


def test_a_socket_directory_shared_by_every_user_is_refused_and_left_as_it_was(daemon_factory) -> None:
    # Like /tmp (a directory of this test's, not /tmp itself): making it 0700 would lock every
    # other user out of it, and a root daemon did so with --socket /tmp/x.sock.
    d = daemon_factory()
    shared = d.dir / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    d.socket_path = shared / "kvstore.sock"
    d.server["socket"] = str(d.socket_path)
    d.start(wait=False)
    assert d.wait() != 0
    assert f"socket directory {shared} is shared by every user (mode 1777)" in d.stderr_text()
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o1777
    assert not d.socket_path.exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_removes_sockets_and_frees_pools_and_exits_0(daemon: DaemonProcess, sig: int) -> None:
    assert "created pool memfd" in daemon.stderr_text()
    assert daemon.socket_path.exists() and pool_socket(daemon).exists()

    daemon.signal(sig)
    assert daemon.wait() == 0, daemon.stderr_text()

    assert not daemon.socket_path.exists()
    assert daemon.shm_segments() == []
    assert sorted(p.name for p in daemon.dir.iterdir() if "sock" in p.name) == []  # lock, pool socket too
    log = daemon.stderr_text()
    assert "closed pool memfd" in log
    for step in (
        "health set to NOT_SERVING",
        "server stopped",
        "pool socket closed",
        "store closed",
        "socket",
    ):
        assert f"shutdown: {step}" in log, log


def test_restart_on_the_same_paths(daemon: DaemonProcess) -> None:
    first_pid = daemon.proc.pid
    assert daemon.terminate() == 0
    daemon.start()
    assert daemon.proc.pid != first_pid
    assert daemon.health() == SERVING
    assert daemon.terminate() == 0
    assert daemon.shm_segments() == []


def test_leftovers_of_kill_9_do_not_block_the_next_start(daemon: DaemonProcess) -> None:
    daemon.kill()
    # A killed daemon cleans nothing up: its socket files stay behind (its pools die with it).
    assert daemon.socket_path.exists() and pool_socket(daemon).exists()
    assert daemon.shm_segments() == []

    daemon.start()
    assert daemon.health() == SERVING
    assert "removed stale socket" in daemon.stderr_text()
    assert "removed stale pool socket" in daemon.stderr_text()


def test_second_daemon_on_a_live_socket_refuses_and_the_first_keeps_serving(
    daemon: DaemonProcess, daemon_factory
) -> None:
    # Not start(): its readiness check would reach the first daemon on the shared socket.
    second = daemon_factory(socket_path=daemon.socket_path).start(wait=False)
    assert second.wait() == 1
    err = second.stderr_text()
    assert f"another kvstore daemon (pid {daemon.proc.pid}) is serving on {daemon.socket_path}" in err
    assert second.shm_segments() == []  # it stopped before creating anything
    assert daemon.health() == SERVING
    assert daemon.socket_path.exists()


def test_a_foreign_listener_on_the_socket_path_is_not_replaced(daemon_factory) -> None:
    d = daemon_factory()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(d.socket_path))
        other.listen()
        d.start(wait=False)
        assert d.wait() == 1
        assert "another process is listening on" in d.stderr_text()
        assert d.socket_path.exists()


@pytest.mark.parametrize(
    "payload",
    [
        random.Random(0).randbytes(64 << 10),
        b"GET / HTTP/1.1\r\nHost: kvstore\r\n\r\n",
        # A valid HTTP/2 preface, then a frame that is not the SETTINGS frame the protocol requires.
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x10\xff\xff\xff\xff\xff\xff" + b"\xee" * 64,
        b"\x00",
    ],
    ids=["random", "http1", "bad-frame", "one-byte"],
)
def test_garbage_on_the_socket_is_hung_up_on_and_the_daemon_serves_on(
    daemon: DaemonProcess, payload: bytes
) -> None:
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # connects and never speaks
    idle.connect(str(daemon.socket_path))
    with idle, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(daemon.socket_path))
        # The daemon may hang up mid-send: that is a fine answer to garbage.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)
        assert _hung_up(sock), "the daemon should close a connection that is not HTTP/2"
        assert daemon.health() == SERVING  # while the idle connection is still open
    assert daemon.proc.poll() is None
    assert daemon.health() == SERVING
    assert daemon.terminate() == 0


def _hung_up(sock: socket.socket, timeout: float = 5.0) -> bool:
    """Read until the peer closes (True) or `timeout` passes with the connection open (False)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(1 << 16):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def test_tcp_listener(daemon_factory) -> None:
    d = daemon_factory(server={"tcp": "127.0.0.1:0", "tcp_insecure_no_auth": True}).start()
    # The port is known only to the daemon; it says it in its ready line.
    port = int(re.search(r"tcp port (\d+)", d.stderr_text()).group(1))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == SERVING


def test_invalid_config_exits_2_before_creating_anything(daemon_factory) -> None:
    d = daemon_factory(namespaces=[_small("a"), _small("a")])
    # The helper fails fast with the daemon's own words rather than waiting out its deadline.
    with pytest.raises(
        DaemonError, match=r"(?s)status 2 .*namespace\[1\].name='a': already used by namespace\[0\]"
    ):
        d.start()
    assert d.shm_segments() == []
    assert not d.socket_path.exists()


def test_several_namespaces_each_get_a_pool(daemon_factory) -> None:
    d = daemon_factory(namespaces=[_small("a"), _small("b")]).start()
    assert len(re.findall(r"created pool memfd \S+\.[ab] ", d.stderr_text())) == 2
    assert d.terminate() == 0
    assert len(re.findall(r"closed pool memfd \S+\.[ab]\n", d.stderr_text())) == 2
    assert d.shm_segments() == []


def _small(name: str) -> dict[str, object]:
    return SMALL_NAMESPACE | {"name": name}


def test_the_page_tables_built_at_start_are_frozen_out_of_the_cyclic_gc(daemon_factory) -> None:
    """Python's full collections walked the whole page table (up to 24.7 ms a collection with
    a 32,768-page pool, stalling every call): start freezes what it built, pages included."""

    def frozen(num_pages: int) -> int:
        d = daemon_factory(namespaces=[SMALL_NAMESPACE | {"num_pages": num_pages}]).start()
        found = re.search(r"froze (\d+) objects built at start", d.stderr_text())
        assert found, d.stderr_text()
        assert d.terminate() == 0
        return int(found.group(1))

    small, large = frozen(64), frozen(8192)
    # ~one object a page (the startup's other objects differ by a few between runs)
    assert large - small > 0.9 * (8192 - 64)
