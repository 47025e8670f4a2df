"""Quotas (issue 19, item 5), end to end: a real daemon with tokens, real gRPC. Each quota hit
is RESOURCE_EXHAUSTED naming the quota and its limit, counted in Stats; nothing stored is
lost, the daemon goes on serving, other clients are not affected. And a namespace deleted
(admin scope) gives back everything it held."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import kvstore_client
import pytest
from auth_helpers import call, write_tokens
from daemon import SMALL_NAMESPACE, DaemonProcess
from kvstore_client.errors import NotFound, PermissionDenied, ResourceExhausted
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

KV, AD = "/kvstore.v1.KVStore/", "/kvstore.v1.Admin/"
T = SMALL_NAMESPACE["page_tokens"]
HOSTILE = "hostile-secret-0123456789"
OTHER = "other-secret-0123456789-x"
OPS = "ops-secret-0123456789-ops"
TOKENS = {
    "hostile": (HOSTILE, {"a": ["read", "write"], "b": ["read", "write"]}),
    "other": (OTHER, {"a": ["read", "write"], "b": ["read", "write"]}),
    "ops": (OPS, {"*": ["read", "write", "admin"]}),
}
PER_CLIENT = 4
SESSION_PAGES = 4
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
GEOMETRY = {k: v for k, v in SMALL_NAMESPACE.items() if k != "name"}
POOL = 64 * 4096  # SMALL_NAMESPACE's pool: 64 pages of a 4 KiB stride


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tokens = write_tokens(tmp_path_factory.mktemp("quotas") / "tokens.toml", TOKENS)
    server = {
        "tokens_file": tokens,
        "max_sessions_per_client": PER_CLIENT,
        "lease_ttl_s": 60.0,  # the raw sessions below send no keep-alives
        "max_request_tokens": 64,
        "max_pool_bytes": 2 * POOL + POOL // 2,  # "a" and "b" fit; a third pool does not
    }
    namespaces = [
        SMALL_NAMESPACE | {"name": "a", "max_session_pages": SESSION_PAGES},
        SMALL_NAMESPACE | {"name": "b"},
    ]
    with DaemonProcess(server=server, namespaces=namespaces).start() as d:
        yield d


def _open(ch: grpc.Channel, token: str) -> tuple[grpc.StatusCode, str, int]:
    fn = ch.unary_unary(
        KV + "OpenSession",
        request_serializer=pb.OpenSessionRequest.SerializeToString,
        response_deserializer=pb.OpenSessionResponse.FromString,
    )
    try:
        reply = fn(pb.OpenSessionRequest(client_name="x"), metadata=(("authorization", f"Bearer {token}"),))
    except grpc.RpcError as e:
        return e.code(), e.details(), 0
    return grpc.StatusCode.OK, "", reply.session_id


def _pool_of(daemon: DaemonProcess, namespace: str) -> list[str]:
    """The daemon's open descriptors and mappings of namespace's pool (a memfd named after it;
    only root may read the /proc entries of a daemon that is not dumpable)."""
    pid = daemon.proc.pid
    fds = [os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")]
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return [x for x in fds + maps if f".{namespace} (deleted)" in x and "/memfd:" in x]


def _refused(kv: kvstore_client.Client) -> dict[str, int]:
    return kv.stats().quotas.refused


def test_a_hostile_client_opening_sessions_is_refused_while_another_still_can(daemon) -> None:
    with grpc.insecure_channel(daemon.target) as ch, kvstore_client.connect(daemon.target, token=OPS) as ops:
        before = _refused(ops).get("max_sessions_per_client", 0)
        opened = []
        for _ in range(PER_CLIENT * 3):  # it keeps trying
            code, details, sid = _open(ch, HOSTILE)
            if code != grpc.StatusCode.OK:
                break
            opened.append(sid)
        assert len(opened) == PER_CLIENT
        assert code == EXHAUSTED
        assert details == (
            f"token 'hostile' has {PER_CLIENT} sessions open; the quota is "
            f"max_sessions_per_client={PER_CLIENT} (close one, or end a session that leaked)"
        )
        # Another client opens and works; the hostile one's sessions still serve it.
        with kvstore_client.connect(daemon.target, token=OTHER) as other:
            data = bytes(range(256)) * (other.namespace("b").pool.page_bytes // 256) * 2
            other.put("b", list(range(2 * T)), data)
            assert bytes(other.get("b", list(range(2 * T))).data.numpy()) == data
        for sid in opened:
            assert (
                call(ch, KV + "Heartbeat", pb.HeartbeatRequest(session_id=sid), HOSTILE)[0]
                == grpc.StatusCode.OK
            )
        # Closing one gives its place back.
        assert call(ch, KV + "CloseSession", pb.CloseSessionRequest(session_id=opened.pop()), HOSTILE)[0] == (
            grpc.StatusCode.OK
        )
        code, _, sid = _open(ch, HOSTILE)
        assert code == grpc.StatusCode.OK
        opened.append(sid)
        stats = ops.stats()
        assert stats.quotas.max_sessions_per_client == PER_CLIENT
        assert stats.quotas.refused["max_sessions_per_client"] == before + 1
        for sid in opened:
            call(ch, KV + "CloseSession", pb.CloseSessionRequest(session_id=sid), HOSTILE)


def test_without_tokens_a_client_is_its_process(daemon_factory) -> None:
    d = daemon_factory(server={"max_sessions_per_client": 2}).start()
    fn = None
    with grpc.insecure_channel(d.target) as ch:
        fn = ch.unary_unary(
            KV + "OpenSession",
            request_serializer=pb.OpenSessionRequest.SerializeToString,
            response_deserializer=pb.OpenSessionResponse.FromString,
        )
        for _ in range(2):
            fn(pb.OpenSessionRequest(client_name="w", client_pid=4242))
        with pytest.raises(grpc.RpcError) as e:
            fn(pb.OpenSessionRequest(client_name="w", client_pid=4242))
        assert e.value.code() == EXHAUSTED
        assert "pid 4242 has 2 sessions open; the quota is max_sessions_per_client=2" in e.value.details()
        assert fn(pb.OpenSessionRequest(client_name="w", client_pid=4243)).session_id


def test_a_session_holds_at_most_its_page_quota_and_a_refusal_changes_nothing(daemon) -> None:
    with (
        kvstore_client.connect(daemon.target, token=HOSTILE) as hog,
        kvstore_client.connect(daemon.target, token=OTHER) as other,
        kvstore_client.connect(daemon.target, token=OPS) as ops,
    ):
        stored = list(range(500, 500 + 3 * T))
        data = bytes((i * 7) % 251 for i in range(other.namespace("a").pool.page_bytes * 3))
        other.put("a", stored, data)
        before = ops.stats("a").namespaces[0]
        assert before.max_session_pages == SESSION_PAGES
        seq = hog.allocate("a")
        seq.append(list(range(3 * T)))  # 3 of its 4 pages
        more = hog.allocate("a")
        with pytest.raises(ResourceExhausted) as e:
            more.append(list(range(100, 100 + 2 * T)))
        assert str(e.value) == (
            f"RESOURCE_EXHAUSTED: namespace 'a': session {hog.session_id} holds 3 pages and append of "
            f"{2 * T} tokens needs 2 more; the quota is max_session_pages={SESSION_PAGES} "
            "(release a sequence or a pin first)"
        )
        with pytest.raises(ResourceExhausted, match=f"max_session_pages={SESSION_PAGES}"):
            hog.allocate("a", max_tokens=2 * T)
        with pytest.raises(
            ResourceExhausted,
            match=f"a pinned lookup of 3 pages needs 3 more; the quota is max_session_pages={SESSION_PAGES}",
        ):
            hog.lookup("a", stored, pin=True)
        # Nothing changed: its sequences as they were, the stored prompt whole, the pool the same.
        assert seq.refresh().num_tokens == 3 * T and more.refresh().num_tokens == 0
        after = ops.stats("a").namespaces[0]
        assert after.pages_reserved == before.pages_reserved + 3
        assert after.session_pages_refused == before.session_pages_refused + 3
        assert bytes(other.get("a", stored).data.numpy()) == data
        # Within its quota it goes on; and other sessions have theirs.
        more.append(list(range(100, 100 + T)))
        seq.release()
        pin = hog.lookup("a", stored, pin=True)
        assert pin.hit_tokens == 3 * T
        pin.release()
        with kvstore_client.connect(daemon.target, token=OTHER) as fresh:
            fresh.allocate("a", max_tokens=SESSION_PAGES * T).release()
        assert ops.stats().quotas.refused["max_session_pages"] >= 3


def test_tokens_per_request_and_pool_bytes_and_delete_gives_everything_back(daemon) -> None:
    with (
        kvstore_client.connect(daemon.target, token=OTHER) as kv,
        kvstore_client.connect(daemon.target, token=OPS) as ops,
        grpc.insecure_channel(daemon.target) as ch,
    ):
        refused = _refused(ops)
        with pytest.raises(
            ResourceExhausted, match="token_ids has 65 ids; the quota is max_request_tokens=64"
        ):
            kv.lookup("b", list(range(65)))
        with pytest.raises(ResourceExhausted, match="max_tokens=65: the quota is max_request_tokens=64"):
            kv.allocate("b", max_tokens=65)
        assert _refused(ops)["max_request_tokens"] == refused.get("max_request_tokens", 0) + 2
        # A third pool would pass max_pool_bytes, whoever asks.
        with pytest.raises(ResourceExhausted, match=r"the quota max_pool_bytes=\d+"):
            ops.create_namespace("c", **GEOMETRY)
        # A token without admin cannot delete a namespace.
        epoch = kv.namespace("b").epoch
        code, details = call(
            ch, AD + "DeleteNamespace", pb.DeleteNamespaceRequest(namespace="b", pool_epoch=epoch), OTHER
        )
        assert (code, details) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "DeleteNamespace needs the admin scope on namespace 'b'; token 'other' does not have it",
        )
        with pytest.raises(PermissionDenied):
            kv.delete_namespace("b", force=True)
        # The other tenant holds a sequence, a put's credit and a pin in "b": deleted with force,
        # all of it is released, its pool unlinked, its bytes counted out of max_pool_bytes.
        data = bytes(range(256)) * (kv.namespace("b").pool.page_bytes // 256) * 2
        kv.put("b", list(range(2 * T)), data)
        seq = kv.allocate("b")
        seq.append(list(range(3 * T)))
        pin = kv.lookup("b", list(range(2 * T)), pin=True)
        readable = os.getuid() == 0  # (the daemon is not dumpable: only root reads its /proc entries)
        assert not readable or _pool_of(daemon, "b")
        gone = ops.delete_namespace("b", force=True)
        assert (gone.sequences_released, gone.pins_released) >= (1, 1)
        assert not readable or _pool_of(daemon, "b") == []  # neither open nor mapped any more
        with pytest.raises(NotFound):
            seq.refresh()
        assert kv.heartbeat() > 0  # its session lives on
        assert all(
            s.sequences == 0 and s.pins == 0 for s in ops.list_sessions() if s.session_id == kv.session_id
        )
        with pytest.raises(NotFound):
            pin.release()
        c = ops.create_namespace("c", **GEOMETRY)  # the room "b" took is free again
        assert c.pool.num_pages == SMALL_NAMESPACE["num_pages"]
        assert [ns.name for ns in ops.list_namespaces()] == ["a", "c"]


def test_a_deleted_namespaces_tier_pages_are_not_found_by_the_next_one_of_its_name(
    daemon_factory, tmp_path
) -> None:
    """Deleted, then created again under the same name (the default salt is the name's): its
    pages in the host and disk tiers belong to the deleted namespace, maybe another tenant's."""
    disk = tmp_path / "disk"
    server = {"host_tier_bytes": "1MiB", "disk_tier_dir": str(disk)}
    d = daemon_factory(server=server, namespaces=[SMALL_NAMESPACE | {"name": "b"}]).start()
    prompt = list(range(700, 700 + 2 * T))
    with kvstore_client.connect(d.target) as kv:
        data = bytes(range(256)) * (kv.namespace("b").pool.page_bytes // 256) * 2
        kv.put("b", prompt, data)
        kv.evict("b", all=True)  # demoted to the host tier
        kv.flush()  # and written to disk
        assert [p.verdict for p in kv.explain("b", prompt).pages] == [pb.HIT_HOST] * 2
        tiers = kv.stats().tiers
        assert tiers.host_pages >= 2 and tiers.disk_pages >= 2
        kv.delete_namespace("b")
        kv.create_namespace("b", **GEOMETRY)
        kv.flush()  # (queued after the deletions: they are committed once it returns)
        assert kv.lookup("b", prompt).hit_tokens == 0
        tiers = kv.stats().tiers
        assert (tiers.host_pages, tiers.disk_pages) == (0, 0)
