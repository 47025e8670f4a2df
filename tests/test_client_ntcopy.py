"""The client's page copy in C with streaming stores (client/kvstore_client/_ntcopy.c, used by
_pcopy.py; docs/api.md "Copy threads"): the bytes land exactly, with every head and tail
alignment, row stride and kind of store this CPU has; what it declines numpy copies; without
the extension the client copies the same bytes with numpy; a big copy lets other threads run.
Through the real daemon's pool: tests/test_client_copy_threads.py, with and without it."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvstore_client import _pcopy

try:
    from kvstore_client import _ntcopy
except ImportError:  # (not built: the first test says so)
    _ntcopy = None

NS = "test"  # tests/daemon.py: 4 tokens a page, pages of 1 KiB at a 4 KiB stride
T = 4


def test_the_extension_is_built_and_used() -> None:
    """`make native` (or pip install -e .) builds it; _pcopy copies through it."""
    assert _ntcopy is not None, "kvstore_client._ntcopy is not built: run `make native`"
    assert _pcopy.nt_copy is _ntcopy.copy
    assert _ntcopy.kind() in ("avx2", "sse2", "memcpy")


def _each_kind() -> Iterator[str]:
    """Sets each kind of store this CPU can run in turn (import picked the best: set back)."""
    ext = _ntcopy
    best = ext.kind()
    try:
        for kind in ("avx2", "sse2", "memcpy"):
            try:
                yield ext.set_kind(kind)
            except ValueError:  # (not on this CPU)
                continue
    finally:
        ext.set_kind(best)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    rows=st.integers(1, 5),
    width=st.one_of(st.integers(1, 70), st.integers(250, 1200), st.sampled_from([256, 4096, 4097])),
    src_off=st.integers(0, 127),
    dst_off=st.integers(0, 127),
    src_pad=st.integers(0, 100),
    dst_pad=st.integers(0, 100),
    stream=st.booleans(),
)
def test_rows_land_exactly_for_any_alignment_width_and_stride(
    rows, width, src_off, dst_off, src_pad, dst_pad, stream
) -> None:
    """Rows of `width` bytes at any offsets (so any head to the 64-byte boundary), row strides
    of width + pad (pad 0: contiguous, copied as one row), widths off multiples of 32 and 64
    and of 1 byte: every byte of every row lands, and not one byte around them changes."""
    rng = np.random.default_rng(width * 1009 + src_off * 31 + dst_off)
    s_stride, d_stride = width + src_pad, width + dst_pad
    src_buf = rng.integers(0, 256, size=src_off + rows * s_stride, dtype=np.uint8)
    dst_buf = rng.integers(0, 256, size=dst_off + rows * d_stride + 64, dtype=np.uint8)
    src = np.lib.stride_tricks.as_strided(src_buf[src_off:], (rows, width), (s_stride, 1))
    dst = np.lib.stride_tricks.as_strided(dst_buf[dst_off:], (rows, width), (d_stride, 1))
    want = dst_buf.copy()
    for r in range(rows):
        at = dst_off + r * d_stride
        want[at : at + width] = src_buf[src_off + r * s_stride : src_off + r * s_stride + width]
    for k in _each_kind():
        got = dst_buf.copy()
        d = np.lib.stride_tricks.as_strided(got[dst_off:], dst.shape, dst.strides)
        assert _ntcopy.copy(d, src, stream=stream), k
        assert got.tobytes() == want.tobytes(), (k, rows, width)


def test_what_it_declines_numpy_copies_or_refuses() -> None:
    """Overlapping bytes, another dtype, non-contiguous rows, unequal shapes, a read-only
    destination: _ntcopy copies nothing and says so; copy_pairs then gives numpy's result
    (or numpy's error)."""
    ext = _ntcopy
    a = np.arange(4096, dtype=np.uint8)
    cases = [
        (a[64:], a[:-64]),  # overlapping (numpy copies as if through a temporary)
        (np.zeros(1024, np.int8), a[:1024]),  # another dtype (numpy: same_kind casting refused)
        (np.zeros(2048, np.uint8)[::2], a[:1024]),  # rows not contiguous
        (np.zeros((2, 1024), np.uint8), a[:1024]),  # a broadcast
    ]
    for dst, src in cases:
        before = dst.copy()
        assert not ext.copy(dst, src, stream=True)
        assert (dst == before).all(), "declined: nothing copied"
    overlap = a.copy()
    _pcopy.copy_pairs([(overlap[64:], overlap[:-64])])
    assert overlap[64:].tobytes() == a[:-64].tobytes()
    with pytest.raises(ValueError, match="read-only"):
        _pcopy.copy_pairs([(np.frombuffer(bytes(1024), np.uint8), a[:1024])])


def test_a_big_copy_lets_other_threads_run() -> None:
    """The GIL is released while a big copy runs: another Python thread counts meanwhile.
    The switch interval is long, so without the release the counter could only move if the
    copy took longer than it (32 MiB: a few ms); each copy is retried a few times against a
    busy machine's scheduling."""
    src = np.ones(32 << 20, dtype=np.uint8)
    dst = np.zeros_like(src)
    count, done, seen = [0], threading.Event(), []

    def copier() -> None:
        try:
            for _ in range(5):
                before = count[0]
                _ntcopy.copy(dst, src, stream=True)
                if count[0] > before:
                    seen.append(count[0] - before)
                    return
        finally:
            done.set()

    old = sys.getswitchinterval()
    sys.setswitchinterval(0.25)
    try:
        t = threading.Thread(target=copier)
        t.start()
        while not done.is_set():
            count[0] += 1
        t.join()
    finally:
        sys.setswitchinterval(old)
    assert seen, "no other thread ran during a 32 MiB copy: the GIL was held"
    assert (dst == 1).all()


def test_without_the_extension_the_client_imports_and_copies_with_numpy() -> None:
    """A tree where _ntcopy.c is not built (or cannot load): _pcopy falls back to numpy."""
    code = (
        "import sys; sys.modules['kvstore_client._ntcopy'] = None\n"  # (import raises ImportError)
        "import numpy as np\n"
        "from kvstore_client import _pcopy\n"
        "assert _pcopy.nt_copy is None\n"
        "s = np.arange(3 << 20, dtype=np.uint8).reshape(3, -1); d = np.zeros_like(s)\n"
        "_pcopy.copy_pairs([(d, s)]); assert (d == s).all(); print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


# ---------------------------------------------------------------- copy_sum: the copy that hashes


def _each_sum_kind() -> Iterator[str]:
    """Sets each fused copy-and-hash this CPU can run in turn (AVX-512, AVX2; set back)."""
    ext = _ntcopy
    best = ext.sum_kind()
    try:
        for kind in ("avx512", "avx2"):
            try:
                yield ext.set_sum_kind(kind)
            except ValueError:  # (not on this CPU)
                continue
    finally:
        ext.set_sum_kind(best)


def _aligned(nbytes: int) -> np.ndarray:
    """Zeroed bytes starting on a 64-byte boundary (pool pages are: the pool is mmap'd)."""
    buf = np.zeros(nbytes + 64, dtype=np.uint8)
    skip = -buf.ctypes.data % 64
    return buf[skip : skip + nbytes]


def test_copy_sum_runs_where_the_cpu_can() -> None:
    """Import picked the best this CPU has; on the project's x86-64 machines that is AVX2 at
    least (else every put's checksums fall back to the daemon, which the next tests show)."""
    assert _ntcopy.sum_kind() in ("avx512", "avx2", "none")
    kinds = list(_each_sum_kind())
    assert kinds, "no fused copy-and-hash on this CPU (needs AVX2)"
    assert _pcopy.nt_copy_sum is _ntcopy.copy_sum


@settings(max_examples=120, deadline=None, derandomize=True)
@given(
    rows=st.integers(1, 4),
    width=st.one_of(
        st.integers(241, 3000),  # (up to 240 bytes XXH3 takes another path: declined below)
        st.sampled_from([256, 1024, 1025, 2047, 2048, 4096, 64 * 1024 - 1, 737_280]),
    ),
    src_off=st.integers(0, 127),
    dst_pad=st.sampled_from([0, 64, 4096 - 1024]),
)
def test_copy_sum_copies_every_byte_and_gives_each_rows_xxh3_64(rows, width, src_off, dst_pad) -> None:
    """Every row lands exactly and its sum is what PyPI xxhash (the daemon's page checksum,
    kvstore/store/page_sums.py) gives for those bytes: for widths around XXH3's 64-byte
    stripes and 1 KiB blocks, a source at any offset, rows at a stride."""
    import xxhash

    from kvstore.store.page_sums import checksum

    rng = np.random.default_rng(width * 7 + src_off)
    d_stride = -(-(width + dst_pad) // 64) * 64  # (rows start 64-byte aligned, like pool pages)
    src_buf = rng.integers(0, 256, size=src_off + rows * width, dtype=np.uint8)
    src = src_buf[src_off:].reshape(rows, width)
    for kind in _each_sum_kind():
        dst_buf = _aligned(rows * d_stride)
        dst_buf[:] = 0xEE
        dst = np.lib.stride_tricks.as_strided(dst_buf, (rows, width), (d_stride, 1))
        sums = np.zeros(rows, dtype=np.uint64)
        assert _ntcopy.copy_sum(dst, src, sums), kind
        for r in range(rows):
            row = src[r].tobytes()
            assert dst[r].tobytes() == row, (kind, r)
            assert int(sums[r]) == xxhash.xxh3_64_intdigest(row) == checksum(row), (kind, width, r)
            gap = dst_buf[r * d_stride + width : (r + 1) * d_stride]
            assert (gap == 0xEE).all(), "not one byte past the row written"


def test_copy_sum_declines_what_it_cannot_hash_as_it_copies() -> None:
    """Rows of 240 bytes or less, a destination row not on a 64-byte boundary, a 1-D copy, a
    sums buffer of another length or dtype, overlapping bytes: False and nothing copied (the
    caller copies without sums; the daemon then takes them)."""
    src = np.arange(4 * 1024, dtype=np.uint8).reshape(4, 1024)
    dst = _aligned(4 * 1024 + 64)
    good = dst[: 4 * 1024].reshape(4, 1024)
    cases = [
        (good[:, :240], src[:, :240], np.zeros(4, np.uint64)),  # too short for XXH3's long path
        (dst[1 : 1 + 4 * 1024].reshape(4, 1024), src, np.zeros(4, np.uint64)),  # not aligned
        (good.reshape(-1), src.reshape(-1), np.zeros(1, np.uint64)),  # not rows
        (good, src, np.zeros(3, np.uint64)),  # a sum short
        (good, src, np.zeros(4, np.int32)),  # another dtype
        (good, src, np.zeros(4, np.uint64)[::-1]),  # not contiguous
        (good, good, np.zeros(4, np.uint64)),  # the same bytes
    ]
    for d, s, sums in cases:
        before = dst.copy()
        assert not _ntcopy.copy_sum(d, s, sums)
        assert (dst == before).all() and not sums.any(), "declined: nothing copied, nothing summed"


@pytest.mark.skipif(_pcopy._cores() < 2, reason="a split copy needs 2 CPUs for this process")
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_a_split_copy_with_sums_hashes_whole_rows(rows) -> None:
    """Above MIN_SPLIT_BYTES the copy is split over threads by whole rows when sums are asked
    for (a row's hash is one pass): every byte lands and every sum is the row's XXH3-64, for
    fewer rows than bands too; copy_pairs says the sums were taken."""
    import xxhash

    width = 737_280 if rows == 64 else -(-(_pcopy.MIN_SPLIT_BYTES // rows + 1) // 64) * 64
    rng = np.random.default_rng(rows)
    src = rng.integers(0, 256, size=(rows, width), dtype=np.uint8)
    dst = _aligned(rows * width).reshape(rows, width)
    sums = np.zeros(rows, dtype=np.uint64)
    before = _pcopy.set_copy_threads(2)
    try:
        assert src.size >= _pcopy.MIN_SPLIT_BYTES
        half = rows // 2
        pairs = [(dst[:half], src[:half]), (dst[half:], src[half:])] if half else [(dst, src)]
        assert _pcopy.copy_pairs(pairs, sums)
    finally:
        _pcopy.set_copy_threads(before)
    assert (dst == src).all()
    assert [int(x) for x in sums] == [xxhash.xxh3_64_intdigest(r.tobytes()) for r in src]


def test_without_the_fused_copy_pairs_copy_and_say_no_sums() -> None:
    """sum kind "none" (a CPU without AVX2): the bytes land, copy_pairs answers False."""
    src = np.arange(2 * 4096, dtype=np.uint8).reshape(2, 4096)
    dst = _aligned(2 * 4096).reshape(2, 4096)
    best = _ntcopy.sum_kind()
    _ntcopy.set_sum_kind("none")
    try:
        assert not _pcopy.copy_pairs([(dst, src)], np.zeros(2, np.uint64))
    finally:
        _ntcopy.set_sum_kind(best)
    assert (dst == src).all()
