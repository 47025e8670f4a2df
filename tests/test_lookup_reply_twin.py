"""The Lookup reply built with fewer steps (kvstore/server/fast_servicer.py `lookup_reply`:
the request read in one C pass (kvstore/server/request_scan.py), each request field read
once, the pin's fields set only with a pin, the store's lookup and its wait without
waits.lookup between them, the reply's bytes encoded in C) is byte for byte the reply the old one built,
on twin stores given the same calls: misses, partial and full hits, unpinned, pinned, with
a deadline (capped or not), earlier pins released on the next call, and the same errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb
from store_helpers import T, lookup_with_deadline, make_store, write

from kvstore.errors import KVStoreError
from kvstore.server import edge, fast_servicer, request_scan
from kvstore.server.tokens import request_tokens
from kvstore.store import fastpath, namespaces

scan_lookup = edge._guarded(pb.LookupRequest.FromString, scanned=True)


async def lookup_reply(store, request: pb.LookupRequest) -> pb.LookupResponse:
    """Today's: the request as clients send it (packed ids) and as the edge reads it (in one
    C pass, a named tuple of its fields), the reply's bytes (the Lookup RPC sends them as they are), parsed;
    they are protobuf's own serialization of that message, byte for byte."""
    packed = pb.LookupRequest()
    packed.CopyFrom(request)
    if request.token_ids:  # (the ids as clients send them: packed)
        packed.token_ids_u32 = b"".join(t.to_bytes(4, "little") for t in request.token_ids)
        del packed.token_ids[:]
    scanned = scan_lookup(packed.SerializeToString())
    native = request_scan.scan_fields is not None
    assert isinstance(scanned, tuple) == native  # (the scan takes every request here)
    raw = await fast_servicer.lookup_reply(store, scanned)
    reply = pb.LookupResponse.FromString(raw)
    assert raw == reply.SerializeToString()
    return reply


async def old_lookup_reply(store, request: pb.LookupRequest) -> pb.LookupResponse:
    """lookup_reply as it was (3fc499e), over today's steps of a get (its wait: the test below)."""
    fastpath.release_pins(store, request.session_id, request.release_pin_ids)
    r, ttl_ms, deadline_ns = await lookup_with_deadline(
        store,
        request.session_id,
        request.namespace,
        request_tokens(request),
        request.extra_keys,
        request.pin,
        request.model_fingerprint,
        request.return_in_flight,
        request.pin_ttl_ms,
    )
    reply = pb.LookupResponse(
        hit_tokens=r.hit_tokens,
        block_hashes=b"".join(r.block_hashes),
        pin_id=r.pin_id,
        ready_pages=len(r.slots) if r.ready_pages is None else r.ready_pages,
        pool_epoch=namespaces.namespace_epoch(store, request.namespace),
        pin_ttl_ms=ttl_ms,
        pin_deadline_ns=deadline_ns,
    )
    reply.slots.extend(r.slots)
    return reply


async def answer(reply_of, store, request: pb.LookupRequest) -> tuple[bytes, int] | str:
    """(the reply's bytes with its pin id cleared, the pin id) or the error."""
    try:
        reply = await reply_of(store, request)
    except KVStoreError as e:
        return f"{type(e).__name__}: {e}"
    assert reply.pool_epoch == namespaces.namespace_epoch(store, "t") != 0
    pin_id = reply.pin_id
    reply.pin_id = reply.pool_epoch = 0  # (random per store)
    return reply.SerializeToString(), pin_id


async def test_the_reply_is_the_old_ones_byte_for_byte(tmp_path: Path) -> None:
    twins = [make_store(tmp_path / name, host=False, disk=False) for name in ("new", "old")]
    try:
        a = list(range(100, 100 + 6 * T))
        b = list(range(5000, 5000 + 3 * T))
        for store, _ns, sid in twins:
            store.pin_deadlines.clock = lambda: 10**12  # (the same deadlines on both)
            store.release_sequence(sid, write(store, sid, a))
            store.release_sequence(sid, write(store, sid, b[: 2 * T]))
        requests = [
            dict(token_ids=[9] * (2 * T)),  # a miss
            dict(token_ids=a),  # a full hit, unpinned
            dict(token_ids=a[: 3 * T] + [1] * T),  # a partial hit
            dict(token_ids=b),  # two pages of three
            dict(token_ids=a, pin=True),
            dict(token_ids=a[: 2 * T], pin_ttl_ms=500),
            dict(token_ids=b, pin_ttl_ms=10**9),  # capped
            dict(token_ids=a, pin=True, pin_ttl_ms=100, release=True),  # the pins so far, and one unknown
            dict(token_ids=a, pin=True, session_id=0),  # no session: refused
            dict(token_ids=a, pin_ttl_ms=-1),
            dict(token_ids=a, namespace="nope"),
            dict(token_ids=a, pin_ttl_ms=100, return_in_flight=True),
            dict(token_ids=[], pin=True),
        ]
        pins: list[list[int]] = [[], []]
        for i, fields in enumerate(requests):
            got = []
            for k, (reply_of, (store, _ns, sid)) in enumerate(
                zip((lookup_reply, old_lookup_reply), twins, strict=True)
            ):
                kw = {"session_id": sid, "namespace": "t"} | fields
                if kw.pop("release", False):
                    kw["release_pin_ids"] = pins[k] + [777]
                got.append(await answer(reply_of, store, pb.LookupRequest(**kw)))
                if not isinstance(got[-1], str) and got[-1][1]:
                    pins[k].append(got[-1][1])
            new, old = got
            assert isinstance(new, str) == isinstance(old, str), (i, new, old)
            if isinstance(new, str):
                assert new == old, i
            else:
                assert new[0] == old[0] and bool(new[1]) == bool(old[1]), (i, new, old)
        assert len(pins[0]) == 4  # (the pins' fields were compared set, not only as zeros)
        assert [len(store.sessions[sid].pins) for store, _, sid in twins] == [
            1,
            1,
        ]  # (the 8th released three)
    finally:
        for store, _, _ in twins:
            store.close()


@pytest.mark.parametrize("pin", [False, True])
async def test_a_lookup_below_the_pool_still_waits_for_its_pages(tmp_path: Path, pin: bool) -> None:
    """lookup_reply's wait, without waits.lookup: the reply has the promoted pages."""
    from test_store_cancel import _below

    store, _ns, sid, below = await _below(tmp_path, 4, seed=7100 + pin)
    try:
        request = pb.LookupRequest(session_id=sid, namespace="t", token_ids=below, pin=pin)
        reply = await lookup_reply(store, request)
        assert (reply.hit_tokens, reply.ready_pages, len(reply.slots)) == (4 * T, 4, 4)
        assert bool(reply.pin_id) == pin
    finally:
        store.close()
