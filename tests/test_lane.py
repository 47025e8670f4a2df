"""The lane (`<socket>.lane`, docs/api.md "The lane"): the put/get calls over a plain unix
socket, through the same edge as gRPC. Real daemon, real sockets: what a client puts on the
lane another process reads back byte for byte; the daemon counts the lane's calls (Stats.lane)
and none when the lane is off; garbage, oversize, truncated frames and unknown methods get a
clear answer or a clean close and the daemon serves on, losing nothing; tokens are checked per
call (UNAUTHENTICATED, PERMISSION_DENIED); a client killed mid-call and a client whose call
times out leak nothing; shutdown answers UNAVAILABLE and removes the socket."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import kvstore_client
import numpy as np
import pytest
from auth_helpers import NAMESPACES, READER, TOKENS, WRITER, write_tokens
from daemon import SERVING
from e2e_helpers import Raw, Worker, prompt, prompt_bytes, wait_until
from kvstore_client.errors import DeadlineExceeded, PermissionDenied, Unavailable
from kvstore_proto import lane as wire
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb
from kvstore_proto.kvstore.v1 import kvstore_pb2_grpc as pb_grpc

NS = "test"  # tests/daemon.py: 4 tokens a page, 64 pages
T = 4


def lane_stats(target: str, token: str = "") -> pb.LaneStats:
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(target) as channel:
        return pb_grpc.KVStoreStub(channel).Stats(pb.StatsRequest(), timeout=10, metadata=metadata).lane


class RawLane:
    """A lane connection by hand: frames as kvstore_proto/lane.py defines them."""

    def __init__(self, path: Path, token: str = "", hello: bytes | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        if hello is None:
            self.sock.sendall(wire.frame(wire.MAGIC + token.encode()))
            assert self.reply() == (0, wire.SERVER_HELLO)

    def reply(self) -> tuple[int, bytes] | None:
        """The next reply frame, or None when the daemon closed the connection."""
        head = self._exactly(4)
        if head is None:
            return None
        body = self._exactly(wire.LENGTH.unpack(head)[0])
        assert body is not None, "the daemon closed the connection mid-frame"
        return body[0], body[1:]

    def call(self, method: str, payload: bytes) -> tuple[grpc.StatusCode, bytes]:
        self.sock.sendall(wire.request(method.encode(), payload))
        got = self.reply()
        assert got is not None, f"{method}: the daemon closed the connection"
        return next(c for c in grpc.StatusCode if c.value[0] == got[0]), got[1]

    def _exactly(self, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


def lane_path(d) -> Path:
    return Path(f"{d.socket_path}{wire.SUFFIX}")


def test_a_put_on_the_lane_is_read_back_by_another_process_and_counted(daemon) -> None:
    assert lane_path(daemon).is_socket()
    assert oct(lane_path(daemon).stat().st_mode & 0o777) == "0o600"
    tokens = prompt(3 * T, seed=61)
    with kvstore_client.connect(daemon.target) as kv, Worker("reader") as reader:
        assert kv.lane  # the daemon offered its lane
        before = lane_stats(daemon.target).calls
        kv.put(NS, tokens, prompt_bytes(tokens, kv.namespace(NS).page_shape, T))  # Reserve + Seal
        assert lane_stats(daemon.target).calls == before + 2
        reader.call("connect", target=daemon.target)  # the worker's client takes the lane too
        found = reader.call("lookup", namespace=NS, tokens=tokens)
        assert found["hit_tokens"] == 3 * T
        assert reader.call("verify", namespace=NS, tokens=tokens, slots=found["slots"])["mismatched"] == []

        # ...and the other way: the worker puts on the lane, this process gets the bytes.
        other = prompt(2 * T, seed=62)
        reader.call("put", namespace=NS, tokens=other)
        want = prompt_bytes(other, kv.namespace(NS).page_shape, T)
        out = np.zeros(len(want), dtype=np.uint8)
        hit = kv.get(NS, other, out)
        assert hit.hit_tokens == 2 * T
        assert out.tobytes() == want
        assert lane_stats(daemon.target).open == 2


def test_the_lane_off_in_the_client_or_the_daemon_leaves_the_calls_on_grpc(
    daemon_factory, monkeypatch
) -> None:
    d = daemon_factory().start()
    tokens = prompt(2 * T, seed=63)
    monkeypatch.setenv("KVSTORE_LANE", "0")
    with kvstore_client.connect(d.target) as kv:
        assert not kv.lane
        kv.put(NS, tokens, prompt_bytes(tokens, kv.namespace(NS).page_shape, T))
        assert kv.get(NS, tokens).hit_tokens == 2 * T
    monkeypatch.delenv("KVSTORE_LANE")
    with kvstore_client.connect(d.target, lane=False) as kv:
        assert not kv.lane and kv.get(NS, tokens).hit_tokens == 2 * T
    assert lane_stats(d.target).calls == 0 and lane_stats(d.target).connections == 0
    with kvstore_client.connect(d.target) as kv:
        calls = {(c.method, c.code): c.calls for c in kv.stats().rpc_calls}
    assert calls[("KVStore/Lookup", "OK")] == 2  # counted by the edge, over gRPC

    off = daemon_factory(server={"lane": False}).start()
    assert not lane_path(off).exists()
    with kvstore_client.connect(off.target) as kv:  # wanted, not offered: gRPC
        assert not kv.lane
        kv.put(NS, tokens, prompt_bytes(tokens, kv.namespace(NS).page_shape, T))
        assert kv.get(NS, tokens).hit_tokens == 2 * T
        assert kv.stats().lane is None or kv.stats().lane.calls == 0


def test_bad_frames_get_a_clear_answer_or_a_clean_close_and_nothing_is_lost(daemon) -> None:
    tokens = prompt(3 * T, seed=64)
    with kvstore_client.connect(daemon.target) as kv:
        shape = kv.namespace(NS).page_shape
        kv.put(NS, tokens, prompt_bytes(tokens, shape, T))
    path = lane_path(daemon)

    bad = RawLane(path, hello=b"")  # not a hello: an error reply, then the close
    bad.sock.sendall(wire.frame(b"GET / HTTP/1.1\r\n"))
    code, text = bad.reply()
    assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and b"not a kvstore lane hello" in text
    assert bad.reply() is None
    bad.close()

    big = RawLane(path)  # over the gRPC max receive message size: refused before it is read
    big.sock.sendall(wire.LENGTH.pack(1 << 30) + b"Put")
    code, text = big.reply()
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and b"over the daemon's limit" in text
    assert big.reply() is None
    big.close()

    cut = RawLane(path)  # a frame that never ends: the client's close is all there is
    cut.sock.sendall(wire.LENGTH.pack(100) + b"\x03Put" + b"\x00" * 10)
    cut.close()

    lane = RawLane(path)
    code, text = lane.call("Put", b"\xff\xff\xff\xff garbage")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and b"PutRequest" in text
    code, text = lane.call("GetSequence", b"")
    assert code == grpc.StatusCode.UNIMPLEMENTED and b"'GetSequence' is not served on the lane" in text
    lane.sock.sendall(wire.frame(b""))  # an empty request
    code, text = lane.reply()
    assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and b"name_len" in text
    # The same connection serves on: a real Lookup, answered with the stored prefix.
    code, reply = lane.call("Lookup", pb.LookupRequest(namespace=NS, token_ids=tokens).SerializeToString())
    assert code == grpc.StatusCode.OK and pb.LookupResponse.FromString(reply).hit_tokens == 3 * T
    # Frames cut anywhere and several in one write are each answered, in order.
    frames = [
        wire.request(b"Lookup", pb.LookupRequest(namespace=NS, token_ids=tokens[: k * T]).SerializeToString())
        for k in (1, 2, 3)
    ]
    stream = b"".join(frames)
    for cut_at in (2, 5, len(frames[0]) + 3):
        lane.sock.sendall(stream[:cut_at])
        lane.sock.sendall(stream[cut_at:])
        for k in (1, 2, 3):
            code, reply = lane.reply()
            assert code == 0 and pb.LookupResponse.FromString(reply).hit_tokens == k * T
    lane.close()

    stats = lane_stats(daemon.target)
    assert stats.refused == 2
    with kvstore_client.connect(daemon.target) as kv:
        out = np.zeros(len(prompt_bytes(tokens, shape, T)), dtype=np.uint8)
        assert kv.get(NS, tokens, out).hit_tokens == 3 * T
        assert out.tobytes() == prompt_bytes(tokens, shape, T)  # nothing stored was lost
        assert kv.stats().malformed_requests >= 1
    assert "Traceback" not in daemon.stderr_text()


def test_tokens_are_checked_on_every_lane_call(daemon_factory, tmp_path) -> None:
    d = daemon_factory(
        server={"tokens_file": write_tokens(tmp_path / "tokens.toml", TOKENS)}, namespaces=NAMESPACES
    ).start()
    path = lane_path(d)
    lookup = pb.LookupRequest(namespace="a", token_ids=prompt(T, seed=65)).SerializeToString()
    for token in ("", "not-a-token-at-all-0123"):
        anon = RawLane(path, token=token)
        code, text = anon.call("Lookup", lookup)
        assert code == grpc.StatusCode.UNAUTHENTICATED and b"bearer token is required" in text
        anon.close()
    reader = RawLane(path, token=READER)
    assert reader.call("Lookup", lookup)[0] == grpc.StatusCode.OK
    reserve = pb.ReserveRequest(namespace="a", token_ids=prompt(T, seed=65)).SerializeToString()
    code, text = reader.call("Reserve", reserve)
    assert code == grpc.StatusCode.PERMISSION_DENIED and b"write scope" in text
    reader.close()

    tokens = prompt(2 * T, seed=66)
    with kvstore_client.connect(d.target, token=WRITER) as kv:
        assert kv.lane
        kv.put("a", tokens, prompt_bytes(tokens, kv.namespace("a").page_shape, T))
        assert kv.get("a", tokens).hit_tokens == 2 * T
    longer = [*tokens, 1, 2, 3, 4]
    with (
        kvstore_client.connect(d.target, token=READER) as kv,
        pytest.raises(PermissionDenied, match="write scope"),
    ):
        kv.put("a", longer, prompt_bytes(longer, kv.namespace("a").page_shape, T))


KILLED = textwrap.dedent(
    """
    import sys, kvstore_client
    from e2e_helpers import page_content_bytes, page_tokens_of, prompt
    kv = kvstore_client.connect(sys.argv[1], client_name="killed")
    ns = kv.namespace("test")
    print("ready", flush=True)
    i = 0
    while True:  # puts and gets on the lane until SIGKILL
        tokens = prompt(8, seed=1000 + i % 8)
        kv.put(ns, tokens, b"".join(page_content_bytes(p, page_tokens_of(tokens, p, 4), ns.page_shape) for p in range(2)))
        kv.get(ns, tokens)
        i += 1
    """
)


def test_a_client_killed_mid_call_on_the_lane_leaks_nothing(daemon) -> None:
    killed_mid_call_leaks_nothing(daemon, KILLED, lambda s: s.calls >= 40)


def killed_mid_call_leaks_nothing(daemon, script: str, busy: Callable[[pb.LaneStats], bool]) -> None:
    """Run `script` (argv[1]: the daemon's target; prints "ready", then calls on the lane until
    killed) in its own process, SIGKILL it once the daemon's lane stats satisfy `busy`, and
    check the daemon freed its pages, pins, session and lane connections."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, "-c", script, daemon.target], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout.readline() == b"ready\n", proc.stderr.read()
        with Raw(daemon.target) as raw:
            wait_until(lambda: lane_stats(daemon.target), busy, timeout=30, what="lane calls under way")
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            after = wait_until(
                lambda: raw.counts(NS),
                lambda c: c["pages_reserved"] == 0 and c["pages_pinned"] == 0 and c["sessions"] == 0,
                timeout=10,
                what="the killed client's pages and session to be released",
            )
            assert after["sequences"] == 0
            wait_until(
                lambda: lane_stats(daemon.target).open, lambda n: n == 0, timeout=10, what="lane closed"
            )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()
    assert "Traceback" not in daemon.stderr_text()


def test_a_lane_call_past_its_deadline_is_deadline_exceeded_and_the_next_one_works(daemon) -> None:
    tokens = prompt(2 * T, seed=67)
    with kvstore_client.connect(daemon.target, timeout_s=0.5) as kv:
        kv.put(NS, tokens, prompt_bytes(tokens, kv.namespace(NS).page_shape, T))
        daemon.signal(signal.SIGSTOP)  # a daemon that does not answer
        try:
            with pytest.raises(DeadlineExceeded):
                kv.get(NS, tokens)
        finally:
            daemon.signal(signal.SIGCONT)
        assert kv.get(NS, tokens).hit_tokens == 2 * T  # on a new lane connection
    with Raw(daemon.target) as raw:
        wait_until(lambda: raw.counts(NS), lambda c: c["pages_pinned"] == 0, timeout=10, what="pins")


def test_shutdown_answers_unavailable_on_the_lane_and_removes_its_socket(daemon) -> None:
    tokens = prompt(2 * T, seed=68)
    kv = kvstore_client.connect(daemon.target)
    try:
        kv.put(NS, tokens, prompt_bytes(tokens, kv.namespace(NS).page_shape, T))
        assert daemon.terminate() == 0, daemon.stderr_text()
        assert not lane_path(daemon).exists()
        with pytest.raises(Unavailable):
            kv.get(NS, tokens)
    finally:
        kv.close()


def test_a_lane_call_to_a_hung_daemon_fails_once_the_session_stream_ends(daemon) -> None:
    """No deadline: what ends the wait is the session's KeepAlive stream (gRPC's HTTP/2 pings
    end it for a hung daemon; here it is cancelled by hand, which ends it the same way)."""
    tokens = prompt(2 * T, seed=69)
    with kvstore_client.connect(daemon.target, timeout_s=None) as kv:
        kv.put(NS, tokens, prompt_bytes(tokens, kv.namespace(NS).page_shape, T))
        outcome: list[BaseException] = []
        connected, stopped = threading.Event(), threading.Event()

        def get() -> None:  # on a thread of its own: its lane connection is opened first
            kv.get(NS, tokens)
            connected.set()
            stopped.wait(10)
            try:
                kv.get(NS, tokens)
            except BaseException as e:
                outcome.append(e)

        caller = threading.Thread(target=get)
        caller.start()
        assert connected.wait(10)
        daemon.signal(signal.SIGSTOP)
        try:
            stopped.set()
            caller.join(2.5)
            assert caller.is_alive()  # waiting on the stopped daemon, no deadline
            kv._keepalive.cancel()
            caller.join(5)
            assert not caller.is_alive()
        finally:
            daemon.signal(signal.SIGCONT)
        assert len(outcome) == 1 and isinstance(outcome[0], Unavailable), outcome


def test_a_client_that_never_reads_its_replies_is_not_read_either(daemon) -> None:
    lane = RawLane(lane_path(daemon))
    unknown = wire.request(b"X" * 255, b"")  # answered UNIMPLEMENTED naming it: ~350 bytes back
    lane.sock.settimeout(2)
    sent = 0
    with pytest.raises(TimeoutError):
        for _ in range(40_000):  # ~10 MB of requests, ~14 MB of replies if all were answered
            lane.sock.sendall(unknown)
            sent += 1
    assert sent < 5_000, f"the daemon read {sent} requests whose replies nobody read"
    assert daemon.health() == SERVING
    lane.close()
    with kvstore_client.connect(daemon.target) as kv:
        assert kv.get(NS, prompt(T, seed=70)).hit_tokens == 0  # and serves on


def test_a_daemon_killed_leaves_a_stale_lane_socket_that_the_next_one_replaces(daemon) -> None:
    daemon.kill()
    assert lane_path(daemon).is_socket()  # SIGKILL: nobody removed it
    daemon.start()
    tokens = prompt(T, seed=71)
    with kvstore_client.connect(daemon.target) as kv:
        assert kv.lane
        kv.put(NS, tokens, prompt_bytes(tokens, kv.namespace(NS).page_shape, T))
        assert kv.get(NS, tokens).hit_tokens == T
    assert "removed stale lane socket" in daemon.stderr_text()
