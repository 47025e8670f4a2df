"""A put's own page checksums (docs/security.md, "Checksums the writer takes"): the client
library hashes each page as it copies it into its credit (XXH3-64, client/kvstore_client/
_ntcopy.c `copy_sum`) and sends the sums with the Put; the daemon keeps them as the pages'
checksums instead of reading the pages again. They are checked like its own: the scrubber
verifies them, a page changed after its seal is dropped, and a Put whose sums are wrong has
those pages dropped, never served again once found. A sums field of the wrong length is
refused, naming it, with the credit kept; a daemon without checksums neither asks for sums
nor uses them. Real daemon, real gRPC, the pool written through the client's mapping."""

from __future__ import annotations

import struct

import grpc
import kvstore_client
import numpy as np
import pytest
from e2e_helpers import Raw, prompt, wait_until
from kvstore_client import _ntcopy
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

from kvstore.store.page_sums import checksum

NS = "test"  # tests/daemon.py: 4 tokens a page, 64 pages of 1 KiB at a 4 KiB stride
T = 4

needs_fused = pytest.mark.skipif(
    _ntcopy.sum_kind() == "none", reason="this CPU has no AVX2: the client sends no page sums"
)


def ns_stats(kv: kvstore_client.Client) -> kvstore_client.results.NamespaceStats:
    return kv.stats(NS).namespaces[0]


@needs_fused
def test_a_puts_own_sums_are_kept_verified_by_the_scrubber_and_catch_a_later_change(daemon_factory) -> None:
    daemon = daemon_factory(server={"scrub_bytes_per_s": 1 << 20}).start()
    with kvstore_client.connect(daemon.target, client_name="summer") as kv:
        ns = kv.namespace(NS)
        size = ns.pool.page_bytes
        rng = np.random.default_rng(5)
        prompts = [prompt(4 * T, seed=50 + i) for i in range(6)]
        data = [rng.integers(0, 256, 4 * size, dtype=np.uint8) for _ in prompts]
        for tokens, kv_bytes in zip(prompts, data, strict=True):
            kv.put(NS, tokens, kv_bytes)
        s = ns_stats(kv)
        # The first put is Reserve + Seal (no credit yet: the daemon takes those 4), the rest
        # go into credits with their sums.
        assert s.pages_sums_given == 5 * 4, s
        wait_until(lambda: ns_stats(kv).pages_checksummed, lambda n: n == 4, timeout=10, what="checksums")
        wait_until(lambda: ns_stats(kv).pages_scrubbed, lambda n: n >= 2 * 24, timeout=20, what="two scrubs")
        assert ns_stats(kv).pages_corrupt == 0, "every kept sum matched its page's bytes"
        for tokens, kv_bytes in zip(prompts, data, strict=True):
            out = np.zeros(4 * size, dtype=np.uint8)
            assert kv.get(NS, tokens, out).pages == 4 and (out == kv_bytes).all()

        # A sealed page of the last put changed through a mapping: its kept sum catches it.
        hit = kv.lookup(NS, prompts[-1])
        slot = hit.slots[2]
        ns.pool.rows()[slot, 7] ^= 0xFF
        wait_until(lambda: ns_stats(kv).pages_corrupt, lambda n: n == 1, timeout=10, what="the scrubber")
        assert kv.lookup(NS, prompts[-1]).hit_tokens == 2 * T, "page 2 dropped: a miss from there on"
    assert "changed after its seal" in daemon.stderr_text()


@needs_fused
def test_a_put_whose_sums_are_wrong_has_those_pages_dropped_never_served(daemon_factory) -> None:
    daemon = daemon_factory(server={"scrub_bytes_per_s": 1 << 20}).start()
    with kvstore_client.connect(daemon.target, client_name="liar") as kv, Raw(daemon.target) as raw:
        ns = kv.namespace(NS)
        size = ns.pool.page_bytes
        kv.put(NS, prompt(2 * T, seed=1), np.ones(2 * size, dtype=np.uint8))  # grants a credit of 2
        (credit,) = kv._credits._held.pop(NS)
        assert credit.page_sums, "a daemon with checksums asks for the put's own"
        rows = ns.pool.rows()
        for s in credit.slots:
            rows[s] = 0x3C
        right = checksum(bytes([0x3C]) * size)
        tokens = prompt(2 * T, seed=2)

        def put(sums: bytes) -> pb.PutResponse:
            call = pb.PutRequest(
                session_id=kv.session_id,
                namespace=NS,
                token_ids=tokens,
                credit_sequence_id=credit.sequence_id,
                slots=credit.slots,
                page_sums=sums,
            )
            return raw.kv.Put(call, timeout=10)

        with pytest.raises(grpc.RpcError) as e:
            put(struct.pack("<Q", right))  # one sum for two pages
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "page_sums has 8 bytes" in e.value.details() and "16 bytes" in e.value.details()
        # Refused having changed nothing: the same credit takes the put, page 1's sum wrong.
        assert put(struct.pack("<2Q", right, right ^ 1)).sealed_pages == 2
        assert ns_stats(kv).pages_sums_given == 2
        wait_until(lambda: ns_stats(kv).pages_corrupt, lambda n: n == 1, timeout=10, what="the scrubber")
        assert kv.lookup(NS, tokens).hit_tokens == T, "page 0 serves; page 1 is dropped"
        out = np.zeros(2 * size, dtype=np.uint8)
        assert kv.get(NS, tokens, out).pages == 1 and (out[:size] == 0x3C).all()


def test_a_daemon_without_checksums_asks_for_no_sums_and_takes_none(daemon_factory) -> None:
    daemon = daemon_factory(server={"page_checksums": False}).start()
    with kvstore_client.connect(daemon.target, client_name="plain") as kv:
        size = kv.namespace(NS).pool.page_bytes
        for i in range(3):
            kv.put(NS, prompt(2 * T, seed=70 + i), np.full(2 * size, i, dtype=np.uint8))
            (credit,) = kv._credits._held[NS]
            assert not credit.page_sums
        s = ns_stats(kv)
        assert s.pages_sums_given == 0 and s.pages_checksummed == 0
        out = np.zeros(2 * size, dtype=np.uint8)
        assert kv.get(NS, prompt(2 * T, seed=72), out).pages == 2 and (out == 2).all()


def test_without_the_fused_copy_the_daemon_takes_the_sums_itself(daemon) -> None:
    """A client that cannot hash as it copies (sum kind "none": no AVX2) sends no sums; the
    daemon checksums those pages on its integrity thread, as before."""
    best = _ntcopy.sum_kind()
    _ntcopy.set_sum_kind("none")
    try:
        with kvstore_client.connect(daemon.target, client_name="no-avx2") as kv:
            size = kv.namespace(NS).pool.page_bytes
            for i in range(4):
                kv.put(NS, prompt(2 * T, seed=80 + i), np.full(2 * size, 9, dtype=np.uint8))
            wait_until(lambda: ns_stats(kv).pages_checksummed, lambda n: n == 8, timeout=10, what="checksums")
            assert ns_stats(kv).pages_sums_given == 0
    finally:
        _ntcopy.set_sum_kind(best)
