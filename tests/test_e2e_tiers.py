"""The tiers below the pool through a real daemon: demotion and promotion (host and disk),
persistence across kill -9, corrupt bytes on disk, a full disk tier, prefetch, in-flight
lookups, and preemption (swap out / swap in / drop), with bytes checked in other processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import kvstore_client
import pytest
from daemon import SMALL_NAMESPACE
from e2e_helpers import Worker, page_content_bytes, page_tokens_of, prompt, wait_until
from kvstore_client.errors import FailedPrecondition

T = SMALL_NAMESPACE["page_tokens"]
POOL_PAGES = 16
NS = dict(SMALL_NAMESPACE, num_pages=POOL_PAGES)


def tier_server(kind: str, tmp: Path, **more: Any) -> dict[str, Any]:
    server: dict[str, Any] = {}
    if kind in ("host", "both"):
        server["host_tier_bytes"] = 256 << 10
    if kind in ("disk", "both"):
        server["disk_tier_dir"] = str(tmp / "disk")
        server["disk_tier_bytes"] = 16 << 20
    return server | more


def tiers(client: Any) -> Any:
    return client.stats().tiers


def evict_everything(client: Any) -> int:
    return client.evict("test", all=True).pages_evicted


def check_bytes(worker: Worker, tokens: list[int], pages: int) -> None:
    """Another process looks `tokens` up (pinned) and reads every hit page through its own
    mapping: each must equal what the writer wrote."""
    found = worker.call("lookup", namespace="test", tokens=tokens, pin=True)
    assert found["hit_tokens"] == pages * T, found
    checked = worker.call("verify", namespace="test", tokens=tokens, slots=found["slots"])
    assert checked["mismatched"] == [], checked
    worker.call("release_pin", pin_id=found["pin_id"])


@pytest.mark.parametrize("kind", ["host", "disk"])
def test_demote_then_promote_is_byte_identical_in_another_process(
    kind: str, daemon_factory: Any, tmp_path: Path
) -> None:
    d = daemon_factory(server=tier_server(kind, tmp_path), namespaces=[NS]).start()
    tokens = prompt(8 * T, seed=1)
    with Worker("writer") as a, Worker("reader") as b, kvstore_client.connect(d.target) as client:
        a.call("connect", target=d.target)
        b.call("connect", target=d.target)
        a.call("write_prompt", namespace="test", tokens=tokens, release=True)
        assert evict_everything(client) == 8
        stats = client.stats("test")
        assert stats.namespaces[0].pages_sealed == 0  # out of the pool...
        assert stats.tiers.demoted_pages == 8  # ...and below it
        if kind == "disk":
            client.flush()  # (a demotion to disk is committed asynchronously)
            assert tiers(client).disk_pages == 8
        else:
            assert tiers(client).host_pages == 8
        check_bytes(b, tokens, 8)  # promoted on the lookup
        assert tiers(client).promoted_pages == 8
        assert client.stats("test").namespaces[0].pages_sealed == 8


def test_pool_pressure_demotes_to_host_then_disk(daemon_factory: Any, tmp_path: Path) -> None:
    """More prompts than the pool and the host tier hold: every one still hits, byte-identical."""
    server = tier_server("both", tmp_path, host_tier_bytes=8 * 1024)  # 8 pages of 1 KiB
    d = daemon_factory(server=server, namespaces=[NS]).start()
    prompts = [prompt(4 * T, seed=100 + i) for i in range(10)]  # 40 pages: pool 16 + host 8 + disk
    with Worker("writer") as a, Worker("reader") as b, kvstore_client.connect(d.target) as client:
        a.call("connect", target=d.target)
        b.call("connect", target=d.target)
        for tokens in prompts:
            a.call("write_prompt", namespace="test", tokens=tokens, release=True)
        client.flush()
        t = tiers(client)
        assert t.demoted_pages >= 40 - POOL_PAGES and t.disk_pages > 0 and t.host_pages <= 8
        for tokens in prompts:
            check_bytes(b, tokens, 4)


def test_flushed_pages_survive_kill_9(daemon_factory: Any, tmp_path: Path) -> None:
    server = tier_server("disk", tmp_path)
    d = daemon_factory(server=server, namespaces=[NS]).start()
    flushed = [prompt(3 * T, seed=200 + i) for i in range(4)]
    late = prompt(3 * T, seed=299)
    with Worker("writer") as a:
        a.call("connect", target=d.target)
        for tokens in flushed:
            a.call("write_prompt", namespace="test", tokens=tokens, release=True)
        with kvstore_client.connect(d.target) as client:
            result = client.flush()
            assert result.pages_written == 12 and result.disk_pages == 12
        a.call("write_prompt", namespace="test", tokens=late, release=True)  # never flushed
    d.kill()
    d.start()
    with Worker("reader") as b, kvstore_client.connect(d.target) as client:
        wait_until(
            lambda: tiers(client),
            lambda t: not t.reindex_running and t.disk_pages >= 12,
            timeout=10,
            what="the re-index after restart",
        )
        assert "re-index of the disk tier done: 12 pages" in d.stderr_text()
        b.call("connect", target=d.target)
        for tokens in flushed:
            check_bytes(b, tokens, 3)
        # Not flushed: found whole and identical, or missed; never wrong bytes.
        found = b.call("lookup", namespace="test", tokens=late, pin=True)
        checked = b.call("verify", namespace="test", tokens=late, slots=found["slots"])
        assert checked["mismatched"] == []


def test_write_through_persists_without_flush(daemon_factory: Any, tmp_path: Path) -> None:
    d = daemon_factory(server=tier_server("disk", tmp_path, write_through=True), namespaces=[NS]).start()
    tokens = prompt(5 * T, seed=300)
    with Worker("writer") as a, kvstore_client.connect(d.target) as client:
        a.call("connect", target=d.target)
        a.call("write_prompt", namespace="test", tokens=tokens, release=True)
        wait_until(lambda: tiers(client), lambda t: t.disk_pages == 5, timeout=10, what="write-through")
        assert client.flush().pages_written == 0  # everything sealed was queued already
    d.kill()
    d.start()
    with Worker("reader") as b, kvstore_client.connect(d.target) as client:
        wait_until(lambda: tiers(client), lambda t: not t.reindex_running, timeout=10, what="re-index")
        b.call("connect", target=d.target)
        check_bytes(b, tokens, 5)


def test_corrupt_bytes_on_disk_are_missed_not_served(daemon_factory: Any, tmp_path: Path) -> None:
    d = daemon_factory(server=tier_server("disk", tmp_path), namespaces=[NS]).start()
    tokens = prompt(4 * T, seed=400)
    with Worker("writer") as a, kvstore_client.connect(d.target) as client:
        a.call("connect", target=d.target)
        a.call("write_prompt", namespace="test", tokens=tokens, release=True)
        client.flush()
    assert d.terminate() == 0
    # Flip bytes inside page 2's payload in the LMDB file itself.
    data = tmp_path / "disk" / "data.mdb"
    raw = bytearray(data.read_bytes())
    shape = [NS["num_layers"], 2, T, NS["num_kv_heads"], NS["head_dim"]]
    page2 = page_content_bytes(2, page_tokens_of(tokens, 2, T), shape)
    # (Every copy: LMDB's copy-on-write leaves older versions of a leaf page in the file.)
    needle, at, copies = page2[100:164], 0, 0
    while (at := raw.find(needle, at)) >= 0:
        raw[at : at + 8] = bytes(b ^ 0xFF for b in raw[at : at + 8])
        copies += 1
    assert copies, "page 2's bytes are not in data.mdb"
    data.write_bytes(bytes(raw))
    d.start()
    with Worker("reader") as b, kvstore_client.connect(d.target) as client:
        wait_until(lambda: tiers(client), lambda t: not t.reindex_running, timeout=10, what="re-index")
        b.call("connect", target=d.target)
        found = b.call("lookup", namespace="test", tokens=tokens, pin=True)
        assert found["hit_tokens"] == 2 * T  # pages 0 and 1; the hit ends at the corrupt page
        assert b.call("verify", namespace="test", tokens=tokens, slots=found["slots"])["mismatched"] == []
        t = tiers(client)
        assert t.corrupt_pages == 1 and t.promotion_failures >= 1
        assert "corrupt" in d.stderr_text()
        # The daemon serves on, and the page is gone for good: the next lookup misses it too.
        again = client.lookup("test", tokens)
        assert again.hit_tokens == 2 * T


def test_full_disk_tier_keeps_serving(daemon_factory: Any, tmp_path: Path) -> None:
    # A 2 MiB map keeps 1 MiB of headroom: pages of 4 KiB fill the rest after ~250.
    server = tier_server("disk", tmp_path, disk_tier_bytes=2 << 20)
    d = daemon_factory(server=server, namespaces=[dict(NS, head_dim=64)]).start()
    with Worker("writer") as a, kvstore_client.connect(d.target) as client:
        a.call("connect", target=d.target)
        for i in range(100):  # 400 pages
            a.call("write_prompt", namespace="test", tokens=prompt(4 * T, seed=1000 + i), release=True)
            client.evict("test", all=True)
        client.flush()
        t = tiers(client)
        assert t.disk_full_events > 0, t
        assert t.disk_pages < 400 and t.disk_bytes_used <= t.disk_capacity_bytes
        assert client.health() == "SERVING"
        newest = prompt(4 * T, seed=1099)
        assert client.lookup("test", newest).hit_tokens == 4 * T  # the newest survived
        oldest = prompt(4 * T, seed=1000)
        assert client.lookup("test", oldest).hit_tokens == 0  # the oldest made room


def test_prefetch_brings_up_what_followed(daemon_factory: Any, tmp_path: Path) -> None:
    d = daemon_factory(server=tier_server("host", tmp_path, prefetch_pages=2), namespaces=[NS]).start()
    tokens = prompt(6 * T, seed=500)
    with Worker("writer") as a, kvstore_client.connect(d.target) as client:
        a.call("connect", target=d.target)
        a.call("write_prompt", namespace="test", tokens=tokens, release=True)
        evict_everything(client)
        assert client.lookup("test", tokens[: 3 * T]).hit_tokens == 3 * T
        t = tiers(client)
        assert t.prefetched_pages == 2 and t.promoted_pages == 5
        assert client.stats("test").namespaces[0].pages_sealed == 5  # pages 3 and 4 came along


def test_return_in_flight_then_wait(daemon_factory: Any, tmp_path: Path) -> None:
    d = daemon_factory(server=tier_server("disk", tmp_path), namespaces=[NS]).start()
    tokens = prompt(8 * T, seed=600)
    with Worker("writer") as a, kvstore_client.connect(d.target) as client:
        a.call("connect", target=d.target)
        a.call("write_prompt", namespace="test", tokens=tokens, release=True)
        evict_everything(client)
        client.flush()
        with client.lookup("test", tokens, pin=True, return_in_flight=True) as hit:
            assert hit.hit_tokens == 8 * T and hit.ready_pages <= 8
            hit.wait(pages=3)
            assert hit.ready_pages >= 3
            hit.wait()
            assert hit.ready_pages == 8
            shape = [NS["num_layers"], 2, T, NS["num_kv_heads"], NS["head_dim"]]
            for i, view in enumerate(hit.views()):
                want = page_content_bytes(i, page_tokens_of(tokens, i, T), shape)
                assert view.contiguous().view(-1).numpy().tobytes() == want
        with pytest.raises(
            kvstore_client.errors.InvalidArgument, match="return_in_flight=true needs pin=true"
        ):
            client.lookup("test", tokens, return_in_flight=True)


@pytest.mark.parametrize("kind", ["host", "disk"])
def test_swap_out_and_in_round_trip(kind: str, daemon_factory: Any, tmp_path: Path) -> None:
    """A live sequence with sealed pages, an uncommitted full page and a partial last page:
    swapped out its pool pages are freed; swapped in, every byte is back (new slots)."""
    d = daemon_factory(server=tier_server(kind, tmp_path), namespaces=[NS]).start()
    tokens = prompt(5 * T + 2, seed=700)
    with kvstore_client.connect(d.target) as client:
        ns = client.namespace("test")
        seq = client.allocate(ns)
        seq.append(tokens)
        for page in seq.pages:
            ns.page(page.slot).copy_(_content(ns, page.index, tokens))
        seq.commit(3 * T)  # pages 0-2 sealed; 3, 4 (full) and 5 (partial) still the sequence's
        free_before = client.stats("test").namespaces[0].pages_free
        result = seq.swap_out()
        assert result.pages_swapped == 6 and result.pages_freed == 6
        assert client.stats("test").namespaces[0].pages_free == free_before + 6
        assert tiers(client).swapped_pages == 6
        with pytest.raises(FailedPrecondition, match="swapped out"):
            seq.append([1])
        client.evict("test", all=True)  # nothing of it is left in the pool
        seq.swap_in()
        assert tiers(client).swapped_pages == 0
        assert [p.index for p in seq.pages] == [0, 1, 2, 3, 4, 5]
        for page in seq.pages:
            got = ns.page(page.slot).contiguous().view(-1).numpy().tobytes()
            assert got == _content(ns, page.index, tokens).contiguous().view(-1).numpy().tobytes(), page
        # and it goes on as if nothing happened
        seq.append(tokens[:2])
        seq.commit()
        assert seq.committed_tokens == 5 * T + 4


def test_swap_in_under_pool_pressure(daemon_factory: Any, tmp_path: Path) -> None:
    """SwapIn when the pool is full: it keeps its own resident pages while it makes room (they
    were the least recently used), or fails with RESOURCE_EXHAUSTED and changes nothing; with
    room again it succeeds, every byte back, and Release frees exactly what it holds."""
    from kvstore_client.errors import ResourceExhausted

    d = daemon_factory(server=tier_server("host", tmp_path), namespaces=[NS]).start()
    a, b = prompt(6 * T, seed=1100), prompt(12 * T, seed=1200)
    with kvstore_client.connect(d.target) as client:
        ns = client.namespace("test")

        def pool() -> Any:
            return client.stats("test").namespaces[0]

        seq = client.allocate(ns)
        seq.append(a)
        for page in seq.pages:
            ns.page(page.slot).copy_(_content(ns, page.index, a))
        seq.commit(4 * T)  # pages 0-3 sealed; 4 and 5 the sequence's own
        pin = client.lookup(ns, a[: 4 * T], pin=True)  # 0-3 stay in the pool through swap-out
        assert seq.swap_out().pages_freed == 2
        pin.release()
        with client.allocate(ns) as other:  # 12 newer pages: the pool is full, nothing pinned
            other.append(b)
            other.commit()
        assert (pool().pages_free, pool().pages_pinned) == (0, 0)
        seq.swap_in()
        assert [p.index for p in seq.pages] == [0, 1, 2, 3, 4, 5]
        for page in seq.pages:
            got = ns.page(page.slot).contiguous().view(-1).numpy().tobytes()
            assert got == _content(ns, page.index, a).contiguous().view(-1).numpy().tobytes(), page

        seq.swap_out()
        hog = client.allocate(ns, pool().pages_free * T + pool().pages_sealed * T)  # every page
        before = pool()
        with pytest.raises(ResourceExhausted, match="swap_in of sequence"):
            seq.swap_in()
        assert pool() == before and tiers(client).swapped_pages == 6
        with pytest.raises(FailedPrecondition, match="swapped out"):
            seq.append([1])
        hog.release()
        seq.swap_in()
        assert tiers(client).swapped_pages == 0
        r = seq.release()
        assert r is not None and (r.pages_freed, r.pages_unpinned) == (2, 4)
        assert (pool().pages_free + pool().pages_sealed, pool().pages_pinned) == (POOL_PAGES, 0)


def _content(ns: Any, index: int, tokens: list[int]) -> Any:
    from e2e_helpers import page_content

    return page_content(index, page_tokens_of(tokens, index, T), ns.page_shape, ns.dtype)


def test_drop_frees_and_empties(daemon_factory: Any, tmp_path: Path) -> None:
    d = daemon_factory(namespaces=[NS]).start()  # no tiers: drop needs none, swap_out refuses
    tokens = prompt(3 * T, seed=800)
    with kvstore_client.connect(d.target) as client:
        seq = client.allocate("test")
        seq.append(tokens)
        seq.commit()
        with pytest.raises(FailedPrecondition, match="no tier below the pool"):
            seq.swap_out()
        assert seq.drop().pages_freed == 3
        assert seq.num_tokens == 0 and seq.refresh().num_tokens == 0
        # recompute: the sealed pages are still cached, so the append finds them
        assert seq.append(tokens).cached_tokens == 3 * T


def test_dead_client_with_swapped_sequence_leaks_nothing(daemon_factory: Any, tmp_path: Path) -> None:
    d = daemon_factory(server=tier_server("host", tmp_path), namespaces=[NS]).start()
    with kvstore_client.connect(d.target) as client, Worker("victim") as w:
        w.call("connect", target=d.target)
        tokens = prompt(2 * T + 1, seed=900)
        w.call("swap_out_partial", namespace="test", tokens=tokens)
        t = tiers(client)
        assert t.swapped_pages == 3 and t.host_pages == 3
        w.kill()
        wait_until(
            lambda: (tiers(client), client.stats("test").namespaces[0]),
            lambda s: s[0].swapped_pages == 0 and s[1].sequences == 0,
            timeout=10,
            what="the dead client's swapped sequence to be freed",
        )
        # Its private (partial) page is gone from the host tier; its two sealed pages stay
        # there as cache, like any evicted page: found by a lookup, not leaked.
        assert tiers(client).host_pages == 2
        assert client.stats("test").namespaces[0].pages_free == POOL_PAGES
        assert client.lookup("test", tokens).hit_tokens == 2 * T


def test_preempt_bad_input(daemon_factory: Any, tmp_path: Path) -> None:
    from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb
    from kvstore_proto.kvstore.v1 import kvstore_pb2_grpc as pb_grpc

    d = daemon_factory(server=tier_server("host", tmp_path), namespaces=[NS]).start()
    with kvstore_client.connect(d.target) as client, grpc.insecure_channel(d.target) as channel:
        seq = client.allocate("test")
        stub = pb_grpc.KVStoreStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Preempt(pb.PreemptRequest(session_id=client.session_id, sequence_id=seq.sequence_id))
        assert (
            err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "PREEMPT_SWAP_OUT" in err.value.details()
        )
        with pytest.raises(grpc.RpcError) as err:
            stub.SwapIn(pb.SwapInRequest(session_id=client.session_id, sequence_id=seq.sequence_id))
        assert (
            err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            and "not swapped out" in err.value.details()
        )
        with pytest.raises(grpc.RpcError) as err:
            stub.WaitPages(pb.WaitPagesRequest(session_id=client.session_id, pin_id=12345))
        assert err.value.code() is grpc.StatusCode.NOT_FOUND
        assert client.health() == "SERVING"


def _write_pages(client: Any, tokens: list[int]) -> None:
    """Store `tokens` with each page's known content (e2e_helpers.page_content), released."""
    ns = client.namespace("test")
    with client.allocate(ns) as seq:
        seq.append(tokens)
        for page in seq.pages:
            ns.page(page.slot).copy_(_content(ns, page.index, tokens))
        seq.commit()


def _pool_bytes(client: Any, tokens: list[int]) -> tuple[int, list[bool]]:
    """(hit pages, whether each hit page holds the bytes written for it), read in the pool."""
    ns = client.namespace("test")
    with client.lookup(ns, tokens, pin=True) as hit:
        same = [
            ns.page(slot).contiguous().view(-1).numpy().tobytes()
            == _content(ns, i, tokens).contiguous().view(-1).numpy().tobytes()
            for i, slot in enumerate(hit.slots)
        ]
        return hit.hit_tokens // T, same


def test_a_promoted_page_keeps_its_copies_below_and_evicting_it_again_copies_nothing(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """Both tiers are inclusive of the pool: a page promoted from the host tier stays there, so
    the pool evicting it again is free (`demoted_pages` counts it, the host tier gains no page),
    and the copy below is the one made when it was first demoted: bytes a client scribbles
    over a sealed page in the pool (it must not, but the mapping lets it) are never kept."""
    d = daemon_factory(server=tier_server("host", tmp_path), namespaces=[NS]).start()
    tokens = prompt(4 * T, seed=1100)
    with kvstore_client.connect(d.target) as client:
        _write_pages(client, tokens)
        assert evict_everything(client) == 4
        assert tiers(client).host_pages == 4 and tiers(client).demoted_pages == 4
        assert _pool_bytes(client, tokens) == (4, [True] * 4)  # promoted from the host tier
        assert tiers(client).promoted_pages == 4 and tiers(client).host_pages == 4  # still there
        ns = client.namespace("test")
        with client.lookup(ns, tokens, pin=True) as hit:
            ns.page(hit.slots[2]).fill_(7)  # scribble over a sealed page in the pool
        assert evict_everything(client) == 4
        assert tiers(client).demoted_pages == 8 and tiers(client).host_pages == 4  # nothing copied
        assert _pool_bytes(client, tokens) == (4, [True] * 4)  # the host copy: the bytes written


def test_a_page_promoted_from_disk_through_the_page_cache_is_not_copied_down_again(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """A page promoted from disk whose record was read through the OS page cache is only
    freed when the pool evicts it again (its bytes are in DRAM there already): nothing is
    copied into the host tier, and bytes scribbled over it in the pool are never served: the
    next lookup reads the intact disk record. (A page read from the device instead is copied
    into the host tier under the checksum it verified against: tests/test_tiers_store.py.)"""
    server = tier_server("both", tmp_path, host_tier_bytes=4 * 1024)  # 4 pages of 1 KiB
    d = daemon_factory(server=server, namespaces=[NS]).start()
    a, b = prompt(4 * T, seed=1200), prompt(4 * T, seed=1201)
    with kvstore_client.connect(d.target) as client:
        _write_pages(client, a)
        evict_everything(client)  # a -> host
        _write_pages(client, b)
        evict_everything(client)  # b -> host, pushing a to disk
        client.flush()  # (commits a; writes b's host copies to disk too)
        assert tiers(client).host_pages == 4 and tiers(client).disk_pages == 8
        ns = client.namespace("test")
        with client.lookup(ns, a, pin=True) as hit:  # promoted from disk
            assert hit.hit_tokens == 4 * T
            ns.page(hit.slots[1]).fill_(7)
        demoted, corrupt = tiers(client).demoted_pages, tiers(client).corrupt_pages
        evict_everything(client)
        assert tiers(client).demoted_pages == demoted + 4
        assert _pool_bytes(client, b) == (4, [True] * 4)  # b's pages are still the host tier's
        assert tiers(client).host_pages == 4
        assert _pool_bytes(client, a) == (4, [True] * 4)  # from disk, as written
        assert tiers(client).corrupt_pages == corrupt


def test_a_page_demoted_to_disk_a_moment_ago_is_found_before_its_write_commits(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """A lookup right after an eviction to disk (no flush) finds the pages whose write is still
    queued: the read waits for the write on a reader thread instead of missing."""
    d = daemon_factory(server=tier_server("disk", tmp_path), namespaces=[NS]).start()
    with kvstore_client.connect(d.target) as client:
        for i in range(12):
            tokens = prompt(4 * T, seed=1300 + i)
            _write_pages(client, tokens)
            evict_everything(client)
            assert _pool_bytes(client, tokens) == (4, [True] * 4), i
        assert tiers(client).promotion_failures == 0
