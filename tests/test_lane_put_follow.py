"""A put in one round trip (docs/api.md): a lane Put with bytes_follow goes out before its
pages are copied and is sealed only when the connection's PutWritten frame comes. Real daemon,
real lane frames, real pool memory: nothing is visible to another process before that frame
(the daemon has appended meanwhile: GetSequence says so), the bytes read back after it are
the ones written; a client gone before it, a late, wrong or garbage follow-up, a session ended
meanwhile and a refused Put give the credit back and leave nothing visible, each put gets one
reply and the connection stays in step (or is closed); over gRPC bytes_follow is refused; the
library pipelines its puts only where the daemon says it takes them."""

from __future__ import annotations

import asyncio
import textwrap
import time

import grpc
import kvstore_client
import kvstore_client.aio
import numpy as np
import pytest
from e2e_helpers import (
    Raw,
    Worker,
    assert_status,
    page_content_bytes,
    page_tokens_of,
    prompt,
    prompt_bytes,
    wait_until,
)
from kvstore_proto import lane as wire
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb
from test_lane import RawLane, killed_mid_call_leaks_nothing, lane_path, lane_stats

NS = "test"  # tests/daemon.py: 4 tokens a page, 64 pages
T = 4


def credit_of(lane: RawLane, sid: int, pages: int, seed: int) -> pb.Credit:
    """A credit of `pages` pages for session `sid`: a 1-page Reserve sealed asking for one."""
    code, body = lane.call(
        "Reserve",
        pb.ReserveRequest(session_id=sid, namespace=NS, token_ids=prompt(T, seed)).SerializeToString(),
    )
    assert code == grpc.StatusCode.OK, body
    seq = pb.ReserveResponse.FromString(body).sequence_id
    seal = pb.SealRequest(session_id=sid, sequence_id=seq, num_tokens=T, release=True, credit_pages=pages)
    code, body = lane.call("Seal", seal.SerializeToString())
    assert code == grpc.StatusCode.OK, body
    credit = pb.SealResponse.FromString(body).credit
    assert credit.sequence_id and len(credit.slots) == pages, credit
    return credit


def put_following(sid: int, credit: pb.Credit, tokens: list[int]) -> bytes:
    """A Put frame with bytes_follow into `credit` (one slot a page of `tokens`)."""
    pages = -(-len(tokens) // T)
    request = pb.PutRequest(
        session_id=sid,
        namespace=NS,
        token_ids=tokens,
        credit_sequence_id=credit.sequence_id,
        slots=list(credit.slots[:pages]),
        credit_pages=pages,  # (the next put's credit)
        bytes_follow=True,
    )
    return wire.request(b"Put", request.SerializeToString())


def written(page_sums: bytes = b"") -> bytes:
    return wire.request(wire.FOLLOW_UP, pb.PutWritten(page_sums=page_sums).SerializeToString())


def appended(raw: Raw, sid: int, seq: int) -> int:
    """The tokens a sequence of `sid` holds (0 once it is gone)."""
    try:
        return raw.kv.GetSequence(
            pb.GetSequenceRequest(session_id=sid, sequence_id=seq), timeout=10
        ).num_tokens
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.NOT_FOUND, err
        return 0


def wait_prepared(raw: Raw, sid: int, credit: pb.Credit, tokens: int) -> None:
    """Until the daemon has appended a Put's `tokens` to `credit` (prepared, not sealed)."""
    wait_until(
        lambda: appended(raw, sid, credit.sequence_id),
        lambda n: n == tokens,
        timeout=10,
        what=f"the Put prepared ({tokens} tokens appended to credit {credit.sequence_id})",
    )


def write_pages(kv: kvstore_client.Client, slots: list[int], data: bytes) -> None:
    """`data`, page i into slot slots[i], through this process's own mapping of the pool."""
    pool = kv.namespace(NS).pool
    size = len(data) // len(slots)
    for i, slot in enumerate(slots):
        pool.raw_page(slot).numpy()[:] = np.frombuffer(data[i * size : (i + 1) * size], dtype=np.uint8)


def put_calls(kv: kvstore_client.Client) -> int:
    """Put calls the daemon answered OK so far (the edge counts the lane's with gRPC's)."""
    return {(c.method, c.code): c.calls for c in kv.stats().rpc_calls}.get(("KVStore/Put", "OK"), 0)


def status(code: int) -> grpc.StatusCode:
    return next(c for c in grpc.StatusCode if c.value[0] == code)


def test_a_put_whose_bytes_follow_is_sealed_only_after_its_follow_up(daemon) -> None:
    tokens = prompt(3 * T, seed=301)
    with (
        kvstore_client.connect(daemon.target) as kv,
        Raw(daemon.target) as raw,
        Worker("reader") as reader,
    ):
        sid, lane = kv.session_id, RawLane(lane_path(daemon))
        reader.call("connect", target=daemon.target)
        credit = credit_of(lane, sid, 4, seed=300)
        data = prompt_bytes(tokens, kv.namespace(NS).page_shape, T)
        lane.sock.sendall(put_following(sid, credit, tokens))
        wait_prepared(raw, sid, credit, len(tokens))
        # Prepared, not sealed: another process finds nothing, though half the bytes are there.
        write_pages(kv, list(credit.slots[:1]), data[: len(data) // 3])
        assert reader.call("lookup", namespace=NS, tokens=tokens)["hit_tokens"] == 0
        write_pages(kv, list(credit.slots[:3]), data)
        lane.sock.sendall(written())
        got = lane.reply()
        assert got is not None and status(got[0]) == grpc.StatusCode.OK, got
        reply = pb.PutResponse.FromString(got[1])
        assert (reply.num_tokens, reply.sealed_pages) == (len(tokens), 3)
        assert reply.credit.sequence_id and reply.credit.sequence_id != credit.sequence_id
        assert lane_stats(daemon.target).puts_followed >= 1
        found = reader.call("lookup", namespace=NS, tokens=tokens)
        assert found["hit_tokens"] == len(tokens)
        assert found["slots"] == list(credit.slots[:3])
        assert reader.call("verify", namespace=NS, tokens=tokens, slots=found["slots"])["mismatched"] == []
        # The connection goes on: a Lookup on it answers as ever.
        code, body = lane.call("Lookup", pb.LookupRequest(namespace=NS, token_ids=tokens).SerializeToString())
        assert code == grpc.StatusCode.OK and pb.LookupResponse.FromString(body).hit_tokens == len(tokens)
        lane.close()


def test_a_client_gone_before_its_follow_up_leaves_nothing_visible_or_held(daemon) -> None:
    tokens = prompt(2 * T, seed=311)
    with kvstore_client.connect(daemon.target) as kv, Raw(daemon.target) as raw:
        sid, lane = kv.session_id, RawLane(lane_path(daemon))
        credit = credit_of(lane, sid, 2, seed=310)
        before = raw.counts(NS)
        lane.sock.sendall(put_following(sid, credit, tokens))
        wait_prepared(raw, sid, credit, len(tokens))
        write_pages(kv, list(credit.slots), prompt_bytes(tokens, kv.namespace(NS).page_shape, T))
        lane.close()  # gone mid-put: the daemon cancels the call
        wait_until(
            lambda: appended(raw, sid, credit.sequence_id),
            lambda n: n == 0,
            timeout=10,
            what="the credit released",
        )
        after = raw.counts(NS)
        assert after["pages_free"] == before["pages_free"] + 2, (before, after)
        assert after["pages_sealed"] == before["pages_sealed"]
        assert kv.lookup(NS, tokens).hit_tokens == 0


def test_a_refused_put_is_answered_after_its_follow_up_and_the_connection_stays_in_step(daemon) -> None:
    tokens = prompt(2 * T, seed=321)
    with kvstore_client.connect(daemon.target) as kv, Raw(daemon.target) as raw:
        sid, lane = kv.session_id, RawLane(lane_path(daemon))
        credit = credit_of(lane, sid, 2, seed=320)
        bad = pb.Credit(sequence_id=credit.sequence_id, slots=[credit.slots[0], credit.slots[0]])
        lane.sock.sendall(put_following(sid, bad, tokens) + written())  # both frames at once
        got = lane.reply()
        assert got is not None and status(got[0]) == grpc.StatusCode.INVALID_ARGUMENT, got
        assert b"slots[1]" in got[1] and b"given twice" in got[1]
        # The follow-up was taken by that Put (not answered on its own): the next reply is the Lookup's.
        code, body = lane.call("Lookup", pb.LookupRequest(namespace=NS, token_ids=tokens).SerializeToString())
        assert code == grpc.StatusCode.OK and pb.LookupResponse.FromString(body).hit_tokens == 0
        assert appended(raw, sid, credit.sequence_id) == 0
        # ...and the credit is still the session's, unused: a put into it now works.
        lane.sock.sendall(put_following(sid, credit, tokens))
        write_pages(kv, list(credit.slots), prompt_bytes(tokens, kv.namespace(NS).page_shape, T))
        lane.sock.sendall(written())
        got = lane.reply()
        assert got is not None and status(got[0]) == grpc.StatusCode.OK, got
        assert kv.lookup(NS, tokens).hit_tokens == len(tokens)
        # A follow-up with no Put waiting for it is answered on its own, clearly.
        code, body = lane.call(wire.FOLLOW_UP.decode(), pb.PutWritten().SerializeToString())
        assert code == grpc.StatusCode.FAILED_PRECONDITION and b"bytes_follow" in body
        lane.close()


@pytest.mark.parametrize("follow_up", ["none", "another call", "garbage", "bad sums"])
def test_a_late_wrong_or_garbage_follow_up_fails_the_put_and_gives_its_credit_back(
    daemon_factory, follow_up: str
) -> None:
    d = daemon_factory(server={"lane_follow_up_timeout_s": 0.5}).start()
    tokens = prompt(2 * T, seed=331)
    with kvstore_client.connect(d.target) as kv, Raw(d.target) as raw:
        sid, lane = kv.session_id, RawLane(lane_path(d))
        credit = credit_of(lane, sid, 2, seed=330)
        before = raw.counts(NS)
        t0 = time.monotonic()
        lane.sock.sendall(put_following(sid, credit, tokens))
        write_pages(kv, list(credit.slots), prompt_bytes(tokens, kv.namespace(NS).page_shape, T))
        if follow_up == "another call":
            lane.sock.sendall(wire.request(b"Lookup", pb.LookupRequest(namespace=NS).SerializeToString()))
        elif follow_up == "garbage":
            lane.sock.sendall(wire.request(wire.FOLLOW_UP, b"\xff\xff\xff\xff"))
        elif follow_up == "bad sums":
            lane.sock.sendall(written(b"\x00" * 5))
        got = lane.reply()
        assert got is not None
        want = {
            "none": (grpc.StatusCode.DEADLINE_EXCEEDED, b"lane_follow_up_timeout_s=0.5"),
            "another call": (grpc.StatusCode.INVALID_ARGUMENT, b"'Lookup'"),
            "garbage": (grpc.StatusCode.INVALID_ARGUMENT, b"not a valid kvstore.v1.PutWritten"),
            "bad sums": (grpc.StatusCode.INVALID_ARGUMENT, b"page_sums has 5 bytes"),
        }[follow_up]
        assert status(got[0]) == want[0] and want[1] in got[1], got
        if follow_up == "none":  # (answered at the timeout, not at once: libuv's timers are ms-grained)
            assert time.monotonic() - t0 >= 0.45
        if follow_up in ("none", "another call"):
            assert lane.reply() is None  # the framing is lost: the daemon closed the connection
        else:  # a follow-up it could not take is still that Put's: the connection goes on
            code, _ = lane.call(
                "Lookup", pb.LookupRequest(namespace=NS, token_ids=tokens).SerializeToString()
            )
            assert code == grpc.StatusCode.OK
        lane.close()
        assert appended(raw, sid, credit.sequence_id) == 0  # the credit released
        wait_until(
            lambda: raw.counts(NS),
            lambda c: c["pages_free"] == before["pages_free"] + 2,
            timeout=10,
            what="the credit's pages freed",
        )
        assert raw.counts(NS)["pages_sealed"] == before["pages_sealed"]
        assert kv.lookup(NS, tokens).hit_tokens == 0


def test_a_session_ended_before_the_follow_up_fails_the_put_and_seals_nothing(daemon) -> None:
    tokens = prompt(2 * T, seed=341)
    with kvstore_client.connect(daemon.target) as kv, Raw(daemon.target) as raw:
        before = raw.counts(NS)
        opened = raw.kv.OpenSession(
            pb.OpenSessionRequest(client_name="ended", lease_ttl_ms=60_000), timeout=10
        )
        sid, lane = opened.session_id, RawLane(lane_path(daemon))
        assert opened.lane_put_follow  # this daemon takes them (a client checks before it sends one)
        credit = credit_of(lane, sid, 2, seed=340)
        lane.sock.sendall(put_following(sid, credit, tokens))
        wait_prepared(raw, sid, credit, len(tokens))
        write_pages(kv, list(credit.slots), prompt_bytes(tokens, kv.namespace(NS).page_shape, T))
        raw.kv.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=10)
        lane.sock.sendall(written())
        got = lane.reply()
        assert got is not None and status(got[0]) == grpc.StatusCode.FAILED_PRECONDITION, got
        assert b"has ended" in got[1]
        lane.close()
        assert kv.lookup(NS, tokens).hit_tokens == 0
        after = raw.counts(NS)
        # The session's first Reserve sealed one page; its credit went with the session.
        assert after["pages_sealed"] == before["pages_sealed"] + 1
        assert after["pages_free"] == before["pages_free"] - 1


def test_bytes_follow_over_grpc_is_refused_and_changes_nothing(daemon) -> None:
    tokens = prompt(T, seed=351)
    with kvstore_client.connect(daemon.target) as kv, Raw(daemon.target) as raw:
        sid, lane = kv.session_id, RawLane(lane_path(daemon))
        credit = credit_of(lane, sid, 1, seed=350)
        request = pb.PutRequest(
            session_id=sid,
            namespace=NS,
            token_ids=tokens,
            credit_sequence_id=credit.sequence_id,
            slots=[credit.slots[0]],
            bytes_follow=True,
        )
        assert_status(raw.error("Put", request), grpc.StatusCode.INVALID_ARGUMENT, "bytes_follow", "lane")
        assert appended(raw, sid, credit.sequence_id) == 0
        request.bytes_follow = False  # the same credit, unused still: the classic put takes it
        assert raw.kv.Put(request, timeout=10).sealed_pages == 1
        lane.close()


def test_the_library_pipelines_its_puts_where_the_daemon_takes_them(daemon, monkeypatch) -> None:
    with kvstore_client.connect(daemon.target) as kv, Worker("reader") as reader:
        assert kv.lane and kv.lane_put_follow and kv.pipelines_puts
        reader.call("connect", target=daemon.target)
        sums_before = kv.stats(NS).namespaces[0].pages_sums_given
        calls_before, followed_before = put_calls(kv), lane_stats(daemon.target).puts_followed
        for i, pages in enumerate((2, 2, 2, 1)):  # the first gets a credit (Reserve, Seal); the rest Put
            tokens = prompt(pages * T, seed=360 + i)
            r = kv.put(NS, tokens, prompt_bytes(tokens, kv.namespace(NS).page_shape, T))
            assert r.written_pages == pages
            found = reader.call("lookup", namespace=NS, tokens=tokens)
            assert found["hit_tokens"] == pages * T
            assert (
                reader.call("verify", namespace=NS, tokens=tokens, slots=found["slots"])["mismatched"] == []
            )
        assert put_calls(kv) == calls_before + 3  # one a put but the first (Reserve, Seal)
        assert lane_stats(daemon.target).puts_followed == followed_before + 3  # each sent before its copy
        # The page sums came in the follow-up frames (the daemon checksums pages: docs/security.md).
        assert kv.stats(NS).namespaces[0].pages_sums_given == sums_before + 5
    monkeypatch.setenv("KVSTORE_PUT_FOLLOW", "0")
    followed = lane_stats(daemon.target).puts_followed
    with kvstore_client.connect(daemon.target) as kv:
        assert kv.lane and not kv.pipelines_puts
        tokens = prompt(2 * T, seed=369)
        kv.put(NS, tokens, prompt_bytes(tokens, kv.namespace(NS).page_shape, T))
        kv.put(NS, prompt(T, seed=370), prompt_bytes(prompt(T, seed=370), kv.namespace(NS).page_shape, T))
        assert kv.get(NS, tokens).hit_tokens == 2 * T
    assert lane_stats(daemon.target).puts_followed == followed  # copied first, then Put
    with kvstore_client.connect(daemon.target, lane=False) as kv:
        assert not kv.pipelines_puts


KILLED_MID_COPY = textwrap.dedent(
    """
    import sys, kvstore_client
    from e2e_helpers import page_content_bytes, page_tokens_of, prompt
    kv = kvstore_client.connect(sys.argv[1], client_name="killed")
    assert kv.pipelines_puts
    ns = kv.namespace("test")
    print("ready", flush=True)
    i = 0
    while True:  # a fresh 2-page prompt a put, each sent before its copy, until SIGKILL
        tokens = prompt(8, seed=5000 + i)
        kv.put(ns, tokens, b"".join(page_content_bytes(p, page_tokens_of(tokens, p, 4), ns.page_shape) for p in range(2)))
        i += 1
    """
)


def test_a_client_killed_while_its_puts_follow_leaks_nothing_and_no_page_has_wrong_bytes(daemon) -> None:
    killed_mid_call_leaks_nothing(daemon, KILLED_MID_COPY, lambda s: s.calls >= 300)
    with kvstore_client.connect(daemon.target) as kv:
        ns = kv.namespace(NS)
        hits = 0
        for i in range(2000):  # every prompt it may have put: what is found has the bytes written
            tokens = prompt(2 * T, seed=5000 + i)
            found = kv.lookup(NS, tokens)
            for p, slot in enumerate(found.slots):
                want = page_content_bytes(p, page_tokens_of(tokens, p, T), ns.page_shape)
                assert ns.pool.raw_page(slot).numpy().tobytes() == want, (i, p, slot)
            hits += len(found.slots)
        assert hits > 0  # (the pool keeps the last ~60 pages it sealed)


def test_the_asyncio_client_pipelines_its_puts_too(daemon, monkeypatch) -> None:
    prompts = [prompt(2 * T, seed=380 + i) for i in range(4)]

    async def main(follow: bool) -> tuple[int, int]:
        async with kvstore_client.aio.connect(daemon.target, client_name="aio-follow") as kv:
            assert kv.lane and kv.pipelines_puts == follow
            shape = (await kv.namespace(NS)).page_shape
            before = (
                (await kv.stats(NS)).namespaces[0].pages_sums_given,
                lane_stats(daemon.target).puts_followed,
            )
            for tokens in prompts:  # the first Reserve + Seal, then a Put each into the credit
                assert (await kv.put(NS, tokens, prompt_bytes(tokens, shape, T))).written_pages == 2
            sums = (await kv.stats(NS)).namespaces[0].pages_sums_given - before[0]
            return sums, lane_stats(daemon.target).puts_followed - before[1]

    sums, followed = asyncio.run(main(True))
    assert followed == len(prompts) - 1  # each Put into the credit sent before its copy
    assert sums == 2 * followed  # and the page sums came in its follow-up frame
    with Worker("reader") as reader:  # another process reads the bytes the asyncio client put
        reader.call("connect", target=daemon.target)
        for tokens in prompts:
            found = reader.call("lookup", namespace=NS, tokens=tokens)
            assert found["hit_tokens"] == 2 * T
            assert (
                reader.call("verify", namespace=NS, tokens=tokens, slots=found["slots"])["mismatched"] == []
            )
    monkeypatch.setenv("KVSTORE_PUT_FOLLOW", "0")
    prompts = [prompt(2 * T, seed=390 + i) for i in range(2)]
    assert asyncio.run(main(False)) == (2, 0)  # one Put, copied first: its sums in the request
