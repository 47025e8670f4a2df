"""Bearer tokens and scopes (issue 19, item 1), end to end: a real daemon with a tokens file,
real gRPC over its unix socket and over TCP (with TLS), the real client and admin CLI."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import grpc
import kvstore_client
import pytest
from auth_helpers import (
    ADMIN,
    ALICE,
    BOB,
    NAMESPACES,
    READER,
    TOKENS,
    WRITER,
    call,
    every_method,
    make_certs,
    tcp_port,
    write_tokens,
)
from daemon import DaemonError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from kvstore_client import aio
from kvstore_client.channel import TLS
from kvstore_client.errors import KVStoreClientError, PermissionDenied, PoolError, Unauthenticated
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

from kvstore.server.auth import UNAUTHENTICATED

KV, AD = "/kvstore.v1.KVStore/", "/kvstore.v1.Admin/"
T = NAMESPACES[0]["page_tokens"]
TOKEN_IDS = list(range(100, 100 + 2 * T))
DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture
def secured(daemon_factory, tmp_path):
    """A daemon with namespaces "a" and "b" and the tokens of auth_helpers."""
    tokens = write_tokens(tmp_path / "tokens.toml", TOKENS)
    return daemon_factory(server={"tokens_file": tokens, "log_level": "debug"}, namespaces=NAMESPACES).start()


def _bytes(kv: kvstore_client.Client, n_tokens: int) -> bytes:
    page = kv.namespace("a").pool.page_bytes
    return bytes((i * 7 + 3) % 251 for i in range(page * (n_tokens // T)))


def test_every_method_needs_a_token(secured) -> None:
    with grpc.insecure_channel(secured.target) as ch:
        for path, request, streams in every_method():
            for token in (None, "", "not-a-token-of-this-daemon", WRITER[:-1]):
                assert call(ch, path, request(), token, streams) == (
                    grpc.StatusCode.UNAUTHENTICATED,
                    UNAUTHENTICATED,
                ), (path, token)
            # Another scheme, or the token without one, is no token either.
            for value in (f"Basic {WRITER}", WRITER, "Bearer"):
                code, _ = call(ch, path, request(), None, streams, header=value)
                assert code == grpc.StatusCode.UNAUTHENTICATED, (path, value)
        # Health and reflection stay open: probes and tools know no secrets.
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflected = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for s in next(reflected).list_services_response.service}
        assert "kvstore.v1.KVStore" in names
    # The client library says so too, before any session exists.
    with pytest.raises(Unauthenticated, match="bearer token"):
        kvstore_client.connect(secured.target, token="")


def test_read_only_token_reads_and_is_refused_the_rest(secured) -> None:
    with kvstore_client.connect(secured.target, token=WRITER) as w:
        data = _bytes(w, len(TOKEN_IDS))
        assert w.put("a", TOKEN_IDS, data).sealed_pages == 2
    with (
        kvstore_client.connect(secured.target, token=READER) as kv,
        grpc.insecure_channel(secured.target) as ch,
    ):
        got = kv.get("a", TOKEN_IDS)
        assert (got.hit_tokens, bytes(got.data.numpy())) == (len(TOKEN_IDS), data)
        pinned = kv.lookup("a", TOKEN_IDS, pin=True)
        assert pinned.hit_tokens == len(TOKEN_IDS)
        pinned.release()  # a pin is the reader's to release
        assert kv.stats("a").namespaces[0].name == "a"
        sid = kv.session_id
        named = {
            KV + "Allocate": pb.AllocateRequest(session_id=sid, namespace="a"),
            KV + "Reserve": pb.ReserveRequest(session_id=sid, namespace="a", token_ids=TOKEN_IDS),
            KV + "BatchReserve": pb.BatchReserveRequest(
                items=[pb.ReserveRequest(session_id=sid, namespace="a")]
            ),
            KV + "Put": pb.PutRequest(session_id=sid, namespace="a", token_ids=TOKEN_IDS),
            KV + "Evict": pb.EvictRequest(namespace="a", all=True),
            AD + "DeleteNamespace": pb.DeleteNamespaceRequest(namespace="a"),
            AD + "Explain": pb.ExplainRequest(namespace="a", token_ids=TOKEN_IDS),
            AD + "Mrc": pb.MrcRequest(namespace="a"),
        }
        for path, request in named.items():
            code, details = call(ch, path, request, READER)
            scope = "write" if path.startswith(KV) and "Evict" not in path else "admin"
            assert code == DENIED, path
            assert f"needs the {scope} scope on namespace 'a'" in details and "'reader'" in details, details
        # Stats of all namespaces: those it reads (item 4, tests/test_e2e_tenants.py).
        assert [ns.name for ns in kv.stats().namespaces] == ["a"]
        for path, request in {
            AD + "ListNamespaces": pb.ListNamespacesRequest(),
            AD + "ListSessions": pb.ListSessionsRequest(),
        }.items():
            name = path.rsplit("/", 1)[1]
            assert call(ch, path, request, READER) == (
                DENIED,
                f"{name} needs the admin scope; token 'reader' has it on no namespace",
            )
        every = {
            AD + "Flush": pb.FlushRequest(),
            AD + "CreateNamespace": pb.CreateNamespaceRequest(spec=pb.NamespaceSpec(name="c")),
        }
        for path, request in every.items():
            code, details = call(ch, path, request, READER)
            assert code == DENIED and ("every namespace ('*')" in details or "namespace 'c'" in details), (
                details
            )
        # A reader has no sequence: what acts on one needs write somewhere, which it has nowhere.
        by_sequence = {
            "Append": pb.AppendRequest(session_id=sid, sequence_id=1, token_ids=TOKEN_IDS),
            "Commit": pb.CommitRequest(session_id=sid, sequence_id=1),
            "Seal": pb.SealRequest(session_id=sid, sequence_id=1),
            "BatchSeal": pb.BatchSealRequest(items=[pb.SealRequest(session_id=sid, sequence_id=1)]),
            "Preempt": pb.PreemptRequest(session_id=sid, sequence_id=1, mode=pb.PREEMPT_DROP),
            "SwapIn": pb.SwapInRequest(session_id=sid, sequence_id=1),
            "ReportImportance": pb.ReportImportanceRequest(session_id=sid, sequence_id=1),
            "Release": pb.ReleaseRequest(session_id=sid, sequence_id=1),
        }
        for name, request in by_sequence.items():
            code, details = call(ch, KV + name, request, READER)
            assert (code, details) == (
                DENIED,
                f"{name} needs the write scope; token 'reader' has it on no namespace",
            )
        # Nothing it tried changed what is stored.
        assert bytes(kv.get("a", TOKEN_IDS).data.numpy()) == data


def test_a_token_of_namespace_a_cannot_touch_b_nor_its_sessions(secured) -> None:
    with (
        kvstore_client.connect(secured.target, token=ALICE) as alice,
        kvstore_client.connect(secured.target, token=BOB) as bob,
        grpc.insecure_channel(secured.target) as ch,
    ):
        data = _bytes(alice, len(TOKEN_IDS))
        alice.put("a", TOKEN_IDS, data)
        seq = alice.allocate("a")
        seq.append(TOKEN_IDS[:T])
        pin = alice.lookup("a", TOKEN_IDS, pin=True)
        a_sid, a_seq, a_pin, b_sid = alice.session_id, seq.sequence_id, pin.pin_id, bob.session_id
        # Bob names Alice's session (ids he learnt somehow): every call is refused before it acts.
        theirs = {
            "KeepAlive": pb.KeepAliveRequest(session_id=a_sid),
            "Heartbeat": pb.HeartbeatRequest(session_id=a_sid),
            "CloseSession": pb.CloseSessionRequest(session_id=a_sid),
            "Append": pb.AppendRequest(session_id=a_sid, sequence_id=a_seq, token_ids=TOKEN_IDS),
            "Commit": pb.CommitRequest(session_id=a_sid, sequence_id=a_seq, num_tokens=T),
            "Seal": pb.SealRequest(session_id=a_sid, sequence_id=a_seq, num_tokens=T, release=True),
            "GetSequence": pb.GetSequenceRequest(session_id=a_sid, sequence_id=a_seq),
            "Preempt": pb.PreemptRequest(session_id=a_sid, sequence_id=a_seq, mode=pb.PREEMPT_DROP),
            "SwapIn": pb.SwapInRequest(session_id=a_sid, sequence_id=a_seq),
            "ReportImportance": pb.ReportImportanceRequest(session_id=a_sid, sequence_id=a_seq),
            "Release": pb.ReleaseRequest(session_id=a_sid, sequence_id=a_seq),
            "WaitPages": pb.WaitPagesRequest(session_id=a_sid, pin_id=a_pin),
            # ... even naming his own namespace, where he may write: the session is not his.
            "Lookup": pb.LookupRequest(session_id=a_sid, namespace="b", pin=True, release_pin_ids=[a_pin]),
            "Reserve": pb.ReserveRequest(session_id=a_sid, namespace="b", token_ids=TOKEN_IDS),
            "Put": pb.PutRequest(session_id=a_sid, namespace="b", credit_sequence_id=a_seq),
        }
        for name, request in theirs.items():
            code, details = call(ch, KV + name, request, BOB, streams=name == "KeepAlive")
            assert (code, details) == (
                DENIED,
                f"{name}: session {a_sid} was opened with another token; a session is only its token's",
            ), name
        # His own session, Alice's namespace.
        for name, request in {
            "Lookup": pb.LookupRequest(session_id=b_sid, namespace="a", token_ids=TOKEN_IDS),
            "GetNamespace": pb.GetNamespaceRequest(namespace="a"),
            "Stats": pb.StatsRequest(namespace="a"),
            "Allocate": pb.AllocateRequest(session_id=b_sid, namespace="a"),
            "Put": pb.PutRequest(session_id=b_sid, namespace="a", token_ids=TOKEN_IDS),
        }.items():
            code, details = call(ch, KV + name, request, BOB)
            assert code == DENIED and "on namespace 'a'; token 'bob'" in details, (name, details)
        # His own session and Alice's sequence or pin id: the store's check (not his session's).
        for name, request in {
            "Append": pb.AppendRequest(session_id=b_sid, sequence_id=a_seq, token_ids=TOKEN_IDS),
            "Release": pb.ReleaseRequest(session_id=b_sid, pin_id=a_pin),
        }.items():
            code, details = call(ch, KV + name, request, BOB)
            assert code == DENIED and "belongs to another session" in details, (name, details)
        with pytest.raises(PermissionDenied, match="namespace 'a'"):
            bob.get("a", TOKEN_IDS)
        # Alice's session, sequence, pin and bytes are all as she left them.
        assert alice.heartbeat() > 0
        assert seq.refresh().num_tokens == T
        assert pin.wait().ready_pages == 2
        pin.release()
        assert bytes(alice.get("a", TOKEN_IDS).data.numpy()) == data


def test_tcp_needs_tokens_unless_explicitly_insecure(daemon_factory, tmp_path) -> None:
    d = daemon_factory(server={"tcp": "127.0.0.1:0"})
    with pytest.raises(
        DaemonError, match=r"(?s)status 2 .*server.tcp=127.0.0.1:0: a TCP listener needs server.tokens_file"
    ):
        d.start()
    d = daemon_factory(server={"tcp": "127.0.0.1:0", "tcp_insecure_no_auth": True}).start()
    assert "ANYONE WHO CAN REACH tcp 127.0.0.1:0" in d.stderr_text()
    # With tokens, TCP asks for them like the socket does.
    tokens = write_tokens(tmp_path / "tokens.toml", TOKENS)
    d = daemon_factory(server={"tcp": "127.0.0.1:0", "tokens_file": tokens}, namespaces=NAMESPACES).start()
    target = f"127.0.0.1:{tcp_port(d.stderr_text())}"
    with pytest.raises(Unauthenticated):
        kvstore_client.connect(target, token="")
    with kvstore_client.connect(target, token=READER) as kv:
        assert kv.lookup("a", TOKEN_IDS).hit_tokens == 0


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_a_tokens_file_others_may_read_is_refused(daemon_factory, tmp_path, mode) -> None:
    tokens = write_tokens(tmp_path / "tokens.toml", TOKENS, mode=mode)
    d = daemon_factory(server={"tokens_file": tokens})
    with pytest.raises(
        DaemonError, match=rf"(?s)status 2 .*has mode {mode:04o}: group or others .*chmod 600"
    ):
        d.start()
    assert not d.socket_path.exists()


def test_tls_round_trip_with_client_certificates(daemon_factory, tmp_path) -> None:
    certs = make_certs(tmp_path)
    server = {
        "tcp": "127.0.0.1:0",
        "tokens_file": write_tokens(tmp_path / "tokens.toml", TOKENS),
        "tls_cert": certs["server.pem"],
        "tls_key": certs["server.key"],
        "tls_client_ca": certs["ca.pem"],
    }
    d = daemon_factory(server=server, namespaces=NAMESPACES).start()
    target = f"localhost:{tcp_port(d.stderr_text())}"
    tls = TLS(certs["ca.pem"], certs["client.pem"], certs["client.key"])
    with kvstore_client.connect(d.target, token=WRITER) as kv:  # the pool: on the unix socket
        kv.put("a", TOKEN_IDS, _bytes(kv, len(TOKEN_IDS)))
    with kvstore_client.connect(target, token=READER, tls=tls) as kv:
        assert kv.lookup("a", TOKEN_IDS).hit_tokens == len(TOKEN_IDS)
        # No descriptor crosses TCP: zero-copy needs the unix socket, and the client says so.
        with pytest.raises(PoolError, match="only by a client on the daemon's unix socket"):
            kv.get("a", TOKEN_IDS)
    # Without a client certificate, in the clear, or without a token: refused.
    for kw in ({"token": READER, "tls": TLS(certs["ca.pem"])}, {"token": READER}):
        with pytest.raises(KVStoreClientError) as e:
            kvstore_client.connect(target, connect_timeout_s=2, **kw)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE, kw
    with pytest.raises(Unauthenticated):
        kvstore_client.connect(target, token="", tls=tls)


def test_the_token_never_reaches_the_log(secured) -> None:
    with kvstore_client.connect(secured.target, token=WRITER) as kv:
        kv.put("a", TOKEN_IDS, _bytes(kv, len(TOKEN_IDS)))
        with pytest.raises(PermissionDenied):
            kv.evict("a", all=True)
    for wrong in (WRITER[:-1] + "X", "x" * 40):
        with pytest.raises(Unauthenticated):
            kvstore_client.connect(secured.target, token=wrong)
    assert secured.terminate() == 0
    log = secured.stderr_text()
    assert "session" in log and "DEBUG" in log.upper()  # the log is there, and verbose
    for secret in (WRITER, WRITER[:-1], "x" * 40, READER):
        assert secret not in log


def test_aio_client_sends_the_token_on_every_call_and_stream(secured) -> None:
    async def main() -> tuple[int, bytes, bytes]:
        async with aio.connect(secured.target, token=ALICE) as kv:  # OpenSession, then KeepAlive
            ns = await kv.namespace("a")
            data = bytes(i % 253 for i in range(2 * ns.pool.page_bytes))
            await kv.put("a", TOKEN_IDS, data)
            got = await kv.get("a", TOKEN_IDS)
            with pytest.raises(PermissionDenied, match="namespace 'b'"):
                await kv.get("b", TOKEN_IDS)
            assert await kv.heartbeat() > 0
            return got.hit_tokens, bytes(got.data.numpy()), data

    hit, got, data = asyncio.run(main())
    assert (hit, got) == (len(TOKEN_IDS), data)


def test_admin_cli_takes_the_token_from_a_flag_or_the_environment(secured) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    admin = [sys.executable, "-m", "kvstore_client.cli.admin", "--target", secured.target]

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*admin, *args], capture_output=True, text=True, timeout=60, env=env | extra)

    r = run("namespaces")
    assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr, r.stderr
    r = run("namespaces", KVSTORE_TOKEN=READER)
    assert r.returncode == 1 and "needs the admin scope; token 'reader' has it on no namespace" in r.stderr, (
        r.stderr
    )
    r = run("--token", ADMIN, "namespaces", KVSTORE_TOKEN=READER)  # the flag wins
    assert r.returncode == 0 and "a" in r.stdout, r.stderr
