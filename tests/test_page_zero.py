"""Zeroing of freed pool pages (kvstore/memory/page_zero.py, kvstore/_ntzero.c): every way
the C function can take on this CPU (streamed AVX2 or SSE2 with a memset head and tail,
plain memset) and the numpy fallback zero exactly the bytes asked, at any offset and length,
and no byte next to them. The daemon's side (a freed page reads zeros in another process) is
tests/test_e2e_integrity.py."""

from __future__ import annotations

import mmap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.memory import page_zero

BUILT = page_zero.ways is not None
WAYS = [*(page_zero.ways() if BUILT else []), "numpy"]  # (without the extension: numpy's alone)
SIZE = 3 * 64 * 1024 + 123


def zero_by(way: str, view: memoryview) -> None:
    if way == "numpy":
        page_zero.zero_numpy(view)
    else:
        page_zero.zero(view, way)


def check(way: str, offset: int, length: int) -> None:
    # An mmap, as a pool is: page-aligned, so `offset` sets the head's alignment exactly.
    with mmap.mmap(-1, SIZE) as m:
        m[:] = bytes(range(1, 256)) * (SIZE // 255) + b"\xab" * (SIZE % 255)
        before = m[:]
        view = memoryview(m)
        part = view[offset : offset + length]
        zero_by(way, part)
        part.release()
        view.release()
        want = before[:offset] + bytes(length) + before[offset + length :]
        if m[:] != want:
            wrong = [i for i in range(SIZE) if m[i] != want[i]]
            pytest.fail(f"{way}: zero({offset}, {length}) wrong at {len(wrong)} bytes, first {wrong[:4]}")


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, 0),
        (7, 1),
        (0, 4095),  # under the streaming size: memset
        (0, 4096),
        (1, 4096),  # 63 B head, 1 B tail
        (63, 4097),
        (64, 64 * 1024),  # aligned both ends: no head, no tail
        (4096, 2 * 64 * 1024),
        (33, SIZE - 33 - 31),
        (0, SIZE),
    ],
)
def test_exactly_the_range_is_zeroed(way: str, offset: int, length: int) -> None:
    check(way, offset, length)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(WAYS), st.integers(0, SIZE), st.integers(0, SIZE))
def test_any_offset_and_length(way: str, offset: int, length: int) -> None:
    check(way, offset, min(length, SIZE - offset))


@pytest.mark.skipif(not BUILT, reason="kvstore._ntzero is not built (make native)")
def test_the_best_way_is_the_default_and_a_way_this_cpu_lacks_is_refused() -> None:
    assert page_zero.zero is not page_zero.zero_numpy
    assert page_zero.ways()[-1] == page_zero.HOW
    with pytest.raises(ValueError, match="ways"):
        page_zero.zero(bytearray(8), "avx1024")
    with pytest.raises(TypeError):
        page_zero.zero(b"read-only")
