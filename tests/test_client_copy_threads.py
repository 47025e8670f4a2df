"""The client's big page copies split over threads (client/kvstore_client/_pcopy.py, docs/api.md
"Copy threads"): every byte lands for odd shapes, offsets and runs of slots, through the real
daemon's pool as well as between arrays; a band's failure surfaces once every band is done; the
knob ($KVSTORE_COPY_THREADS, set_copy_threads) decides whether a copy is split at all."""

from __future__ import annotations

import threading

import kvstore_client
import numpy as np
import pytest
from e2e_helpers import prompt, read_page
from kvstore_client import _pcopy

NS = "test"  # tests/daemon.py: 4 tokens a page, pages of 1 KiB at a 4 KiB stride
T = 4

needs_two = pytest.mark.skipif(_pcopy._cores() < 2, reason="a split copy needs 2 CPUs for this process")


@pytest.fixture
def threads():
    """Set the copy threads for one test (and split every copy: no minimum size)."""
    old = _pcopy.MIN_SPLIT_BYTES
    _pcopy.MIN_SPLIT_BYTES = 1
    try:
        yield _pcopy.set_copy_threads
    finally:
        _pcopy.MIN_SPLIT_BYTES = old
        _pcopy.set_copy_threads(None)


def _copy_threads_alive() -> int:
    return sum(t.name.startswith("kvstore-copy") for t in threading.enumerate())


@needs_two
@pytest.mark.parametrize("n", [2, 3])
def test_split_copies_land_every_byte_for_odd_shapes(threads, n) -> None:
    assert threads(n) == min(n, _pcopy._cores())
    rng = np.random.default_rng(n)
    for rows, width in [(1, 1), (1, 7), (3, 1001), (5, 4096), (17, 333)]:
        src_buf = rng.integers(0, 256, size=rows * width + 3, dtype=np.uint8)
        dst_buf = np.zeros(rows * width + 5, dtype=np.uint8)
        # (odd offsets into both buffers; two runs, the second of a single row)
        src = src_buf[3:].reshape(rows, width)
        dst = dst_buf[1 : 1 + rows * width].reshape(rows, width)
        extra_src = rng.integers(0, 256, size=(1, width + 2), dtype=np.uint8)[:, 1:-1]
        extra_dst = np.zeros((1, width), dtype=np.uint8)
        _pcopy.copy_pairs([(dst, src), (extra_dst, extra_src)])
        assert dst.tobytes() == src.tobytes(), (rows, width)
        assert extra_dst.tobytes() == extra_src.tobytes()
        assert dst_buf[0] == 0 and not dst_buf[1 + rows * width :].any(), "nothing outside the run"


@needs_two
def test_a_bands_failure_surfaces_after_every_other_band_landed(threads) -> None:
    threads(2)
    # Four bands of two columns each; the first also holds a one-column pair that cannot copy
    # (three rows into four): it fails, whichever thread takes it, and the rest land.
    narrow, full = np.zeros((4, 1), dtype=np.uint8), np.zeros((4, 8), dtype=np.uint8)
    for _ in range(20):  # (the bands go to whichever thread is free: a different mix each time)
        full[:] = 0
        with pytest.raises(ValueError, match="broadcast"):
            _pcopy.copy_pairs(
                [(narrow, np.ones((3, 1), dtype=np.uint8)), (full, np.full((4, 8), 9, dtype=np.uint8))]
            )
        assert (full[:, 2:] == 9).all() and not full[:, :2].any()


@needs_two
def test_a_copy_does_not_wait_for_a_copy_thread_that_is_busy(threads) -> None:
    """The caller copies the bands no thread has taken: a pool thread kept busy elsewhere
    (a slow core, another copy) does not hold the copy up."""
    threads(2)
    gate = threading.Event()
    blocker = _pcopy._executor(1).submit(gate.wait)  # the pool's one thread, held
    try:
        src = np.random.default_rng(1).integers(0, 256, size=(6, 5000), dtype=np.uint8)
        dst = np.zeros_like(src)
        _pcopy.copy_pairs([(dst, src)])
        assert dst.tobytes() == src.tobytes()
        assert not blocker.done(), "returned while the pool's thread was still held"
    finally:
        gate.set()
        blocker.result(timeout=10)


def test_the_knob_sets_the_threads_and_one_turns_the_split_off(threads, monkeypatch) -> None:
    monkeypatch.setenv(_pcopy.ENV, "1")
    assert threads(None) == 1 == kvstore_client.copy_threads()
    a = np.arange(1 << 16, dtype=np.uint8).reshape(4, -1)
    b = np.zeros_like(a)
    _pcopy.copy_pairs([(b, a)])
    # No pool was made for it, so no thread took a band. (Not a count of the copy threads
    # alive: an earlier test's dropped pool ends its threads whenever it is collected.)
    assert (b == a).all() and _pcopy._pool is None, "a copy with one thread made a pool"
    assert kvstore_client.set_copy_threads(64) == _pcopy._cores(), "capped at this process's CPUs"
    monkeypatch.setenv(_pcopy.ENV, "zero")
    with pytest.raises(ValueError, match="KVSTORE_COPY_THREADS"):
        threads(None)
    monkeypatch.setenv(_pcopy.ENV, "0")
    with pytest.raises(ValueError, match="at least 1"):
        threads(None)
    with pytest.raises(ValueError, match="copy threads"):
        threads(0)


@needs_two
@pytest.mark.parametrize("native", [True, False], ids=["ntcopy", "numpy"])
def test_put_and_get_split_over_threads_move_the_right_bytes(daemon, threads, monkeypatch, native) -> None:
    """Every band streamed by _ntcopy.c (STREAM_MIN 1: rows of 256 B, a band of a 1 KiB page,
    at the pool's 4 KiB stride), or every band numpy's (the extension hidden): the same bytes."""
    threads(2)
    monkeypatch.setattr(_pcopy, "STREAM_MIN", 1)
    if not native:
        monkeypatch.setattr(_pcopy, "nt_copy", None)
    with kvstore_client.connect(daemon.target, client_name="split") as kv:
        ns = kv.namespace(NS)
        size = ns.pool.page_bytes
        tokens = prompt(7 * T, seed=11)
        rng = np.random.default_rng(5)
        buf = rng.integers(0, 256, size=7 * size + 1, dtype=np.uint8)
        data = buf[1:]  # (an odd offset)
        kv.put(NS, tokens[: 2 * T], data[: 2 * size])  # Reserve + Seal: grants the credit
        kv.put(NS, tokens, data, cached_tokens=2 * T)  # into the credit: pages 2-6
        assert _copy_threads_alive() >= 1, "a band went to a copy thread"
        hit = kv.lookup(NS, tokens, pin=True)
        try:
            slots = [p.slot for p in hit.pages]
        finally:
            hit.release()
        assert len(slots) == 7
        for i, slot in enumerate(slots):  # read back in this process through the pool's fd
            assert read_page(daemon.target, NS, slot) == data[i * size : (i + 1) * size].tobytes(), i
        out_buf = np.zeros(7 * size + 3, dtype=np.uint8)
        got = kv.get(NS, tokens, out_buf[3:])
        assert got.pages == 7
        assert out_buf[3:].tobytes() == data.tobytes() and not out_buf[:3].any()
