"""The fast path through the real daemon (docs/api.md, "The fast path"): a session's first put
is two RPCs (Reserve, Seal, whose reply grants a credit of reserved pages), the next ones one
(Put, into the credit), each visible to another process when it returns; a put into a credit
never changes pages sealed already, a Put that fails changes nothing, and a client that dies
holding a credit leaks nothing; a get is one RPC (Lookup with a self-ending pin) that copies
the right bytes, and never returns bytes copied after its pin's deadline; such a pin is reaped
once past it and its pages can be evicted; a Reserve that fails half-way leaves nothing; a
batch answers each item on its own. RPCs are counted by a client interceptor on the channel
the client library uses."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import grpc
import kvstore_client
import numpy as np
import pytest
from e2e_helpers import (
    Raw,
    Worker,
    assert_status,
    prompt,
    prompt_bytes,
    wait_until,
)
from kvstore_client import PinExpired
from kvstore_client.errors import InvalidArgument, ResourceExhausted
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

NS = "test"  # tests/daemon.py: 4 tokens a page, 64 pages
T = 4
TOTAL = 64
IDLE = {"pages_reserved": 0, "pages_pinned": 0, "sequences": 0}


class Counter(grpc.UnaryUnaryClientInterceptor):
    """The unary RPCs a client sends, by method name."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.calls.append(details.method.rsplit("/", 1)[-1])
        return continuation(details, request)


@pytest.fixture
def counted(daemon):
    """(a client whose channel counts RPCs, the counter), namespace already fetched."""
    counter = Counter()
    channel = grpc.intercept_channel(grpc.insecure_channel(daemon.target), counter)
    # gRPC only: the calls are counted on its channel. The lane carries the same calls, sent by
    # the same Client._send (tests/test_lane.py).
    client = kvstore_client.Client(channel, daemon.target, lane=False)
    try:
        client.open("counted")
        client.namespace(NS)
        counter.calls.clear()
        yield client, counter
    finally:
        client.close()


@pytest.fixture
def raw(daemon):
    with Raw(daemon.target) as r:
        yield r


def idle(counts: dict[str, int]) -> dict[str, int]:
    return {k: counts[k] for k in IDLE}


def credit_held(pages: int) -> dict[str, int]:
    """The counts of a namespace where nothing is held but one credit of `pages` pages."""
    return {"pages_reserved": pages, "pages_pinned": 0, "sequences": 1 if pages else 0}


def test_a_put_is_reserve_and_seal_then_one_put_into_its_credit(daemon, counted, raw) -> None:
    kv, counter = counted
    ns = kv.namespace(NS)
    tokens = prompt(3 * T + 2, seed=1)  # three full pages and a partial one
    res = kv.put(NS, tokens, prompt_bytes(tokens, ns.page_shape, T))
    assert counter.calls == ["Reserve", "Seal"]
    assert (res.written_pages, res.sealed_pages, res.cached_tokens) == (4, 3, 0)
    assert idle(raw.counts(NS)) == credit_held(4), "the put's sequence released; a credit of 4 pages held"
    second = prompt(3 * T + 1, seed=13)
    counter.calls.clear()
    res = kv.put(NS, second, prompt_bytes(second, ns.page_shape, T))
    assert counter.calls == ["Put"]
    assert (res.written_pages, res.sealed_pages, res.cached_tokens) == (4, 3, 0)
    assert idle(raw.counts(NS)) == credit_held(4)
    with Worker("reader") as other:
        other.call("connect", target=daemon.target)
        for prompt_ in (tokens, second):
            found = other.call("lookup", namespace=NS, tokens=prompt_)
            assert found["hit_tokens"] == 3 * T
            assert (
                other.call("verify", namespace=NS, tokens=prompt_, slots=found["slots"])["mismatched"] == []
            )

        # Into the credit again, pages sealed already: their copies (zeros here) are dropped,
        # the sealed bytes stay as they were.
        counter.calls.clear()
        again = kv.put(NS, second[: 3 * T], bytes(3 * ns.pool.page_bytes))
        assert counter.calls == ["Put"]
        assert (again.written_pages, again.cached_tokens, again.sealed_pages) == (3, 3 * T, 0)
        found = other.call("lookup", namespace=NS, tokens=second)
        assert other.call("verify", namespace=NS, tokens=second, slots=found["slots"])["mismatched"] == []
    assert idle(raw.counts(NS)) == credit_held(3)

    counter.calls.clear()  # with a function: Reserve says what to write (nothing: all cached)
    again = kv.put(NS, tokens[: 3 * T], lambda pages, views: pytest.fail(f"nothing to write, got {pages}"))
    assert (again.written_pages, again.cached_tokens, again.sealed_pages) == (0, 3 * T, 0)
    assert counter.calls == ["Reserve", "Seal"]
    assert idle(raw.counts(NS)) == credit_held(3), "the credit kept for a put that can use it"

    counter.calls.clear()  # bigger than the credit: Reserve + Seal, which replaces the credit
    bigger = prompt(5 * T, seed=14)
    assert kv.put(NS, bigger, prompt_bytes(bigger, ns.page_shape, T)).sealed_pages == 5
    assert counter.calls == ["Reserve", "Seal"]
    assert idle(raw.counts(NS)) == credit_held(5)


def test_a_client_that_dies_holding_a_credit_leaks_nothing(daemon, raw) -> None:
    tokens, more = prompt(2 * T, seed=15), prompt(2 * T, seed=16)
    with Worker("dies") as worker:
        worker.call("connect", target=daemon.target)
        worker.call("put", namespace=NS, tokens=tokens)
        assert worker.call("put", namespace=NS, tokens=more)["sealed_pages"] == 2  # (into the credit)
        assert idle(raw.counts(NS)) == credit_held(2)
        worker.kill()
        wait_until(lambda: idle(raw.counts(NS)), lambda c: c == IDLE, timeout=10, what="the credit freed")
    assert raw.counts(NS)["pages_sealed"] == 4


def test_a_put_told_its_cached_prefix_copies_only_the_rest(daemon, counted, raw) -> None:
    kv, counter = counted
    shape = kv.namespace(NS).page_shape
    head = prompt(3 * T, seed=30)
    kv.put(NS, head, prompt_bytes(head, shape, T))  # Reserve + Seal: a credit of 3 pages
    full = [*head, *prompt(2 * T, seed=31)]
    counter.calls.clear()
    res = kv.put(NS, full, prompt_bytes(full, shape, T), cached_tokens=3 * T)
    assert counter.calls == ["Put"]
    assert (res.written_pages, res.cached_tokens, res.sealed_pages) == (2, 3 * T, 2)
    with Worker("reader") as other:
        other.call("connect", target=daemon.target)
        found = other.call("lookup", namespace=NS, tokens=full)
        assert found["hit_tokens"] == 5 * T
        assert other.call("verify", namespace=NS, tokens=full, slots=found["slots"])["mismatched"] == []
        # A hint no longer true (the prefix evicted meanwhile): the put falls back, writes it all.
        kv.evict(NS, all=True)
        evicted = [*prompt(3 * T, seed=32), *prompt(T, seed=33)]
        counter.calls.clear()
        res = kv.put(NS, evicted, prompt_bytes(evicted, shape, T), cached_tokens=3 * T)
        assert counter.calls == ["Put", "Release", "Reserve", "Seal"]
        assert (res.written_pages, res.sealed_pages, res.cached_tokens) == (4, 4, 0)
        found = other.call("lookup", namespace=NS, tokens=evicted)
        assert other.call("verify", namespace=NS, tokens=evicted, slots=found["slots"])["mismatched"] == []
    assert idle(raw.counts(NS)) == credit_held(4)


def test_threads_of_one_client_put_at_once_each_into_its_own_credit(daemon, counted, raw) -> None:
    kv, counter = counted
    shape = kv.namespace(NS).page_shape
    prompts = [[prompt(2 * T, seed=100 + 10 * t + i) for i in range(5)] for t in range(4)]

    def run(mine: list[list[int]]) -> None:
        for tokens in mine:
            assert kv.put(NS, tokens, prompt_bytes(tokens, shape, T)).sealed_pages == 2

    threads = [threading.Thread(target=run, args=(mine,)) for mine in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert "Put" in counter.calls
    with Worker("reader") as other:
        other.call("connect", target=daemon.target)
        for tokens in (t for mine in prompts for t in mine):
            found = other.call("lookup", namespace=NS, tokens=tokens)
            assert other.call("verify", namespace=NS, tokens=tokens, slots=found["slots"])["mismatched"] == []
    counts = raw.counts(NS)
    assert counts["pages_pinned"] == 0 and counts["pages_reserved"] == 2 * counts["sequences"] <= 2 * 4


def test_a_credit_does_not_keep_its_namespace_from_being_deleted(counted, raw) -> None:
    kv, counter = counted
    ns = kv.namespace(NS)
    g, num_pages = ns.geometry, ns.info.pool.num_pages
    for seed in (20, 21):
        tokens = prompt(2 * T, seed=seed)
        kv.put(NS, tokens, prompt_bytes(tokens, ns.page_shape, T))
    assert idle(raw.counts(NS)) == credit_held(2)
    assert kv.delete_namespace(NS).sequences_released == 1  # without force: the credit goes with it
    kv.create_namespace(
        NS,
        num_layers=g.num_layers,
        num_kv_heads=g.num_kv_heads,
        head_dim=g.head_dim,
        dtype=g.dtype,
        page_tokens=g.page_tokens,
        num_pages=num_pages,
    )
    counter.calls.clear()  # the credit of the deleted pool is not used
    tokens = prompt(2 * T, seed=22)
    assert kv.put(NS, tokens, prompt_bytes(tokens, ns.page_shape, T)).sealed_pages == 2
    assert counter.calls[-2:] == ["Reserve", "Seal"]
    assert kv.get(NS, tokens).data.numpy().tobytes() == prompt_bytes(tokens, ns.page_shape, T)


def test_a_put_that_fails_changes_nothing_and_keeps_the_credit(counted, raw) -> None:
    kv, _ = counted
    sid = kv.session_id
    first = prompt(T, seed=17)
    r = raw.kv.Reserve(pb.ReserveRequest(session_id=sid, namespace=NS, token_ids=first))
    seal = raw.kv.Seal(
        pb.SealRequest(session_id=sid, sequence_id=r.sequence_id, num_tokens=T, release=True, credit_pages=2)
    )
    credit = seal.credit
    assert credit.sequence_id and len(credit.slots) == 2 and list(credit.slots) == sorted(credit.slots)
    assert credit.pool_epoch == raw.pool(NS).pool_epoch
    tokens = prompt(2 * T, seed=18)

    def put(**fields: Any) -> pb.PutRequest:
        base = dict(
            session_id=sid,
            namespace=NS,
            token_ids=tokens,
            credit_sequence_id=credit.sequence_id,
            slots=credit.slots,
        )
        return pb.PutRequest(**(base | fields))

    before = raw.counts(NS)
    for request, code, part in (
        (put(slots=[credit.slots[0], credit.slots[0]]), grpc.StatusCode.INVALID_ARGUMENT, "given twice"),
        (put(slots=credit.slots[:1]), grpc.StatusCode.INVALID_ARGUMENT, "one slot per page"),
        (put(token_ids=[1, 2, -1, 4, 5]), grpc.StatusCode.INVALID_ARGUMENT, "token_ids"),
        (put(credit_sequence_id=credit.sequence_id + 999), grpc.StatusCode.NOT_FOUND, "sequence_id"),
        (put(skip_pages=3), grpc.StatusCode.INVALID_ARGUMENT, "skip_pages"),
        (put(skip_pages=1, slots=credit.slots[:1]), grpc.StatusCode.FAILED_PRECONDITION, "cached"),
    ):
        assert_status(raw.error("Put", request), code, part)
        assert raw.counts(NS) == before, f"a Put refused with {code.name} changed nothing"
    held = raw.kv.Allocate(pb.AllocateRequest(session_id=sid, namespace=NS, max_tokens=2 * T))
    not_credit = put(credit_sequence_id=held.sequence_id, slots=[])  # spare pages, but not a credit
    assert_status(raw.error("Put", not_credit), grpc.StatusCode.FAILED_PRECONDITION, "not an unused credit")
    raw.kv.Release(pb.ReleaseRequest(session_id=sid, sequence_id=held.sequence_id))

    done = raw.kv.Put(put(credit_pages=TOTAL))  # the credit still good; a next one over 1/8 of the pool: none
    assert (done.sealed_pages, done.num_tokens, done.credit.sequence_id) == (2, 2 * T, 0)
    assert idle(raw.counts(NS)) == IDLE
    assert_status(raw.error("Put", put()), grpc.StatusCode.NOT_FOUND, "sequence_id")


def test_a_get_is_one_lookup_and_copies_the_right_bytes(daemon, counted, raw) -> None:
    kv, counter = counted
    ns = kv.namespace(NS)
    tokens = prompt(3 * T, seed=2)
    with Worker("writer") as other:
        other.call("connect", target=daemon.target)
        other.call("write_prompt", namespace=NS, tokens=tokens, release=True)
    out = np.zeros(4 * ns.pool.page_bytes, dtype=np.uint8)
    hit = kv.get(NS, [*tokens, 7], out)
    assert counter.calls == ["Lookup"]
    assert (hit.hit_tokens, hit.pages) == (3 * T, 3)
    assert out[: 3 * ns.pool.page_bytes].tobytes() == prompt_bytes(tokens, ns.page_shape, T)
    assert hit.data.numpy().tobytes() == prompt_bytes(tokens, ns.page_shape, T)
    assert raw.counts(NS)["pages_pinned"] == 3, "pinned until the next call or its deadline"
    # The next call releases the pin the client is done with: no Release RPC.
    miss = kv.get(NS, prompt(T, seed=3))
    assert counter.calls == ["Lookup", "Lookup"]
    assert miss.hit_tokens == 0 and len(miss.data) == 0
    assert raw.counts(NS)["pages_pinned"] == 0


def test_a_copy_that_ends_after_the_pins_deadline_raises_pin_expired(counted) -> None:
    kv, _ = counted
    ns = kv.namespace(NS)
    tokens = prompt(2 * T, seed=4)
    kv.put(NS, tokens, prompt_bytes(tokens, ns.page_shape, T))

    def outlast(ttl_ns: int) -> Any:
        def hook() -> None:
            # The copy is done, so the daemon took the pin before `start`: its deadline is
            # before start + ttl. Wait for the clock to pass that (no sleep: the clock itself).
            start = time.monotonic_ns()
            while time.monotonic_ns() <= start + ttl_ns:
                pass

        return hook

    with pytest.raises(PinExpired, match="after the pin's deadline"):
        kv.get(NS, tokens, pin_ttl_s=0.001, after_copy=outlast(1_000_000))
    # The same get whose copy ends in time returns the bytes.
    hit = kv.get(NS, tokens, pin_ttl_s=2.0, after_copy=lambda: None)
    assert hit.data.numpy().tobytes() == prompt_bytes(tokens, ns.page_shape, T)
    assert hit.pin_deadline_ns > time.monotonic_ns()


def test_a_pin_past_its_deadline_is_reaped_and_its_pages_evicted_under_pressure(daemon, raw) -> None:
    with (
        kvstore_client.connect(daemon.target, client_name="writer") as writer,
        kvstore_client.connect(daemon.target, client_name="getter") as getter,
    ):
        shape = writer.namespace(NS).page_shape
        held = prompt(40 * T, seed=5)
        writer.put(NS, held, prompt_bytes(held, shape, T))
        hit = getter.get(NS, held, pin_ttl_s=1.5)  # getter makes no other call: only the deadline ends it
        assert hit.pages == 40 and raw.counts(NS)["pages_pinned"] == 40
        big = prompt(40 * T, seed=6)  # needs 40 pages: only 24 are free or evictable while pinned
        with pytest.raises(ResourceExhausted):
            writer.put(NS, big, prompt_bytes(big, shape, T))
        assert time.monotonic_ns() < hit.pin_deadline_ns, "the refusal must have come before the deadline"
        wait_until(time.monotonic_ns, lambda now: now > hit.pin_deadline_ns, timeout=5, what="the deadline")
        before = raw.stats(NS)[0].evictions
        res = writer.put(NS, big, prompt_bytes(big, shape, T))  # the expired pin is reaped, its pages evicted
        assert res.sealed_pages == 40
        assert raw.stats(NS)[0].evictions - before >= 16
        assert raw.counts(NS)["pages_pinned"] == 0
        # The reaper's tick alone also ends a pin (no call that needs room comes).
        hit = getter.get(NS, big, pin_ttl_s=0.05)
        assert hit.pages == 40
        wait_until(lambda: raw.counts(NS)["pages_pinned"], lambda n: n == 0, timeout=5, what="the reaper")


def test_a_reserve_that_fails_half_way_leaves_nothing(daemon, counted, raw) -> None:
    kv, _ = counted
    shape = kv.namespace(NS).page_shape
    too_big = prompt((TOTAL + 1) * T, seed=7)
    with pytest.raises(ResourceExhausted):
        kv.put(NS, too_big, prompt_bytes(too_big, shape, T))
    assert idle(raw.counts(NS)) == IDLE and raw.counts(NS)["pages_free"] == TOTAL
    bad = [*prompt(T, seed=8), -1]
    for max_tokens in (0, 16):
        with pytest.raises(InvalidArgument, match="token_ids"):
            kv.put(NS, bad, prompt_bytes(bad, shape, T), max_tokens=max_tokens)
        assert idle(raw.counts(NS)) == IDLE and raw.counts(NS)["pages_free"] == TOTAL
    # A write that fails on the client's side: the library gives the sequence back.
    tokens = prompt(2 * T, seed=12)

    def broken(pages: Any, views: Any) -> None:
        raise ValueError("the engine failed")

    with pytest.raises(ValueError, match="the engine failed"):
        kv.put(NS, tokens, broken)
    with pytest.raises(InvalidArgument, match="data has 3 bytes"):
        kv.put(NS, tokens, b"abc")
    assert idle(raw.counts(NS)) == IDLE and raw.counts(NS)["pages_sealed"] == 0
    # The wire call itself, without the library.
    req = pb.ReserveRequest(session_id=kv.session_id, namespace=NS, token_ids=too_big)
    assert_status(raw.error("Reserve", req), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert idle(raw.counts(NS)) == IDLE


def test_a_batch_answers_each_item_and_one_bad_item_fails_alone(daemon, counted, raw) -> None:
    kv, counter = counted
    shape = kv.namespace(NS).page_shape
    good1, good2 = prompt(2 * T, seed=9), prompt(3 * T, seed=10)
    bad = [1, 2, -1]
    puts = kv.put_many(NS, [good1, bad, good2], [prompt_bytes(p, shape, T) for p in (good1, bad, good2)])
    assert counter.calls == ["BatchReserve", "BatchSeal"]
    assert [type(r).__name__ for r in puts] == ["PutResult", "InvalidArgument", "PutResult"]
    assert (puts[0].sealed_pages, puts[2].sealed_pages) == (2, 3)
    assert idle(raw.counts(NS)) == IDLE

    counter.calls.clear()
    gets = kv.get_many(NS, [good1, bad, good2])
    assert counter.calls == ["BatchLookup"]
    assert isinstance(gets[1], InvalidArgument) and "token_ids" in gets[1].details
    assert gets[0].data.numpy().tobytes() == prompt_bytes(good1, shape, T)
    assert gets[2].data.numpy().tobytes() == prompt_bytes(good2, shape, T)
    assert raw.counts(NS)["pages_pinned"] == 5
    kv.get(NS, [0])  # releases the batch's pins
    assert raw.counts(NS)["pages_pinned"] == 0


def test_the_asyncio_client_puts_and_gets_the_same_way(daemon, raw) -> None:
    async def main() -> None:
        async with kvstore_client.aio.connect(daemon.target, client_name="aio") as kv:
            shape = tuple(raw.pool(NS).page_shape)
            tokens = prompt(2 * T + 1, seed=11)
            res = await kv.put(NS, tokens, prompt_bytes(tokens, shape, T))  # (maps the namespace first)
            assert res.sealed_pages == 2
            more = prompt(3 * T, seed=19)  # into the credit the first put's Seal granted
            assert (await kv.put(NS, more, prompt_bytes(more, shape, T))).sealed_pages == 3
            assert (await kv.get(NS, more)).data.numpy().tobytes() == prompt_bytes(more, shape, T)
            hit = await kv.get(NS, tokens)
            assert hit.data.numpy().tobytes() == prompt_bytes(tokens[: 2 * T], shape, T)
            (r,) = await kv.get_many(NS, [tokens])
            assert r.hit_tokens == 2 * T

    asyncio.run(main())
    assert idle(raw.counts(NS)) == IDLE
