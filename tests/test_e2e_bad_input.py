"""Bad input, end to end: every bad request gets its status code and a message naming the
field, the value and the limit; and afterwards the daemon still serves and the prefixes
process A committed earlier read back unchanged (bytes compared) and still hit.

Requests go through raw stubs wherever the client library would refuse them before they
reach the daemon; garbage goes through a raw unix socket; and one request is built by hand
from the descriptors the daemon publishes through server reflection, in a process that never
imports our generated code.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import kvstore_client
import numpy as np
import pytest
from daemon import SERVING, SMALL_NAMESPACE, DaemonProcess
from e2e_helpers import (
    Raw,
    Worker,
    assert_status,
    page_content_bytes,
    page_tokens_of,
    prompt,
)
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

Code = grpc.StatusCode
T = 4
MAX_REQUEST_TOKENS = 1000  # more than the `test` pool holds (64 pages x 4 = 256 tokens)
VOCAB = 1000
NAMESPACES = [SMALL_NAMESPACE, SMALL_NAMESPACE | {"name": "vocab", "num_pages": 16, "vocab_size": VOCAB}]
HELD = prompt(16, seed=70, vocab=VOCAB)  # A's committed prefix, still held by A's sequence
CACHED = prompt(8, seed=71, vocab=VOCAB)  # A's committed prefix, released: cached, unpinned


@dataclass
class Ctx:
    daemon: DaemonProcess
    raw: Raw
    kv: kvstore_client.Client  # the test's own session (its lease held by the library)
    a: Worker  # process A
    a_session: int
    a_sequence: int
    prefixes: dict[str, tuple[list[int], list[int]]]  # name -> (tokens, slots)
    baseline: dict[str, int]  # page counts of `test` once A is done

    @property
    def sid(self) -> int:
        return self.kv.session_id

    def error(self, method: str, request) -> grpc.RpcError:
        return self.raw.error(method, request)

    def assert_intact(self) -> None:
        """The daemon serves; A's prefixes still hit, on the same slots, with the same bytes;
        no page changed state and no session was left open."""
        assert self.daemon.proc.poll() is None, self.daemon.stderr_text()
        assert self.daemon.health() == SERVING
        assert self.a.alive()
        pool = self.raw.pool("test")
        for name, (tokens, slots) in self.prefixes.items():
            hit = self.raw.kv.Lookup(pb.LookupRequest(namespace="test", token_ids=tokens), timeout=10)
            assert hit.hit_tokens == len(tokens), f"A's prefix {name} no longer hits fully"
            assert list(hit.slots) == slots
            for i, slot in enumerate(slots):
                want = page_content_bytes(i, page_tokens_of(tokens, i, T), pool.page_shape)
                assert self.raw.read_page("test", slot) == want, f"A's prefix {name}: page {i} changed"
        assert self.raw.counts("test") == self.baseline


@pytest.fixture(scope="module")
def served() -> Iterator[Ctx]:
    with DaemonProcess(server={"max_request_tokens": MAX_REQUEST_TOKENS}, namespaces=NAMESPACES) as d:
        d.start()
        with (
            Worker("A") as a,
            Raw(d.target) as raw,
            kvstore_client.connect(d.target, client_name="bad") as kv,
        ):
            a_session = a.call("connect", target=d.target, client_name="A")["session_id"]
            held = a.call("write_prompt", namespace="test", tokens=HELD)
            cached = a.call("write_prompt", namespace="test", tokens=CACHED, release=True)
            ctx = Ctx(
                d,
                raw,
                kv,
                a,
                a_session,
                held["sequence_id"],
                {"held": (HELD, held["slots"]), "cached": (CACHED, cached["slots"])},
                raw.counts("test"),
            )
            assert ctx.baseline["pages_pinned"] == 4 and ctx.baseline["pages_sealed"] == 6
            ctx.assert_intact()
            yield ctx
            # A reads its own pages back through its own mapping, unchanged.
            for tokens, slots in ctx.prefixes.values():
                assert a.call("verify", namespace="test", tokens=tokens, slots=slots)["mismatched"] == []


@contextlib.contextmanager
def sequence(ctx: Ctx, namespace: str = "test", max_tokens: int = 0, tokens: list[int] = ()) -> Iterator[int]:
    """A sequence of the test's session for the duration of a case, released after."""
    seq = ctx.kv.allocate(namespace, max_tokens=max_tokens)
    if tokens:
        seq.append(tokens)
    try:
        yield seq.sequence_id
    finally:
        seq.release()


# ---------------------------------------------------------------- the cases


def unknown_namespace(ctx: Ctx) -> None:
    for method, request in [
        ("Allocate", pb.AllocateRequest(session_id=ctx.sid, namespace="nope")),
        ("Lookup", pb.LookupRequest(namespace="nope", token_ids=[1, 2, 3, 4])),
        ("GetNamespace", pb.GetNamespaceRequest(namespace="nope")),
        ("Evict", pb.EvictRequest(namespace="nope", all=True)),
        ("Stats", pb.StatsRequest(namespace="nope")),
    ]:
        assert_status(
            ctx.error(method, request), Code.NOT_FOUND, "namespace 'nope' does not exist", "test, vocab"
        )


def allocate_more_than_the_pool(ctx: Ctx) -> None:
    # 257 tokens = 65 pages of a 64-page pool; the cached unpinned prefix must not be evicted for it.
    err = ctx.error("Allocate", pb.AllocateRequest(session_id=ctx.sid, namespace="test", max_tokens=257))
    free = ctx.baseline["pages_free"]
    assert_status(
        err,
        Code.RESOURCE_EXHAUSTED,
        "max_tokens=257",
        "needs 65 free pages",
        f"only {free} are free",
        "64 total",
    )


def append_past_max_tokens(ctx: Ctx) -> None:
    with sequence(ctx, max_tokens=8) as seq:
        err = ctx.error(
            "Append", pb.AppendRequest(session_id=ctx.sid, sequence_id=seq, token_ids=prompt(9, 1))
        )
        assert_status(err, Code.OUT_OF_RANGE, "append of 9 tokens", "max_tokens=8")
        view = ctx.raw.kv.GetSequence(pb.GetSequenceRequest(session_id=ctx.sid, sequence_id=seq), timeout=10)
        assert view.num_tokens == 0  # the failed append changed nothing


def commit_past_the_appended_tokens(ctx: Ctx) -> None:
    with sequence(ctx, tokens=[1, 2]) as seq:
        for n in (3, -1):
            err = ctx.error("Commit", pb.CommitRequest(session_id=ctx.sid, sequence_id=seq, num_tokens=n))
            assert_status(err, Code.OUT_OF_RANGE, f"num_tokens={n}", "[0, 2]")


def negative_token_id(ctx: Ctx) -> None:
    with sequence(ctx) as seq:
        err = ctx.error("Append", pb.AppendRequest(session_id=ctx.sid, sequence_id=seq, token_ids=[1, 2, -5]))
        assert_status(err, Code.INVALID_ARGUMENT, "token_ids[2]=-5", "must be >= 0")
    err = ctx.error("Lookup", pb.LookupRequest(namespace="test", token_ids=[-1, 3]))
    assert_status(err, Code.INVALID_ARGUMENT, "token_ids[0]=-1", "must be >= 0")


def token_id_over_vocab_size(ctx: Ctx) -> None:
    err = ctx.error("Lookup", pb.LookupRequest(namespace="vocab", token_ids=[5, VOCAB, VOCAB + 7]))
    assert_status(err, Code.INVALID_ARGUMENT, f"token_ids[1]={VOCAB}", f"vocab_size={VOCAB}", "2 bad ids")
    with sequence(ctx, namespace="vocab") as seq:
        err = ctx.error(
            "Append", pb.AppendRequest(session_id=ctx.sid, sequence_id=seq, token_ids=[VOCAB - 1, VOCAB])
        )
        assert_status(err, Code.INVALID_ARGUMENT, f"token_ids[1]={VOCAB}", f"vocab_size={VOCAB}")
    # The same id is fine where no vocab_size is set.
    ctx.raw.kv.Lookup(pb.LookupRequest(namespace="test", token_ids=[VOCAB]), timeout=10)


def packed_token_ids(ctx: Ctx) -> None:
    def u32(ids: list[int]) -> bytes:
        return np.asarray(ids, dtype="<u4").tobytes()

    ids = [1, 2, 3, 4]
    both = dict(token_ids=ids, token_ids_u32=u32(ids))
    for method, request in [
        ("Lookup", pb.LookupRequest(namespace="test", **both)),
        ("Reserve", pb.ReserveRequest(session_id=ctx.sid, namespace="test", **both)),
        ("Put", pb.PutRequest(session_id=ctx.sid, namespace="test", **both)),
    ]:
        assert_status(ctx.error(method, request), Code.INVALID_ARGUMENT, "token_ids and token_ids_u32")
    err = ctx.error("Lookup", pb.LookupRequest(namespace="test", token_ids_u32=u32(ids)[:-1]))
    assert_status(err, Code.INVALID_ARGUMENT, "token_ids_u32 has 15 bytes", "multiple of 4")
    err = ctx.error("Lookup", pb.LookupRequest(namespace="test", token_ids_u32=u32([5, 2**31, 2**32 - 1])))
    assert_status(
        err, Code.INVALID_ARGUMENT, f"token_ids[1]={2**31}", "out of range", "<= 2147483647", "2 bad"
    )
    err = ctx.error("Lookup", pb.LookupRequest(namespace="vocab", token_ids_u32=u32([5, VOCAB, VOCAB + 7])))
    assert_status(err, Code.INVALID_ARGUMENT, f"token_ids[1]={VOCAB}", f"vocab_size={VOCAB}", "2 bad ids")
    too_many = u32(prompt(MAX_REQUEST_TOKENS + 1, 2, vocab=VOCAB))
    for method, request in [
        ("Lookup", pb.LookupRequest(namespace="test", token_ids_u32=too_many)),
        ("Reserve", pb.ReserveRequest(session_id=ctx.sid, namespace="test", token_ids_u32=too_many)),
    ]:
        err = ctx.error(method, request)
        assert_status(err, Code.RESOURCE_EXHAUSTED, f"has {MAX_REQUEST_TOKENS + 1} ids", "max_request_tokens")
    # In a batch, the bad item alone fails; the good packed one hits A's cached prefix.
    items = [
        pb.LookupRequest(namespace="test", token_ids_u32=u32(CACHED)),
        pb.LookupRequest(namespace="test", **both),
    ]
    reply = ctx.raw.kv.BatchLookup(pb.BatchLookupRequest(items=items), timeout=10)
    assert reply.items[0].reply.hit_tokens == len(CACHED)
    assert reply.items[1].status.code == Code.INVALID_ARGUMENT.value[0]
    assert "token_ids and token_ids_u32" in reply.items[1].status.message


def negative_sizes(ctx: Ctx) -> None:
    err = ctx.error("Allocate", pb.AllocateRequest(session_id=ctx.sid, namespace="test", max_tokens=-1))
    assert_status(err, Code.INVALID_ARGUMENT, "max_tokens=-1", "negative")
    err = ctx.error("Evict", pb.EvictRequest(namespace="test", bytes=-5))
    assert_status(err, Code.INVALID_ARGUMENT, "bytes=-5", "negative")
    err = ctx.error("OpenSession", pb.OpenSessionRequest(client_name="neg", lease_ttl_ms=-1))
    assert_status(err, Code.INVALID_ARGUMENT, "lease_ttl_ms=-1", "negative")


def more_ids_than_max_request_tokens(ctx: Ctx) -> None:
    too_many = prompt(MAX_REQUEST_TOKENS + 1, 2, vocab=VOCAB)
    parts = (f"has {MAX_REQUEST_TOKENS + 1} ids", f"max_request_tokens={MAX_REQUEST_TOKENS}")
    assert_status(
        ctx.error("Lookup", pb.LookupRequest(namespace="test", token_ids=too_many)),
        Code.RESOURCE_EXHAUSTED,
        "token_ids",
        *parts,
    )
    with sequence(ctx) as seq:
        err = ctx.error("Append", pb.AppendRequest(session_id=ctx.sid, sequence_id=seq, token_ids=too_many))
        assert_status(err, Code.RESOURCE_EXHAUSTED, "token_ids", *parts)
    err = ctx.error("Evict", pb.EvictRequest(namespace="test", prefix=pb.PrefixTarget(token_ids=too_many)))
    assert_status(err, Code.RESOURCE_EXHAUSTED, "prefix.token_ids", *parts)
    err = ctx.error(
        "Allocate",
        pb.AllocateRequest(session_id=ctx.sid, namespace="test", max_tokens=MAX_REQUEST_TOKENS + 1),
    )
    assert_status(
        err,
        Code.RESOURCE_EXHAUSTED,
        f"max_tokens={MAX_REQUEST_TOKENS + 1}",
        f"max_request_tokens={MAX_REQUEST_TOKENS}",
    )


def evict_more_bytes_than_the_pool(ctx: Ctx) -> None:
    pool = ctx.raw.pool("test")
    err = ctx.error("Evict", pb.EvictRequest(namespace="test", bytes=pool.nbytes + 1))
    assert_status(err, Code.INVALID_ARGUMENT, f"bytes={pool.nbytes + 1}", "over the limit", "KV bytes")


def extra_keys_over_1024_bytes(ctx: Ctx) -> None:
    extra = b"x" * 1025
    parts = ("extra_keys has 1025 bytes", "max_extra_keys_bytes=1024")
    err = ctx.error("Allocate", pb.AllocateRequest(session_id=ctx.sid, namespace="test", extra_keys=extra))
    assert_status(err, Code.INVALID_ARGUMENT, *parts)
    err = ctx.error("Lookup", pb.LookupRequest(namespace="test", token_ids=HELD, extra_keys=extra))
    assert_status(err, Code.INVALID_ARGUMENT, *parts)


def written_slot_the_sequence_does_not_own(ctx: Ctx) -> None:
    with sequence(ctx, tokens=[1, 2]) as mine, sequence(ctx, tokens=[3, 4]) as other:
        other_slot = (
            ctx.raw.kv.GetSequence(pb.GetSequenceRequest(session_id=ctx.sid, sequence_id=other), timeout=10)
            .pages[0]
            .slot
        )
        a_slot = ctx.prefixes["held"][1][0]  # a sealed page of another session's sequence
        for slot in (other_slot, a_slot, 1_000_000):
            err = ctx.error(
                "Commit",
                pb.CommitRequest(session_id=ctx.sid, sequence_id=mine, num_tokens=2, written_slots=[slot]),
            )
            assert_status(err, Code.PERMISSION_DENIED, f"slot {slot}", f"sequence {mine}")


def unknown_session_sequence_and_pin(ctx: Ctx) -> None:
    err = ctx.error("Allocate", pb.AllocateRequest(session_id=12345, namespace="test"))
    assert_status(err, Code.NOT_FOUND, "session_id=12345 does not exist")
    err = ctx.error("Append", pb.AppendRequest(session_id=ctx.sid, sequence_id=999_999_999, token_ids=[1]))
    assert_status(err, Code.NOT_FOUND, "sequence_id=999999999 does not exist")
    err = ctx.error("Release", pb.ReleaseRequest(session_id=ctx.sid, pin_id=999_999_999))
    assert_status(err, Code.NOT_FOUND, "pin_id=999999999 does not exist")


def another_sessions_sequence_and_pin(ctx: Ctx) -> None:
    seq = ctx.a_sequence
    for method, request in [
        ("Append", pb.AppendRequest(session_id=ctx.sid, sequence_id=seq, token_ids=[1, 2, 3, 4])),
        ("Commit", pb.CommitRequest(session_id=ctx.sid, sequence_id=seq, num_tokens=0)),
        ("GetSequence", pb.GetSequenceRequest(session_id=ctx.sid, sequence_id=seq)),
        ("Release", pb.ReleaseRequest(session_id=ctx.sid, sequence_id=seq)),
    ]:
        err = ctx.error(method, request)
        assert_status(err, Code.PERMISSION_DENIED, f"sequence_id={seq}", "another session")
    # A pin of our session, released from a second session.
    with ctx.kv.lookup("test", HELD, pin=True) as pin:
        other = ctx.raw.kv.OpenSession(pb.OpenSessionRequest(client_name="other"), timeout=10).session_id
        err = ctx.error("Release", pb.ReleaseRequest(session_id=other, pin_id=pin.pin_id))
        assert_status(err, Code.PERMISSION_DENIED, f"pin_id={pin.pin_id}", "another session")
        ctx.raw.kv.CloseSession(pb.CloseSessionRequest(session_id=other), timeout=10)


def request_after_the_session_ended(ctx: Ctx) -> None:
    sid = ctx.raw.kv.OpenSession(pb.OpenSessionRequest(client_name="short"), timeout=10).session_id
    ctx.raw.kv.Allocate(pb.AllocateRequest(session_id=sid, namespace="test", max_tokens=4), timeout=10)
    closed = ctx.raw.kv.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=10)
    assert closed.sequences_released == 1
    for method, request in [
        ("Allocate", pb.AllocateRequest(session_id=sid, namespace="test")),
        ("Heartbeat", pb.HeartbeatRequest(session_id=sid)),
        ("CloseSession", pb.CloseSessionRequest(session_id=sid)),
    ]:
        err = ctx.error(method, request)
        assert_status(err, Code.FAILED_PRECONDITION, f"session {sid} has ended", "closed by client")


def unset_target(ctx: Ctx) -> None:
    err = ctx.error("Release", pb.ReleaseRequest(session_id=ctx.sid))
    assert_status(err, Code.INVALID_ARGUMENT, "target is not set", "sequence_id or pin_id")
    err = ctx.error("Evict", pb.EvictRequest(namespace="test"))
    assert_status(err, Code.INVALID_ARGUMENT, "target is not set")


CASES: list[Callable[[Ctx], None]] = [
    unknown_namespace,
    allocate_more_than_the_pool,
    append_past_max_tokens,
    commit_past_the_appended_tokens,
    negative_token_id,
    token_id_over_vocab_size,
    negative_sizes,
    more_ids_than_max_request_tokens,
    packed_token_ids,
    evict_more_bytes_than_the_pool,
    extra_keys_over_1024_bytes,
    written_slot_the_sequence_does_not_own,
    unknown_session_sequence_and_pin,
    another_sessions_sequence_and_pin,
    request_after_the_session_ended,
    unset_target,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_is_refused_by_name_and_changes_nothing(served: Ctx, case: Callable[[Ctx], None]) -> None:
    case(served)
    served.assert_intact()


@pytest.mark.parametrize(
    "payload",
    [
        random.Random(7).randbytes(32 << 10),
        b"GET /kvstore.v1.KVStore/Stats HTTP/1.1\r\nHost: kvstore\r\n\r\n",
    ],
    ids=["random-bytes", "http1"],
)
def test_garbage_on_the_socket_is_dropped_and_the_daemon_serves_on(served: Ctx, payload: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(served.daemon.socket_path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)
        sock.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            while sock.recv(1 << 16):  # until the daemon hangs up
                pass
    served.assert_intact()
    # And a real request on a fresh connection still works end to end.
    assert served.kv.lookup("test", HELD).hit_tokens == len(HELD)


# Runs in its own interpreter that never imports kvstore_proto: everything it knows about
# the API comes from the daemon's reflection service.
REFLECTION_CLIENT = r"""
import json, sys
import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

target, namespace = sys.argv[1], sys.argv[2]
out = {}
with grpc.insecure_channel(target) as channel:
    db = ProtoReflectionDescriptorDatabase(channel)
    out["services"] = sorted(db.get_services())
    pool = descriptor_pool.DescriptorPool(db)
    method = pool.FindServiceByName("kvstore.v1.KVStore").methods_by_name["Lookup"]
    request_cls = message_factory.GetMessageClass(method.input_type)
    reply_cls = message_factory.GetMessageClass(method.output_type)
    lookup = channel.unary_unary(
        "/kvstore.v1.KVStore/Lookup",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=reply_cls.FromString,
    )
    calls = {
        "unknown_namespace": dict(namespace="nope", token_ids=[1, 2, 3, 4]),
        "negative_token": dict(namespace=namespace, token_ids=[1, -7]),
        "good": dict(namespace=namespace, token_ids=json.loads(sys.argv[3])),
    }
    for name, fields in calls.items():
        try:
            reply = lookup(request_cls(**fields), timeout=10)
            out[name] = {"code": "OK", "hit_tokens": reply.hit_tokens}
        except grpc.RpcError as e:
            out[name] = {"code": e.code().name, "details": e.details()}
out["imported_our_code"] = sorted(m for m in sys.modules if m.startswith(("kvstore", "kvstore_proto")))
print(json.dumps(out))
"""


def test_bad_input_sent_by_hand_through_server_reflection(served: Ctx) -> None:
    run = subprocess.run(
        [sys.executable, "-c", REFLECTION_CLIENT, served.daemon.target, "test", json.dumps(HELD)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["imported_our_code"] == []
    assert {"kvstore.v1.KVStore", "kvstore.v1.Admin", "grpc.health.v1.Health"} <= set(out["services"])
    assert out["unknown_namespace"]["code"] == "NOT_FOUND"
    assert "namespace 'nope' does not exist" in out["unknown_namespace"]["details"]
    assert out["negative_token"]["code"] == "INVALID_ARGUMENT"
    assert "token_ids[1]=-7" in out["negative_token"]["details"]
    assert out["good"] == {"code": "OK", "hit_tokens": len(HELD)}  # the same API, by hand
    served.assert_intact()


def test_health_and_reflection_list_the_services(served: Ctx) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    for service in ("", "kvstore.v1.KVStore", "kvstore.v1.Admin"):
        assert served.daemon.health(service) == SERVING, service
        assert served.kv.health(service) == "SERVING"
    stub = reflection_pb2_grpc.ServerReflectionStub(served.raw.channel)
    (reply,) = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    names = {s.name for s in reply.list_services_response.service}
    assert {"kvstore.v1.KVStore", "kvstore.v1.Admin", "grpc.health.v1.Health"} <= names
    # An unknown service is reported as such, not as serving.
    with pytest.raises(grpc.RpcError) as err:
        served.daemon.health("kvstore.v1.Nope")
    assert err.value.code() == Code.NOT_FOUND
