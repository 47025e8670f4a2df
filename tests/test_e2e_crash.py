"""A client process that dies with `kill -9` leaks nothing in the daemon.

The victim holds every kind of thing a session can hold: a static preallocation
(Allocate max_tokens>0), an uncommitted sequence with reserved pages, a committed sequence
(its sealed pages pinned by the sequence) and a lookup pin. Then it is SIGKILLed: no
handler runs, no CloseSession is sent.

- With the client library, the KeepAlive stream breaks with the socket and the daemon ends
  the session at once: far sooner than the victim's 60 s lease.
- With raw stubs and no stream, only the lease can end it: the reaper does, one lease
  after the last request, not before.

Everything is observed through Stats (pages_reserved, pages_pinned, sessions) polled with
a deadline, the daemon's log, and /dev/shm (empty) once the daemon stops.
"""

from __future__ import annotations

import contextlib
import time

import grpc
import kvstore_client
import torch
from daemon import DaemonProcess
from e2e_helpers import Raw, Worker, int_field, page_content, page_tokens_of, prompt, wait_until
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

NS = "test"  # tests/daemon.py: 4 tokens a page, 64 pages
T = 4
TOTAL = 64
SHARED = prompt(16, seed=30)  # 4 pages another client committed; the victim pins them


def commit_shared_prefix(target: str) -> None:
    """Seal SHARED with a short-lived client of the test process (then it closes)."""
    with kvstore_client.connect(target, client_name="setup") as kv, kv.allocate(NS) as seq:
        res = seq.append(SHARED)
        for p in res.writable_pages:
            seq.namespace.page(p.slot).copy_(
                page_content(p.index, page_tokens_of(SHARED, p.index, T), seq.namespace.page_shape)
            )
        seq.commit()


def released(counts: dict[str, int]) -> bool:
    return counts["pages_reserved"] == 0 and counts["pages_pinned"] == 0 and counts["sessions"] == 0


def test_kill_9_of_a_client_frees_everything_at_once_via_the_keepalive_stream(daemon: DaemonProcess) -> None:
    commit_shared_prefix(daemon.target)
    with Worker("victim") as victim, Raw(daemon.target) as raw:
        session = victim.call("connect", target=daemon.target, client_name="victim", lease_ttl_s=60)
        assert session["lease_ttl_s"] == 60
        static = victim.call("allocate", namespace=NS, max_tokens=20)
        assert static["reserved_pages"] == 5
        open_seq = victim.call("allocate", namespace=NS)
        victim.call("append", sequence_id=open_seq["sequence_id"], tokens=prompt(10, seed=31))  # 3 pages
        victim.call("write_prompt", namespace=NS, tokens=prompt(8, seed=32))  # 2 sealed, held
        pin = victim.call("lookup", namespace=NS, tokens=SHARED, pin=True)
        assert pin["hit_tokens"] == 16 and pin["pin_id"]

        holding = raw.counts(NS)
        assert holding["pages_reserved"] == 5 + 3
        assert holding["pages_pinned"] == 2 + 4
        assert holding["pages_sealed"] == 2 + 4
        assert holding["sessions"] == 1
        (info,) = raw.admin.ListSessions(pb.ListSessionsRequest(), timeout=10).sessions
        assert info.stream_attached and info.sequences == 3 and info.pins == 1

        killed_at = time.monotonic()
        victim.kill()
        after = wait_until(
            lambda: raw.counts(NS),
            released,
            timeout=10,  # far below the victim's 60 s lease: the stream break ends the session
            what="the killed client's pages to be freed and unpinned",
        )
        assert time.monotonic() - killed_at < 10
        assert f"session {session['session_id']} ended (keep-alive stream broke)" in daemon.stderr_text()

        # Reserved pages went back to the free list; sealed ones stay cached, unpinned.
        assert after["pages_sealed"] == 6
        assert after["pages_free"] == TOTAL - 6
        assert after["sequences"] == 0

    # A client that still maps the pool reads the shared prefix intact, and keeps its mapping
    # while the daemon stops: the daemon's pool is freed anyway (the memory stays mapped here).
    with kvstore_client.connect(daemon.target, client_name="bystander") as kv, kv.lookup(NS, SHARED) as hit:
        assert hit.hit_tokens == 16
        for i, view in enumerate(hit.views()):
            assert torch.equal(view, page_content(i, page_tokens_of(SHARED, i, T), view.shape))
        assert daemon.terminate() == 0, daemon.stderr_text()
        assert "closed pool memfd" in daemon.stderr_text()
        assert daemon.shm_segments() == []
        for i, view in enumerate(hit.views()):
            assert torch.equal(view, page_content(i, page_tokens_of(SHARED, i, T), view.shape))


def test_kill_9_of_a_client_without_a_stream_is_cleaned_up_by_lease_expiry(daemon: DaemonProcess) -> None:
    commit_shared_prefix(daemon.target)
    ttl_s = 1.5
    with Worker("victim", client=False) as victim, Raw(daemon.target) as raw:

        def rpc(method: str, **request: object) -> dict:
            return victim.call("raw", target=daemon.target, method=method, request=request)

        sid = int_field(
            rpc("OpenSession", client_name="raw-victim", lease_ttl_ms=int(ttl_s * 1000)), "session_id"
        )
        assert rpc("Allocate", session_id=sid, namespace=NS, max_tokens=8)["reserved_pages"] == 2
        seq = int_field(rpc("Allocate", session_id=sid, namespace=NS), "sequence_id")
        rpc("Append", session_id=sid, sequence_id=seq, token_ids=prompt(6, seed=33))  # 2 pages
        last_request_at = time.monotonic()
        pinned = rpc("Lookup", session_id=sid, namespace=NS, token_ids=SHARED, pin=True)
        assert pinned["hit_tokens"] == 16

        (info,) = raw.admin.ListSessions(pb.ListSessionsRequest(), timeout=10).sessions
        assert not info.stream_attached  # nothing but the lease holds this session
        victim.kill()

        now = raw.counts(NS)
        if time.monotonic() - last_request_at < ttl_s:
            # The lease was renewed by the last request less than a lease ago: a dropped
            # connection alone must not end a session that has no stream.
            assert now["sessions"] == 1 and now["pages_reserved"] == 4 and now["pages_pinned"] == 4, now
        after = wait_until(
            lambda: raw.counts(NS),
            released,
            timeout=ttl_s + 5,
            what=f"the lease reaper to end the dead client's session (lease {ttl_s}s)",
        )
        assert time.monotonic() - last_request_at >= ttl_s, "the session ended before its lease ran out"
        assert f"session {sid} ended (lease expired)" in daemon.stderr_text()
        assert after["pages_free"] == TOTAL - 4
        assert after["pages_sealed"] == 4
        assert after["sequences"] == 0

        # A request on the dead session is refused, saying why it ended.
        err = raw.error("Heartbeat", pb.HeartbeatRequest(session_id=sid))
        assert "lease expired" in err.details()

    assert daemon.terminate() == 0
    assert daemon.shm_segments() == []


def test_a_tiny_lease_is_refused_and_the_shortest_one_streams_gently(daemon: DaemonProcess) -> None:
    with Raw(daemon.target) as raw:
        err = raw.error("OpenSession", pb.OpenSessionRequest(client_name="tiny", lease_ttl_ms=1))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (
            "lease_ttl_ms=1 is too short: it must be 0 (the daemon's default) or at least 500"
            in err.details()
        )

        opened = raw.kv.OpenSession(pb.OpenSessionRequest(client_name="short", lease_ttl_ms=500), timeout=10)
        stream = raw.kv.KeepAlive(pb.KeepAliveRequest(session_id=opened.session_id), timeout=1.0)
        events = 0
        with contextlib.suppress(grpc.RpcError):  # DEADLINE_EXCEEDED ends the 1 s window
            for _ in stream:
                events += 1
        # One event on attach, then one every lease/3: a handful a second, not thousands.
        assert 2 <= events <= 30, f"{events} KeepAlive events in 1 s for a session with lease_ttl_ms=500"
