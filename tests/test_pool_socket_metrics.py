"""The pool socket's refusals are counted by reason (issue 19, leftovers of item 2): a real
daemon with tokens, its real pool socket, one request of each kind of refusal, and the
counts read back from Stats (gRPC) and from Prometheus (HTTP): each kind moves its own
counter, by exactly the requests of that kind, and nothing else."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import grpc
from auth_helpers import ADMIN, BOB, NAMESPACES, READER, TOKENS, WRITER, write_tokens
from e2e_helpers import wait_until
from kvstore_client.cli.stats_view import render_stats
from kvstore_client.results import Stats
from kvstore_proto import pool_socket as wire
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb
from kvstore_proto.kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from test_metrics_ops import free_port, scrape
from test_pool_socket import ask, get_namespace

from kvstore.server.pool_refusals import REASONS
from kvstore.server.pool_socket import MAX_CONNECTIONS
from kvstore.server.pool_tickets import TTL_S

AUTH = [("authorization", f"Bearer {ADMIN}")]


def stats(target: str) -> pb.StatsResponse:
    with grpc.insecure_channel(target) as ch:
        return pb_grpc.KVStoreStub(ch).Stats(pb.StatsRequest(), timeout=10, metadata=AUTH)


def refused(target: str) -> dict[str, int]:
    return dict(stats(target).pool_socket.refused)


def test_each_kind_of_pool_socket_refusal_moves_its_own_counter(daemon_factory: Any, tmp_path: Any) -> None:
    port = free_port()
    tokens = write_tokens(tmp_path / "tokens.toml", TOKENS)
    d = daemon_factory(
        server={"tokens_file": tokens, "metrics": f"127.0.0.1:{port}"}, namespaces=NAMESPACES
    ).start()
    path = str(d.socket_path) + wire.SUFFIX
    assert refused(d.target) == dict.fromkeys(REASONS, 0)  # every reason, from the start
    early = get_namespace(d.target, "a", READER).pool.pool_ticket  # to expire
    issued = time.monotonic()
    header = wire.MAGIC + bytes([wire.VERSION])

    def refuse(data: bytes, why: str) -> None:
        status, text, fds = ask(path, data)
        assert (status, fds) == (wire.REFUSED, []) and why in text, (data, text)

    refuse(b"GET / HTTP/1.1\r\n\r\n", "not a version-1 pool socket request")  # malformed x3
    refuse(header + b"\xff\xff" + bytes(32), "token_len=65535 is over 4096")
    refuse(header + b"\x04\x00" + bytes(32) + b"\xff\xfe\xfd\xfc", "the token is not UTF-8")
    refuse(header + bytes(10), "the connection closed after 15 bytes")  # incomplete x2
    refuse(b"", "the connection closed after 0 bytes")
    refuse(wire.encode_request(os.urandom(32), READER), "unknown ticket")
    ticket = get_namespace(d.target, "a", READER).pool.pool_ticket
    refuse(wire.encode_request(ticket, WRITER), "issued to another token")
    refuse(wire.encode_request(ticket, READER), "used already")  # the wrong token used it up
    ticket = get_namespace(d.target, "a", READER).pool.pool_ticket
    status, _, fds = ask(path, wire.encode_request(ticket, READER))
    assert status == wire.GRANTED and len(fds) == 1
    os.close(fds[0])
    refuse(wire.encode_request(ticket, READER), "used already")  # a granted one, again
    b = get_namespace(d.target, "b", BOB).pool
    ticket = b.pool_ticket
    with grpc.insecure_channel(d.target) as ch:
        pb_grpc.AdminStub(ch).DeleteNamespace(
            pb.DeleteNamespaceRequest(namespace="b", pool_epoch=b.pool_epoch), timeout=10, metadata=AUTH
        )
    refuse(wire.encode_request(ticket, BOB), "the namespace was deleted or created again")
    expected = dict.fromkeys(REASONS, 0) | {
        "malformed": 3,
        "incomplete": 2,
        "unknown_ticket": 1,
        "wrong_token": 1,
        "used_ticket": 2,
        "pool_gone": 1,
    }
    assert refused(d.target) == expected
    assert stats(d.target).pool_socket.granted == 1

    # Idle connections: the first MAX_CONNECTIONS are read until the timeout, the rest closed at once.
    extra = 6
    idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(MAX_CONNECTIONS + extra)]
    try:
        for s in idle:
            s.connect(path)
        got = wait_until(
            lambda: refused(d.target),
            lambda r: r["busy"] + r["timeout"] == MAX_CONNECTIONS + extra,
            timeout=30,
            what="every idle connection refused",
        )
    finally:
        for s in idle:
            s.close()
    # (a request answered just before may still hold its slot for a moment: busy may be more)
    assert got["busy"] >= extra and got["timeout"] > 0
    expected |= {"busy": got["busy"], "timeout": got["timeout"]}

    wait_until(time.monotonic, lambda now: now > issued + TTL_S + 0.1, timeout=TTL_S + 5, what="the TTL")
    refuse(wire.encode_request(early, READER), "expired ticket")
    expected["expired_ticket"] = 1
    reply = stats(d.target)
    assert dict(reply.pool_socket.refused) == expected and reply.pool_socket.granted == 1

    # Prometheus: the same numbers (published once a second), one series per reason.
    def pool_metrics() -> dict[str, float]:
        m = scrape(port, {"Authorization": f"Bearer {ADMIN}"})
        out = {
            labels[0][1]: v for (name, labels), v in m.items() if name == "kvstore_pool_socket_refused_total"
        }
        return out | {"(granted)": m.get(("kvstore_pool_socket_granted_total", ()), -1)}

    want = {k: float(v) for k, v in expected.items()} | {"(granted)": 1.0}
    wait_until(pool_metrics, lambda m: m == want, timeout=10, what=f"the metrics to say {want}")

    # kvstore-admin stats shows them; a tenant's token does not get them (every tenant's traffic).
    text = render_stats(Stats.from_proto(reply))
    assert "pool socket: 1 descriptors handed out; refused: busy" in text and "used_ticket 2" in text
    with grpc.insecure_channel(d.target) as ch:
        mine = pb_grpc.KVStoreStub(ch).Stats(
            pb.StatsRequest(), timeout=10, metadata=[("authorization", f"Bearer {READER}")]
        )
    assert not mine.HasField("pool_socket")
    assert d.proc.poll() is None and "Traceback" not in d.stderr_text()
