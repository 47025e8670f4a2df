"""Integrity of sealed pages in the pool (docs/security.md, "Sealed pages"): a writer that
scribbles on its sealed page through its mapping has the page dropped by the scrubber (new
lookups miss it, from another process), a copy of a scribbled page below the pool is
refused (nothing of it reaches LMDB), and a page committed without being written serves
zeros, never its previous occupant's bytes (small pages, memset; larger ones, streaming stores with
a tail: kvstore/_ntzero.c). Real daemon, separate worker processes."""

from __future__ import annotations

import math
import time

import pytest
import xxhash
from daemon import SMALL_NAMESPACE
from e2e_helpers import Raw, Worker, page_content_bytes, page_tokens_of, prompt, read_page, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

from kvstore.store import integrity, page_sums

NS = "test"  # tests/daemon.py: 4 tokens a page, 64 pages of 1 KiB
T = 4
TOTAL = 64
SHAPE = (2, 2, 4, 2, 16)


def stat(raw: Raw, field: str) -> int:
    return getattr(raw.stats(NS)[0], field)


def test_the_scrubber_reaches_a_page_in_a_large_sparse_pool(daemon_factory) -> None:
    # Its cursor steps over a bounded number of slots a tick (integrity.SCRUB_SCAN): in a pool
    # of 8,192 pages holding two, a pass takes many ticks and still comes round to them.
    big = {**SMALL_NAMESPACE, "num_pages": 8192}
    daemon = daemon_factory(server={"scrub_bytes_per_s": 1 << 20}, namespaces=[big]).start()
    tokens = prompt(8, seed=2)
    with Worker("writer") as writer, Raw(daemon.target) as raw:
        writer.call("connect", target=daemon.target, client_name="scribbler")
        wrote = writer.call("write_prompt", namespace=NS, tokens=tokens)
        wait_until(lambda: stat(raw, "pages_checksummed"), lambda n: n >= 2, timeout=10, what="checksums")
        scrubbed = stat(raw, "pages_scrubbed")
        writer.call("write_bytes", namespace=NS, slot=wrote["slots"][0], offset=7, data_hex="5a" * 8)
        wait_until(lambda: stat(raw, "pages_corrupt"), lambda n: n == 1, timeout=20, what="the scrubber")
        assert stat(raw, "pages_scrubbed") > scrubbed
        assert writer.call("lookup", namespace=NS, tokens=tokens)["hit_tokens"] == 0


def test_the_scrubber_passes_over_a_small_pool_at_most_once_a_second(daemon_factory) -> None:
    # At 1 MiB/s and a tick of 50 ms, two sealed pages of 1 KiB would be read ~20 times a
    # second each (a pass a tick); a pass starts at most every integrity.SCRUB_MIN_PASS_S.
    daemon = daemon_factory(server={"scrub_bytes_per_s": 1 << 20}).start()
    with Worker("writer") as writer, Raw(daemon.target) as raw:
        writer.call("connect", target=daemon.target, client_name="writer")
        writer.call("write_prompt", namespace=NS, tokens=prompt(8, seed=3))  # two full pages
        wait_until(lambda: stat(raw, "pages_checksummed"), lambda n: n >= 2, timeout=10, what="checksums")
        wait_until(lambda: stat(raw, "pages_scrubbed"), lambda n: n >= 2, timeout=10, what="a first pass")
        t0, scrubbed = time.monotonic(), stat(raw, "pages_scrubbed")
        wait_until(
            lambda: stat(raw, "pages_scrubbed"), lambda n: n >= scrubbed + 4, timeout=10, what="two passes"
        )
        time.sleep(1.0)  # (the window the count is bounded over, not a wait for an event)
        passes = (stat(raw, "pages_scrubbed") - scrubbed) / 2
        elapsed = time.monotonic() - t0
        # (+2: the passes started in the window, and one started before it whose count came
        # after t0; without the bound a pass a tick would count ~20 a second)
        assert passes <= elapsed / integrity.SCRUB_MIN_PASS_S + 2, (passes, elapsed)


def test_a_page_scribbled_on_after_its_seal_is_dropped_by_the_scrubber(daemon_factory) -> None:
    daemon = daemon_factory(server={"scrub_bytes_per_s": 1 << 20}).start()
    tokens = prompt(8, seed=1)  # two full pages
    with Worker("writer") as writer, Worker("reader") as reader, Raw(daemon.target) as raw:
        writer.call("connect", target=daemon.target, client_name="scribbler")
        reader.call("connect", target=daemon.target, client_name="reader")
        wrote = writer.call("write_prompt", namespace=NS, tokens=tokens)
        slots = wrote["slots"]
        wait_until(lambda: stat(raw, "pages_checksummed"), lambda n: n >= 2, timeout=10, what="checksums")
        pinned = reader.call("lookup", namespace=NS, tokens=tokens, pin=True)
        assert pinned["hit_tokens"] == 8
        writer.call("write_bytes", namespace=NS, slot=slots[1], offset=100, data_hex="ff" * 16)

        wait_until(lambda: stat(raw, "pages_corrupt"), lambda n: n == 1, timeout=10, what="the scrubber")
        assert reader.call("lookup", namespace=NS, tokens=tokens)["hit_tokens"] == 4  # page 1: a miss
        # A new writer of the same prompt writes page 1 again instead of getting the scribble.
        with Worker("rewriter") as rewriter:
            rewriter.call("connect", target=daemon.target, client_name="rewriter")
            again = rewriter.call("write_prompt", namespace=NS, tokens=tokens, release=True)
            assert again["states"] == ["CACHED", "WRITABLE"]
        found = reader.call("lookup", namespace=NS, tokens=tokens)
        assert found["hit_tokens"] == 8 and found["slots"][1] != slots[1]
        assert reader.call("verify", namespace=NS, tokens=tokens, slots=found["slots"])["mismatched"] == []
        # The corrupt page is freed once its holders (the writer, the pin) let go.
        reader.call("release_pin", pin_id=pinned["pin_id"])
        writer.call("release", sequence_id=wrote["sequence_id"])
        wait_until(lambda: raw.counts(NS)["pages_sealed"], lambda n: n == 2, timeout=10, what="the sweep")
    log = daemon.stderr_text()
    assert "changed after its seal" in log and "'scribbler'" in log


def test_a_scribbled_page_is_never_copied_to_the_disk_tier(daemon_factory, tmp_path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir(mode=0o700)
    daemon = daemon_factory(server={"scrub_bytes_per_s": 0, "disk_tier_dir": str(disk)}).start()
    flushed_one, evicted_one, fine = prompt(8, seed=2), prompt(8, seed=5), prompt(8, seed=6)
    with Worker("writer") as writer, Raw(daemon.target) as raw:
        writer.call("connect", target=daemon.target, client_name="scribbler")

        def scribbled(tokens: list[int], checksummed: int) -> None:
            slots = writer.call("write_prompt", namespace=NS, tokens=tokens, release=True)["slots"]
            wait_until(
                lambda: stat(raw, "pages_checksummed"), lambda n: n >= checksummed, timeout=10, what="sums"
            )
            writer.call("write_bytes", namespace=NS, slot=slots[1], offset=0, data_hex="00" * 64)

        # Admin.Flush copies every sealed page to disk: not the scribbled one.
        writer.call("write_prompt", namespace=NS, tokens=fine, release=True)
        scribbled(flushed_one, 4)
        assert raw.admin.Flush(pb.FlushRequest(), timeout=30).disk_pages == 3
        assert stat(raw, "copies_refused") == 1 and stat(raw, "pages_corrupt") == 1
        wait_until(lambda: raw.counts(NS)["pages_sealed"], lambda n: n == 3, timeout=10, what="the sweep")
        # An eviction demotes to disk: not the scribbled page either.
        scribbled(evicted_one, 5)
        assert raw.kv.Evict(pb.EvictRequest(namespace=NS, all=True), timeout=10).pages_evicted == 5
        assert stat(raw, "copies_refused") == 2 and stat(raw, "pages_corrupt") == 2
        assert raw.admin.Flush(pb.FlushRequest(), timeout=30).disk_pages == 4
        # Page 0 of each comes back from disk; page 1 is a miss, never the scribbled bytes.
        for tokens, hit in ((flushed_one, 4), (evicted_one, 4), (fine, 8)):
            assert writer.call("lookup", namespace=NS, tokens=tokens)["hit_tokens"] == hit


# Pages of 4,320 B (5 layers x 2 x 4 tokens x 3 heads x 18 dims x 2 B): zeroed with streaming
# stores (kvstore/_ntzero.c, from 4 KiB), and not a multiple of 64 B (a tail set apart).
STREAMED = {**SMALL_NAMESPACE, "num_layers": 5, "num_kv_heads": 3, "head_dim": 18}


@pytest.mark.parametrize(
    ("namespace", "shape"),
    [(SMALL_NAMESPACE, SHAPE), (STREAMED, (5, 2, T, 3, 18))],
    ids=["1KiB-pages", "4320B-pages"],
)
def test_a_page_committed_unwritten_serves_zeros_never_old_bytes(daemon_factory, namespace, shape) -> None:
    daemon = daemon_factory(namespaces=[namespace]).start()
    size = math.prod(shape) * 2
    old = prompt(TOTAL * T, seed=3)  # every page of the pool, each with distinctive bytes
    new = prompt(2 * T, seed=4)
    with Worker("first") as first, Worker("second") as second, Raw(daemon.target) as raw:
        first.call("connect", target=daemon.target, client_name="first")
        first.call("write_prompt", namespace=NS, tokens=old, release=True)
        assert raw.kv.Evict(pb.EvictRequest(namespace=NS, all=True), timeout=10).pages_evicted == TOTAL
        second.call("connect", target=daemon.target, client_name="second")
        seq = second.call("allocate", namespace=NS)["sequence_id"]
        slots = second.call("append", sequence_id=seq, tokens=new)["slots"]
        second.call("commit", sequence_id=seq)  # nothing written
        found = first.call("lookup", namespace=NS, tokens=new)
        assert found["hit_tokens"] == 2 * T and found["slots"] == slots
        olds = {page_content_bytes(i, page_tokens_of(old, i, T), shape).hex() for i in range(TOTAL)}
        for slot in slots:
            got = first.call("read_bytes", namespace=NS, slot=slot, offset=0, n=size)
            assert got not in olds
            assert got == "00" * size
            assert read_page(daemon.target, NS, slot) == bytes(size)  # (and in this process)
        s = raw.stats(NS)[0]
        assert s.pages_zeroed + s.pages_zeroed_inline >= 2


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=0, max_size=200_000))
def test_the_page_checksum_is_xxh3_64_of_the_bytes(data: bytes) -> None:
    # Also through a memoryview of a larger buffer, as the daemon hashes pool slots.
    padded = bytearray(b"\x01" + data + b"\x02")
    assert page_sums.checksum(memoryview(padded)[1:-1]) == xxhash.xxh3_64_intdigest(data)
