"""The daemon's edge, end to end: malformed and over-long requests, shutdown as every caller
sees it, the socket directory, leases across a stalled daemon, and keepalive pings."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import threading
import time

import grpc
import kvstore_client
import pytest
from daemon import SERVING, DaemonProcess
from e2e_helpers import Raw, assert_status, prompt
from kvstore_client.errors import DeadlineExceeded, KVStoreClientError, ShuttingDown, Unavailable
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

Code = grpc.StatusCode


def test_malformed_bytes_get_invalid_argument_naming_the_message_type(daemon: DaemonProcess) -> None:
    with grpc.insecure_channel(daemon.target) as channel:
        for service in pb.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                if method.server_streaming:
                    continue
                call = channel.unary_unary(f"/{service.full_name}/{method.name}")
                with pytest.raises(grpc.RpcError) as e:
                    call(b"\x0a\xff\xff\xff\xff\x0f", timeout=5)  # a length past the end
                assert_status(e.value, Code.INVALID_ARGUMENT, f"not a valid {method.input_type.full_name}")
        stream = channel.unary_stream("/kvstore.v1.KVStore/KeepAlive")(b"\x08" + b"\xff" * 11, timeout=5)
        with pytest.raises(grpc.RpcError) as e:
            next(stream)
        assert_status(e.value, Code.INVALID_ARGUMENT, "not a valid kvstore.v1.KeepAliveRequest")
        assert daemon.health() == SERVING
        stats = pb.StatsResponse.FromString(channel.unary_unary("/kvstore.v1.KVStore/Stats")(b"", timeout=5))
        assert stats.malformed_requests >= 20 and stats.internal_errors == 0


def test_long_strings_are_refused_by_length_and_never_echoed(daemon: DaemonProcess) -> None:
    name = "n" * 16384
    with Raw(daemon.target) as raw:
        err = raw.error("GetNamespace", pb.GetNamespaceRequest(namespace=name))
        details = assert_status(
            err, Code.INVALID_ARGUMENT, "GetNamespaceRequest.namespace has 16384 characters"
        )
        assert len(details) < 300 and "nnnnnnnn" not in details
        spec = pb.NamespaceSpec(name="ok", salt=b"s" * 5000)
        err = raw.error("CreateNamespace", pb.CreateNamespaceRequest(spec=spec), service="admin")
        assert_status(err, Code.INVALID_ARGUMENT, "spec.salt has 5000 bytes; the limit is 256")
        err = raw.error("OpenSession", pb.OpenSessionRequest(client_name="c" * 1000))
        assert_status(err, Code.INVALID_ARGUMENT, "client_name has 1000 characters")
        err = raw.error("Lookup", pb.LookupRequest(namespace="test", token_ids=[1, -1]))
        assert_status(err, Code.INVALID_ARGUMENT, "token_ids[1]=-1", ">= 0 and <= 2147483647")
        hit = raw.kv.Lookup(pb.LookupRequest(namespace="test", token_ids=[2**31 - 1] * 8), timeout=5)
        assert hit.hit_tokens == 0  # the largest int32 is a valid id, as the message says


def test_existing_socket_directory_others_can_write_is_made_private(daemon_factory) -> None:
    d = daemon_factory()
    d.socket_path.parent.mkdir(exist_ok=True)
    os.chmod(d.socket_path.parent, 0o777)
    d.start()
    assert stat.S_IMODE(os.stat(d.socket_path.parent).st_mode) == 0o700
    assert "had mode 777; setting 0700" in d.stderr_text()


def test_sigterm_with_busy_clients_gives_every_caller_shutting_down(daemon_factory) -> None:
    d = daemon_factory(server={"shutdown_grace_s": 1.0}).start()
    errors: list[BaseException] = []
    started = threading.Barrier(5)

    def busy(i: int) -> None:
        kv = kvstore_client.connect(d.target, client_name=f"busy-{i}", timeout_s=10)
        tokens = prompt(32, seed=i, vocab=1000)
        started.wait()
        try:
            while True:
                with kv.allocate("test") as seq:
                    seq.append(tokens)
                    seq.commit()
                kv.lookup("test", tokens)
        except KVStoreClientError as e:
            errors.append(e)
        finally:
            kv.close()

    threads = [threading.Thread(target=busy, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    started.wait()
    d.signal(signal.SIGTERM)
    for t in threads:
        t.join(30)
    assert d.wait() == 0, d.stderr_text()
    assert len(errors) == 4
    for e in errors:
        assert isinstance(e, ShuttingDown) and isinstance(e, Unavailable), repr(e)
        assert e.code == Code.UNAVAILABLE and "daemon shutting down" in e.details, repr(e)


def test_a_stalled_daemon_does_not_expire_leases_that_were_renewed(daemon: DaemonProcess) -> None:
    """The daemon stands still (SIGSTOP) for longer than the lease; the client's last heartbeat
    came before, its next one once the daemon runs again. The reaper wakes late and must count
    the stall as no one's time (it may miss up to one of its 0.5 s intervals of it)."""
    with Raw(daemon.target) as raw:
        sid = raw.kv.OpenSession(
            pb.OpenSessionRequest(client_name="hb", lease_ttl_ms=2000), timeout=5
        ).session_id
        raw.kv.Heartbeat(pb.HeartbeatRequest(session_id=sid), timeout=5)
        daemon.signal(signal.SIGSTOP)
        try:
            time.sleep(3.0)  # the stall itself, not a wait for a condition
        finally:
            daemon.signal(signal.SIGCONT)
        # Let the reaper make a full pass (every 0.5 s with the tests' 2 s lease) before the
        # heartbeat: before the fix it ended the session then.
        raw.kv.Stats(pb.StatsRequest(), timeout=5)
        time.sleep(0.6)
        raw.kv.Heartbeat(pb.HeartbeatRequest(session_id=sid), timeout=5)
        assert sid in {
            s.session_id for s in raw.admin.ListSessions(pb.ListSessionsRequest(), timeout=5).sessions
        }
    assert "stood still for" in daemon.stderr_text()


def test_a_stopped_daemon_fails_calls_by_deadline_and_by_keepalive(daemon: DaemonProcess) -> None:
    with (
        kvstore_client.connect(daemon.target, timeout_s=1.0) as timed,
        kvstore_client.connect(daemon.target, timeout_s=None, keepalive_s=5.0) as untimed,
    ):
        daemon.signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                timed.lookup("test", [1, 2, 3, 4])
            assert time.monotonic() - t0 < 3
            t0 = time.monotonic()
            with pytest.raises(Unavailable):
                untimed.lookup("test", [1, 2, 3, 4])
            assert time.monotonic() - t0 < 5 + 5 + 2  # one ping interval, its timeout, slack
        finally:
            daemon.signal(signal.SIGCONT)


def test_keepalive_pings_of_an_idle_client_are_accepted(daemon: DaemonProcess) -> None:
    """A client with no call under way (say one that renews its lease with Heartbeat) pings
    every 5 s, the least the daemon accepts; before the fix the daemon's limit was the 5 min
    default (its option was misspelled) and the third ping drew GOAWAY "too_many_pings"
    at 15 s. Waits 16 s: an event that must not happen has no condition to wait on."""
    options = [
        ("grpc.keepalive_time_ms", 5000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    with grpc.insecure_channel(daemon.target, options=options) as channel:
        states: list[grpc.ChannelConnectivity] = []
        channel.subscribe(states.append)
        channel.unary_unary("/kvstore.v1.KVStore/Stats")(b"", timeout=5)
        time.sleep(16)
        seen = list(states)  # (closing the channel may add states of its own)
    # Subscriptions are delivered on grpc's own thread, possibly after the call returned (CI
    # once saw [IDLE] then): look for the first READY in the whole history. A GOAWAY (the
    # defect) adds states after it.
    ready = grpc.ChannelConnectivity.READY
    assert ready in seen and seen[seen.index(ready) :] == [ready], seen


def test_sigterm_gives_the_asyncio_client_shutting_down_too(daemon_factory) -> None:
    d = daemon_factory(server={"shutdown_grace_s": 1.0}).start()

    async def busy() -> BaseException:
        async with kvstore_client.aio.connect(d.target, client_name="busy-aio", timeout_s=10) as kv:
            tokens = prompt(32, seed=9, vocab=1000)
            d.signal(signal.SIGTERM)  # while this task keeps calling
            try:
                while True:
                    async with kv.allocate("test") as seq:
                        await seq.append(tokens)
                        await seq.commit()
                    await kv.lookup("test", tokens)
            except KVStoreClientError as e:
                return e

    e = asyncio.run(busy())
    assert isinstance(e, ShuttingDown) and "daemon shutting down" in e.details, repr(e)
    assert d.wait() == 0, d.stderr_text()
