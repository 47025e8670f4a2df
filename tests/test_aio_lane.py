"""The asyncio client on the lane (`kvstore_client.aio_lane`, docs/api.md "The lane"). Real
daemon, real sockets: what an asyncio client puts on the lane another process reads back byte
for byte, with concurrent calls each on a connection of its own (counted by the daemon); the
lane off leaves its calls on gRPC; the daemon's refusals come back as gRPC's would; a call
cancelled at any point, one past its deadline and one to a hung daemon close their connection
and leave the client working and nothing held; shutdown answers UNAVAILABLE."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import textwrap

import kvstore_client
import numpy as np
import pytest
from e2e_helpers import Raw, Worker, prompt, prompt_bytes, wait_until
from kvstore_client import aio_lane
from kvstore_client.errors import DeadlineExceeded, InvalidArgument, Unavailable
from test_lane import killed_mid_call_leaks_nothing, lane_stats

NS = "test"  # tests/daemon.py: 4 tokens a page, 64 pages
T = 4


def test_an_asyncio_client_uses_the_lane_one_connection_a_call_in_flight(daemon) -> None:
    tokens = prompt(3 * T, seed=71)

    async def main() -> tuple[list[bytes], bytes, int]:
        async with kvstore_client.aio.connect(daemon.target, client_name="aio-lane") as kv:
            assert kv.lane
            want = prompt_bytes(tokens, (await kv.namespace(NS)).page_shape, T)
            before = lane_stats(daemon.target)
            await kv.put(NS, tokens, want)  # Reserve + Seal
            assert lane_stats(daemon.target).calls == before.calls + 2
            hits = await asyncio.gather(*(kv.get(NS, tokens) for _ in range(8)))
            after = lane_stats(daemon.target)
            assert after.calls == before.calls + 2 + 8
            # 8 calls in flight at once: a connection each (the one from open() reused), kept
            # for the next calls; none opened for calls made one at a time after them.
            assert before.connections + 1 < after.connections <= before.connections + 8
            for _ in range(4):
                assert (await kv.get(NS, tokens)).hit_tokens == 3 * T
            assert lane_stats(daemon.target).connections == after.connections
            return [h.data.numpy().tobytes() for h in hits], want, after.open

    got, want, was_open = asyncio.run(main())
    assert got == [want] * 8
    assert was_open >= 2
    wait_until(lambda: lane_stats(daemon.target).open, lambda n: n == 0, timeout=10, what="lane closed")
    with Worker("reader") as reader:  # another process reads the bytes the asyncio client put
        reader.call("connect", target=daemon.target)
        found = reader.call("lookup", namespace=NS, tokens=tokens)
        assert found["hit_tokens"] == 3 * T
        assert reader.call("verify", namespace=NS, tokens=tokens, slots=found["slots"])["mismatched"] == []


def test_the_lane_off_leaves_an_asyncio_clients_calls_on_grpc(daemon, monkeypatch) -> None:
    tokens = prompt(2 * T, seed=72)

    async def main(**kw) -> bool:
        async with kvstore_client.aio.connect(daemon.target, **kw) as kv:
            await kv.put(NS, tokens, prompt_bytes(tokens, (await kv.namespace(NS)).page_shape, T))
            assert (await kv.get(NS, tokens)).hit_tokens == 2 * T
            return kv.lane

    assert asyncio.run(main(lane=False)) is False
    monkeypatch.setenv("KVSTORE_LANE", "0")
    assert asyncio.run(main()) is False
    assert lane_stats(daemon.target).calls == 0 and lane_stats(daemon.target).connections == 0
    monkeypatch.delenv("KVSTORE_LANE")
    assert asyncio.run(main()) is True
    assert lane_stats(daemon.target).calls > 0


def test_a_refusal_on_the_lane_is_the_one_grpc_gives(daemon) -> None:
    async def refused(lane: bool) -> tuple[str, str]:
        async with kvstore_client.aio.connect(daemon.target, lane=lane) as kv:
            assert kv.lane is lane
            with pytest.raises(InvalidArgument) as err:
                await kv.get("small-vocab", [5, 999])  # 999 is not a token of this namespace
            return type(err.value).__name__, str(err.value)

    with kvstore_client.connect(daemon.target) as admin:
        admin.create_namespace(
            "small-vocab", num_layers=1, num_kv_heads=1, head_dim=8, dtype="float16",
            page_tokens=T, num_pages=8, vocab_size=100,
        )  # fmt: skip
    on_lane, on_grpc = asyncio.run(refused(True)), asyncio.run(refused(False))
    assert on_lane == on_grpc and "999" in on_lane[1], (on_lane, on_grpc)


def test_calls_cancelled_at_any_point_leave_the_client_working_and_nothing_held(daemon) -> None:
    tokens = prompt(2 * T, seed=73)

    async def main() -> tuple[int, int]:
        async with kvstore_client.aio.connect(daemon.target) as kv:
            shape = (await kv.namespace(NS)).page_shape
            want = prompt_bytes(tokens, shape, T)
            out = np.zeros(len(want), dtype=np.uint8)  # (a copy-out get's buffer)
            await kv.put(NS, tokens, want)
            cancelled = 0
            for turns in range(40):  # cancelled after 0, 1, 2, ... turns of the loop
                task = asyncio.ensure_future(kv.get(NS, tokens, out))
                for _ in range(turns):
                    await asyncio.sleep(0)
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    cancelled += 1
                # whatever became of it, the next call gets the right bytes
                out[:] = 0
                assert (await kv.get(NS, tokens, out)).hit_tokens == 2 * T
                assert out.tobytes() == want
            # ...and puts cancelled the same way: the next put still seals its pages
            for turns in range(0, 40, 4):
                more = prompt(T, seed=1000 + turns)
                task = asyncio.ensure_future(kv.put(NS, more, prompt_bytes(more, shape, T)))
                for _ in range(turns):
                    await asyncio.sleep(0)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):  # (or it was done already)
                    await task
            last = prompt(T, seed=99)
            assert (await kv.put(NS, last, prompt_bytes(last, shape, T))).sealed_pages == 1
            return cancelled, len(kv._lane._open)

    cancelled, still_open = asyncio.run(main())
    assert cancelled > 0  # (the first ones were cancelled before their reply came)
    assert still_open <= aio_lane.MAX_IDLE
    with Raw(daemon.target) as raw:
        counts = wait_until(
            lambda: raw.counts(NS), lambda c: c["sessions"] == 0, timeout=10, what="the session closed"
        )
        assert counts["pages_pinned"] == 0 and counts["pages_reserved"] == 0 and counts["sequences"] == 0
    wait_until(lambda: lane_stats(daemon.target).open, lambda n: n == 0, timeout=10, what="lane closed")
    assert "Traceback" not in daemon.stderr_text()


def test_a_call_past_its_deadline_or_to_a_hung_daemon_fails_and_the_next_one_works(daemon) -> None:
    tokens = prompt(2 * T, seed=74)

    async def main() -> BaseException:
        async with kvstore_client.aio.connect(daemon.target, timeout_s=0.5) as kv:
            await kv.put(NS, tokens, prompt_bytes(tokens, (await kv.namespace(NS)).page_shape, T))
            daemon.signal(signal.SIGSTOP)  # a daemon that does not answer
            try:
                with pytest.raises(DeadlineExceeded):
                    await kv.get(NS, tokens)
                # No deadline: what ends the wait is the session's KeepAlive stream (gRPC's
                # HTTP/2 pings end it for a hung daemon; here it is cancelled by hand).
                kv.timeout_s = None
                waiting = asyncio.ensure_future(kv.get(NS, tokens))
                done, _ = await asyncio.wait([waiting], timeout=1.0)
                assert not done  # waiting on the stopped daemon, no deadline
                kv._keepalive.cancel()
                done, _ = await asyncio.wait([waiting], timeout=5.0)
                assert done, "the call still waits after the session's stream ended"
                return waiting.exception()
            finally:
                daemon.signal(signal.SIGCONT)

    err = asyncio.run(main())
    assert isinstance(err, Unavailable), err

    async def again() -> int:  # a new client, a new connection: it works
        async with kvstore_client.aio.connect(daemon.target) as kv:
            return (await kv.get(NS, tokens)).hit_tokens

    assert asyncio.run(again()) == 2 * T


def test_shutdown_answers_unavailable_to_an_asyncio_client_on_the_lane(daemon) -> None:
    tokens = prompt(2 * T, seed=75)

    async def main() -> None:
        kv = await kvstore_client.aio.connect(daemon.target)
        try:
            assert kv.lane
            await kv.put(NS, tokens, prompt_bytes(tokens, (await kv.namespace(NS)).page_shape, T))
            assert await asyncio.to_thread(daemon.terminate) == 0, daemon.stderr_text()
            with pytest.raises(Unavailable):
                await kv.get(NS, tokens)
        finally:
            await kv.close()

    asyncio.run(main())


KILLED = textwrap.dedent(
    """
    import asyncio, sys, kvstore_client
    from e2e_helpers import page_content_bytes, page_tokens_of, prompt

    async def main():
        kv = await kvstore_client.aio.connect(sys.argv[1], client_name="killed-aio")
        assert kv.lane
        ns = await kv.namespace("test")
        print("ready", flush=True)

        async def loop(k):  # puts and gets on the lane, 4 in flight, until SIGKILL
            i = 0
            while True:
                tokens = prompt(8, seed=1000 + k * 100 + i % 8)
                data = b"".join(page_content_bytes(p, page_tokens_of(tokens, p, 4), ns.page_shape) for p in range(2))
                await kv.put(ns, tokens, data)
                await kv.get(ns, tokens)
                i += 1

        await asyncio.gather(*(loop(k) for k in range(4)))

    asyncio.run(main())
    """
)


def test_an_asyncio_client_killed_with_calls_in_flight_on_the_lane_leaks_nothing(daemon) -> None:
    # (4 tasks in flight: at least 2 connections open when it is killed)
    killed_mid_call_leaks_nothing(daemon, KILLED, lambda s: s.calls >= 80 and s.open >= 2)
