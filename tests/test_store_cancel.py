"""A call cancelled at its `await` (the client's deadline, a cancel, the daemon stopping)
leaves no state behind. The KVStore handlers await only in kvstore/store/waits.py, once
each: `lookup` (promotions from disk settling), `swap_in` (its pages coming back) and
`wait_pages` (the pin's next page). Each is driven here as a task over real tiers
(tests/store_helpers.py), held at that await by the disk tier's busy reader threads, and
cancelled there; then the reads finish and the books must be what they were.

Also here: promotions that fail while in flight (defect 9 of issue 14)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest
from store_helpers import (
    PB,
    T,
    books,
    content,
    make_store,
    readers_held,
    same_bytes,
    to_device,
    until,
    write,
)

from kvstore.store import waits


async def _below(tmp: Path, n_pages: int, seed: int):
    """A store over a disk tier only, with a prompt of `n_pages` full pages on disk (not in
    the pool, not in the page cache)."""
    store, ns, sid = make_store(tmp, host=False, disk=True)
    tokens = list(range(seed, seed + n_pages * T))
    store.release_sequence(sid, write(store, sid, tokens))
    store.evict_all("t")
    await to_device(store, tmp)
    return store, ns, sid, tokens


async def _cancel_at_await(task: asyncio.Task, at: str, reached) -> None:
    await until(reached, at)
    assert not task.done(), f"{at}: the call finished without waiting (nothing was in flight)"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_pinned_lookup_cancelled_while_pages_come_up_releases_its_pin(tmp_path: Path) -> None:
    store, ns, sid, tokens = await _below(tmp_path, 4, seed=10)
    try:
        before = books(store, ns)
        with readers_held(store):
            task = asyncio.create_task(waits.lookup(store, sid, "t", tokens, b"", True))
            await _cancel_at_await(task, "lookup: promotions settling", lambda: store.sessions[sid].pins)
            assert store.sessions[sid].pins == {}  # released at once: nobody knows its id
        await until(lambda: not store.tiers.promoting, "the promotions to settle")
        after = books(store, ns)
        assert after["refs"] == {} and after["pins"] == 0 and after["reserved"] == 0
        assert after["free"] == before["free"] - 4  # the pages came up, cached and unpinned
        r = await waits.lookup(store, sid, "t", tokens, b"", True)  # and serve the next lookup
        assert r.hit_tokens == 4 * T and same_bytes(ns, tokens, r.slots) == [True] * 4
    finally:
        store.close()


async def test_a_swap_in_cancelled_while_pages_come_back_leaves_it_swapped_out(tmp_path: Path) -> None:
    """Sealed pages (promotions) and private pages (reads on the reader threads) in flight
    when it is cancelled: the sequence stays swapped out, a private page's slot is not given
    back while a reader thread may still write into it, and a later SwapIn succeeds."""
    store, ns, sid = make_store(tmp_path, host=False, disk=True)
    try:
        a = list(range(500, 500 + 4 * T + 1))
        seq = write(store, sid, a, commit=2 * T, max_tokens=6 * T)  # 2 sealed, 3 private, 1 spare
        assert store.preempt(sid, seq, "swap_out") == (5, 6)
        await to_device(store, tmp_path)
        before = books(store, ns)
        s = store.sessions[sid].sequences[seq]
        with readers_held(store):
            task = asyncio.create_task(waits.swap_in(store, sid, seq))
            await _cancel_at_await(task, "swap_in: pages coming back", lambda: s.swap_in is not None)
            assert s.swap_in is None and s.swapped is not None and s.pages == [] and s.spare == []
            # Its 3 private pages' reads are still queued: their slots stay taken until done.
            assert ns.pages_reserved == 2 + 3
        await until(lambda: not store.tiers.promoting and ns.pages_reserved == 0, "the reads to finish")
        after = books(store, ns)
        assert after["refs"] == {} and after["pins"] == 0 and after["free"] == before["free"] - 2
        assert store.tiers.swapped_pages == 5

        view = await waits.swap_in(store, sid, seq)
        assert same_bytes(ns, a, [p.slot for p in view.pages]) == [True] * 5
        assert len(s.spare) == 1
        r = store.release_sequence(sid, seq)
        assert (r.pages_freed, r.pages_unpinned) == (3 + 1, 2)
        assert books(store, ns)["reserved"] == 0
    finally:
        store.close()


async def test_wait_pages_cancelled_leaves_the_pin_whole(tmp_path: Path) -> None:
    store, ns, sid, tokens = await _below(tmp_path, 3, seed=900)
    try:
        with readers_held(store):
            r = store.lookup(sid, "t", tokens, b"", True, return_in_flight=True)
            assert r.hit_tokens == 3 * T and r.ready_pages == 0
            task = asyncio.create_task(waits.wait_pages(store, sid, r.pin_id, 0))
            waited = lambda: any(p._waiters for p in store.tiers.promoting.values())  # noqa: E731
            await _cancel_at_await(task, "wait_pages: the pin's next page", waited)
        slots, total = await waits.wait_pages(store, sid, r.pin_id, 0)
        assert total == 3 and same_bytes(ns, tokens, slots) == [True] * 3
        assert len(books(store, ns)["refs"]) == 3
        store.release_pin(sid, r.pin_id)
        assert books(store, ns)["refs"] == {}
    finally:
        store.close()


def _corrupt_on_disk(tmp: Path, payload: bytes) -> None:
    """Flip bytes of `payload` wherever it is in the LMDB file (in place: the file is mapped
    by the open tier), then make sure the next read comes from the device."""
    path = tmp / "disk" / "data.mdb"
    raw = path.read_bytes()
    needle, at, copies = payload[100:164], 0, 0
    fd = os.open(path, os.O_RDWR)
    try:
        while (at := raw.find(needle, at)) >= 0:
            os.pwrite(fd, bytes(b ^ 0xFF for b in raw[at : at + 8]), at)
            copies += 1
            at += 1
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert copies, "the page's bytes are not in data.mdb"


@pytest.mark.parametrize("how", ["wait_pages", "release"])
async def test_an_in_flight_promotion_that_fails_ends_the_pins_hit_and_its_count(
    tmp_path: Path, how: str
) -> None:
    """A pin taken with return_in_flight counts its in-flight pages as hits; the one that then
    fails its checksum and every page after it leave the pin and the hit count (the
    namespace's hit_tokens, miss_tokens), and WaitPages answers with what is left."""
    store, ns, sid, tokens = await _below(tmp_path, 4, seed=70)
    try:
        _corrupt_on_disk(tmp_path, content(tokens, 2))
        assert len(content(tokens, 2)) == PB
        r = store.lookup(sid, "t", tokens, b"", True, return_in_flight=True)
        assert r.hit_tokens == 4 * T and r.ready_pages == 0, "the pages came up without waiting"
        assert store.stats("t")[0].hit_tokens == 4 * T
        if how == "wait_pages":
            slots, total = await asyncio.wait_for(waits.wait_pages(store, sid, r.pin_id, 0), 10)
            assert total == 2 and same_bytes(ns, tokens, slots) == [True] * 2
        else:
            await until(lambda: not store.tiers.promoting, "the promotions to settle")
        st = store.stats("t")[0]
        assert (st.hit_tokens, st.miss_tokens) == (2 * T, 2 * T)
        assert store.release_pin(sid, r.pin_id).pages_unpinned == 2
        assert books(store, ns)["refs"] == {}
    finally:
        store.close()


@contextlib.asynccontextmanager
async def _served(store, tmp: Path):
    """A stub of the KVStore servicer over real gRPC on a unix socket in this process, behind
    the daemon's own edge (kvstore/daemon.py builds its server the same way)."""
    import grpc
    from kvstore_proto.kvstore.v1 import kvstore_pb2_grpc as pb_grpc

    from kvstore.server.edge import Edge
    from kvstore.server.kvstore_servicer import KVStoreServicer

    edge = Edge()
    server = grpc.aio.server()
    pb_grpc.add_KVStoreServicer_to_server(KVStoreServicer(store, edge.counts), edge)
    edge.install(server)
    target = f"unix://{tmp}/kv.sock"
    server.add_insecure_port(target)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            yield pb_grpc.KVStoreStub(channel)
    finally:
        await server.stop(None)


async def test_a_lookup_past_its_grpc_deadline_releases_its_pin(tmp_path: Path) -> None:
    """Through real gRPC: the client's deadline passes while the pages come up; grpc cancels
    the handler, and its pin goes."""
    import grpc
    from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

    store, ns, sid, tokens = await _below(tmp_path, 4, seed=4000)
    try:
        async with _served(store, tmp_path) as stub:
            request = pb.LookupRequest(session_id=sid, namespace="t", token_ids=tokens, pin=True)
            with readers_held(store):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Lookup(request, timeout=0.3)
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                await until(lambda: not store.sessions[sid].pins, "the handler's pin to be released")
            await until(lambda: not store.tiers.promoting, "the promotions to settle")
            assert books(store, ns)["refs"] == {}
            r = await stub.Lookup(request, timeout=10)
            assert r.hit_tokens == 4 * T and same_bytes(ns, tokens, list(r.slots)) == [True] * 4
    finally:
        store.close()


async def test_a_swap_in_past_its_grpc_deadline_leaves_it_swapped_out(tmp_path: Path) -> None:
    import grpc
    from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

    store, ns, sid = make_store(tmp_path, host=False, disk=True)
    try:
        a = list(range(2000, 2000 + 3 * T + 3))
        seq = write(store, sid, a, commit=2 * T)  # 2 sealed, 2 private
        store.preempt(sid, seq, "swap_out")
        await to_device(store, tmp_path)
        s = store.sessions[sid].sequences[seq]
        async with _served(store, tmp_path) as stub:
            request = pb.SwapInRequest(session_id=sid, sequence_id=seq)
            with readers_held(store):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.SwapIn(request, timeout=0.3)
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                await until(lambda: s.swap_in is None, "the handler's swap-in to be given up")
                assert s.swapped is not None and s.pages == []
            await until(lambda: not store.tiers.promoting and ns.pages_reserved == 0, "the reads")
            assert books(store, ns)["refs"] == {}
            view = await stub.SwapIn(request, timeout=10)
            assert same_bytes(ns, a, [p.slot for p in view.pages]) == [True] * 4
    finally:
        store.close()


async def test_deleting_the_namespace_waits_for_a_given_up_swap_ins_reads(tmp_path: Path) -> None:
    """A cancelled SwapIn's private pages may still be read into their slots on the reader
    threads: DeleteNamespace waits for those reads before it closes the pool under them."""
    from kvstore.store import namespaces

    store, ns, sid = make_store(tmp_path, host=False, disk=True)
    try:
        a = list(range(800, 800 + 2 * T + 1))
        seq = write(store, sid, a, commit=0)  # 3 private pages
        store.preempt(sid, seq, "swap_out")
        await to_device(store, tmp_path)
        s = store.sessions[sid].sequences[seq]
        with readers_held(store):
            task = asyncio.create_task(waits.swap_in(store, sid, seq))
            await _cancel_at_await(task, "swap_in: private pages read back", lambda: s.swap_in is not None)
            assert len(ns.private_reads) == 3
            delete = asyncio.create_task(
                namespaces.delete(store, "t", force=True, pool_epoch=ns.pool.handle.epoch)
            )
            for _ in range(3):  # its first steps: with nothing to wait for, it would be done
                await asyncio.sleep(0)
            assert not delete.done() and "t" in store.namespaces
        assert (await delete).sequences_released == 1
        assert not ns.private_reads and ns.pages_reserved == 0 and "t" not in store.namespaces
    finally:
        store.close()


def test_a_promotion_settled_as_failed_is_never_filed_as_in_flight(tmp_path: Path) -> None:
    """A promotion can settle during the lookup's own walk (reads from the page cache are done
    at its end; without a loop, every read is). One that settled as failed ends the hit there:
    it is neither counted nor left in the pin as pending (WaitPages then spun on it forever,
    its wait returning at once without ever yielding the loop).

    The failing record is made as a client scribbling over a sealed page would: the page came
    up from disk (keeping the checksum it verified against), its bytes changed in the pool,
    its record left the disk tier, and evicting it wrote the scribbled bytes under the old
    checksum; the next lookup finds that write still queued and reads it once committed."""
    from kvstore.tiers import PageKey

    store, ns, sid = make_store(tmp_path, host=False, disk=True)  # no running loop here
    try:
        tiers = store.tiers
        tokens = list(range(60, 60 + T))
        store.release_sequence(sid, write(store, sid, tokens))
        store.evict_all("t")
        tiers.disk.flush_sync()
        r = store.lookup(sid, "t", tokens, b"", False)  # up from disk, read here, verified
        assert r.hit_tokens == T and r.promotions == []
        ns.page_view(r.slots[0])[:] = b"\x07" * PB  # the scribble
        key = PageKey("t", r.block_hashes[0])
        tiers.disk.remove_async([key]).result(10)
        store.evict_all("t")  # written down again: the scribbled bytes, the old checksum
        assert key in tiers.queued, "the demotion's write committed already"
        failures = tiers.counters["promotion_failures"]

        r = store.lookup(sid, "t", tokens, b"", True)
        assert tiers.counters["promotion_failures"] == failures + 1  # it did settle, as failed
        assert (r.hit_tokens, r.pin_id, r.slots, r.promotions) == (0, 0, [], [])
        st = store.stats("t")[0]
        assert st.hit_tokens == 2 * T - T and st.miss_tokens == T  # the first lookup's page only
        assert books(store, ns) == {"free": 16, "reserved": 0, "refs": {}, "pins": 0}
    finally:
        store.close()
