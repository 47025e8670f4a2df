"""Sealed pages that leave the pool before their checksum is taken are counted
(`pages_unchecked`, docs/security.md "The window before the check"). A Put seals its pages
and grants the next credit in one step on the loop; when everything else in the pool is
pinned, that grant evicts the pages just sealed (zero_ahead.py keeps two credits free), so
they leave before the integrity thread could have seen them, every time. With the thread
keeping up (a quiet run, nothing evicted) the count stays 0. A client that hashes its pages
as it copies them (Put's page_sums, the library's default on AVX2) leaves no such window: the
same evictions count nothing. Real daemon, real gRPC."""

from __future__ import annotations

import kvstore_client
import numpy as np
import pytest
from e2e_helpers import prompt, wait_until
from kvstore_client import _ntcopy

NS = "test"  # tests/daemon.py: 4 tokens a page, 64 pages of 1 KiB: a credit is at most 8
T = 4
PAGES = 8


@pytest.fixture
def no_client_sums():
    """The client copies without hashing (as on a CPU without AVX2): the daemon takes them."""
    best = _ntcopy.sum_kind()
    _ntcopy.set_sum_kind("none")
    yield
    _ntcopy.set_sum_kind(best)


@pytest.fixture(autouse=True)
def zeroed_credits(monkeypatch):
    """Credits of zeroed pages (`KVSTORE_UNZEROED_CREDITS=0`): their grants zero ahead, which
    evicts the pages the last put sealed (what these tests count)."""
    monkeypatch.setattr(kvstore_client._put, "ASK_UNZEROED", False)


def test_pages_evicted_before_their_checksum_are_counted_and_none_in_a_quiet_run(
    daemon, no_client_sums
) -> None:
    with kvstore_client.connect(daemon.target, client_name="unchecked") as kv:
        size = kv.namespace(NS).pool.page_bytes
        data = np.full(PAGES * size, 0x5A, dtype=np.uint8)
        stats = lambda: kv.stats(NS).namespaces[0]  # noqa: E731
        held = [prompt(PAGES * T, seed=300 + i) for i in range(6)]  # 48 pages + a credit + 8 free
        for tokens in held:
            kv.put(NS, tokens, data)
        wait_until(stats, lambda s: s.pages_checksummed >= 6 * PAGES, timeout=10, what="checksums")
        quiet = stats()
        assert quiet.evictions == 0 and quiet.pages_unchecked == 0, quiet

        pins = [kv.lookup(NS, tokens, pin=True) for tokens in held]
        assert all(p.hit_tokens == PAGES * T for p in pins)
        for i in range(3):  # only the pages each put seals are evictable: its own grant evicts them
            kv.put(NS, prompt(PAGES * T, seed=400 + i), data)
        wait_until(stats, lambda s: s.pages_unchecked >= 3 * PAGES, timeout=10, what="the count")
        s = stats()
        assert s.evictions == 3 * PAGES and s.pages_unchecked == 3 * PAGES, s
        assert s.pages_checksummed == 6 * PAGES, "none of the evicted pages was checksummed"
        for tokens, pin in zip(held, pins, strict=True):  # the pinned pages serve on, unharmed
            out = np.zeros(PAGES * size, np.uint8)
            assert kv.get(NS, tokens, out).pages == PAGES and (out == 0x5A).all()
            pin.release()


@pytest.mark.skipif(
    _ntcopy.sum_kind() == "none", reason="this CPU has no AVX2: the client sends no page sums"
)
def test_pages_sealed_with_their_writers_sums_are_never_unchecked(daemon) -> None:
    """The same pressure, the puts' sums given: the pages their grants evict had a checksum
    from their seal on (checked before any copy below), so none is counted unchecked."""
    with kvstore_client.connect(daemon.target, client_name="summed") as kv:
        size = kv.namespace(NS).pool.page_bytes
        data = np.full(PAGES * size, 0x5A, dtype=np.uint8)
        stats = lambda: kv.stats(NS).namespaces[0]  # noqa: E731
        held = [prompt(PAGES * T, seed=300 + i) for i in range(6)]
        for tokens in held:
            kv.put(NS, tokens, data)
        wait_until(
            stats, lambda s: s.pages_checksummed >= PAGES, timeout=10, what="the first put's checksums"
        )
        pins = [kv.lookup(NS, tokens, pin=True) for tokens in held]
        for i in range(3):
            kv.put(NS, prompt(PAGES * T, seed=400 + i), data)
        s = stats()
        assert s.evictions == 3 * PAGES and s.pages_sums_given == 8 * PAGES, s
        assert s.pages_unchecked == 0 and s.pages_checksummed == PAGES, s
        for pin in pins:
            pin.release()
