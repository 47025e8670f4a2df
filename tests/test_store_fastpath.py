"""The fast path in the store, over real tiers (tests/store_helpers.py): a pin with a deadline
is released exactly when its clock passes it, never before (the clock driven here), through
every path that reaps; a batch whose call ends early gives back what its finished items took."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb
from store_helpers import T, books, lookup_with_deadline, make_store, readers_held, until, write
from test_store_cancel import _below, _served

from kvstore.errors import ResourceExhausted
from kvstore.store import fastpath


class Clock:
    def __init__(self) -> None:
        self.now = 10**12

    def __call__(self) -> int:
        return self.now


async def test_a_pin_with_a_deadline_holds_its_pages_until_then_and_no_longer(tmp_path: Path) -> None:
    store, ns, sid = make_store(tmp_path, host=False, disk=False)
    clock = store.pin_deadlines.clock = Clock()
    try:
        tokens = list(range(100, 100 + 8 * T))
        store.release_sequence(sid, write(store, sid, tokens))
        r, ttl_ms, deadline = await lookup_with_deadline(store, sid, "t", tokens, b"", False, "", False, 5)
        assert (len(r.slots), ttl_ms, deadline) == (8, 5, clock.now + 5_000_000)
        other = list(range(900, 900 + 9 * T))  # 9 pages: 8 free, the pinned 8 cannot be evicted
        clock.now = deadline - 1
        with pytest.raises(ResourceExhausted):
            fastpath.reserve(store, sid, "t", other, b"", 0, None, "")
        assert store.reap_expired() == [] and len(store.sessions[sid].pins) == 1, "not before its deadline"
        clock.now = deadline
        seq, _, appended = fastpath.reserve(store, sid, "t", other, b"", 0, None, "")
        assert store.sessions[sid].pins == {} and len(appended.pages) == 9, "reaped when room was needed"
        assert store.pin_deadlines.expired == 1
        committed, released, _ = fastpath.seal(store, sid, seq, len(other), (), True)
        assert (committed.sealed_pages, released.pages_unpinned) == (9, 9)
        books(store, ns)
        # The reaper's tick reaps too; a pin released before its deadline is skipped then.
        r1, _, d1 = await lookup_with_deadline(store, sid, "t", other[: 4 * T], b"", False, "", False, 1)
        r2, _, _ = await lookup_with_deadline(store, sid, "t", other[: 4 * T], b"", False, "", False, 1)
        assert r1.pin_id and r2.pin_id and len(store.sessions[sid].pins) == 2
        fastpath.release_pins(store, sid, [r1.pin_id, 12345])  # (an id it does not hold: skipped)
        clock.now = d1
        store.reap_expired()
        assert store.sessions[sid].pins == {} and store.pin_deadlines.expired == 2
        assert len(store.pin_deadlines) == 0
    finally:
        store.close()


async def test_the_ttl_is_capped_and_checked(tmp_path: Path) -> None:
    store, _, sid = make_store(tmp_path, host=False, disk=False)
    try:
        tokens = list(range(4 * T))
        store.release_sequence(sid, write(store, sid, tokens))
        _, ttl_ms, _ = await lookup_with_deadline(store, sid, "t", tokens, b"", False, "", False, 10**9)
        assert ttl_ms == round(store.limits.pin_ttl_max_s * 1000)
        for sid_, ttl, flight, what in (
            (sid, -1, False, "negative"),
            (0, 5, False, "session_id"),
            (sid, 5, True, "return_in_flight"),
        ):
            with pytest.raises(Exception, match=what):
                await lookup_with_deadline(store, sid_, "t", tokens, b"", False, "", flight, ttl)
    finally:
        store.close()


async def test_a_batch_past_its_deadline_releases_the_pins_its_finished_items_took(tmp_path: Path) -> None:
    store, ns, sid, below = await _below(tmp_path, 4, seed=7000)
    try:
        resident = list(range(50, 50 + 2 * T))
        store.release_sequence(sid, write(store, sid, resident))
        items = [
            pb.LookupRequest(session_id=sid, namespace="t", token_ids=resident, pin=True),
            pb.LookupRequest(session_id=sid, namespace="t", token_ids=below, pin=True),
        ]
        async with _served(store, tmp_path) as stub:
            with readers_held(store):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.BatchLookup(pb.BatchLookupRequest(items=items), timeout=0.3)
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                await until(lambda: not store.sessions[sid].pins, "the batch's pins to be released")
            await until(lambda: not store.tiers.promoting, "the promotions to settle")
            assert books(store, ns)["refs"] == {}
            done = await stub.BatchLookup(pb.BatchLookupRequest(items=items), timeout=10)
            assert [i.reply.hit_tokens for i in done.items] == [2 * T, 4 * T]
    finally:
        store.close()
