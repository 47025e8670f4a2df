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
