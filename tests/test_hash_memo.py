"""Remembered chain steps (kvstore/_hashmemo.c; docs/hashing.md, "Remembered hashes"): a
probe with the memo answers exactly what it answers without, whatever it remembers, and the
memo stays within its bounds in entries and in measured memory. The daemon's side (Stats,
metrics, a real Lookup): tests/test_e2e_hash_memo.py."""

from __future__ import annotations

import gc
import hashlib
import struct
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore import hashing

pytestmark = pytest.mark.skipif(not hashing.NATIVE, reason="the memo is in the C module (make native)")


def spec_hashes(salt: bytes, tokens: list[int], page_tokens: int, extra: bytes) -> list[bytes]:
    """From the spec alone (docs/hashing.md), as tests/test_hashing.py reads it."""
    h = hashlib.blake2b(b"kvstore/v1" + salt, digest_size=16).digest()
    out = []
    for p in range(len(tokens) // page_tokens):
        page = struct.pack(f"<{page_tokens}i", *tokens[p * page_tokens : (p + 1) * page_tokens])
        h = hashlib.blake2b(h + page + extra, digest_size=16).digest()
        out.append(h)
    return out


def probe(salt: bytes, tokens: list[int], page_tokens: int, extra: bytes, index: dict, memo) -> tuple:
    return hashing.probe(
        hashing.root_hash(salt), hashing.token_bytes(tokens), page_tokens, extra, index, memo
    )


# Kept across examples, so each example meets what earlier ones left: one set of 4 ways where
# every input has the same tag (a hit there rests on comparing the bytes alone), and a roomy one.
if hashing.NATIVE:
    ONE_SET = hashing.HashMemo(4, 1 << 16, 7, same_tags=True)
    ROOMY = hashing.HashMemo(4096, 1 << 22, 8)


@st.composite
def prompts(draw: st.DrawFn) -> tuple:
    """A prompt, then variants sharing a prefix with it: itself, a prefix, one token changed in
    any page, other extra keys, another salt; and an index holding some of their hashes."""
    page_tokens = draw(st.integers(1, 8))
    pages = draw(st.integers(1, 12))
    token = st.integers(0, 2**31 - 1)
    small = st.integers(0, 3)  # few distinct ids: prompts that share pages by chance too
    tokens = draw(
        st.lists(st.one_of(token, small), min_size=pages * page_tokens, max_size=pages * page_tokens + 3)
    )
    salt = draw(st.sampled_from([b"", b"a", b"tenant-b"]))
    extra = draw(st.one_of(st.just(b""), st.binary(max_size=8), st.binary(min_size=100, max_size=300)))
    changed = list(tokens)
    at = draw(st.integers(0, len(tokens) - 1))
    changed[at] = draw(token.filter(lambda t: t != tokens[at]))
    cut = draw(st.integers(0, len(tokens)))
    variants = [
        (salt, tokens, extra),
        (salt, tokens, extra),
        (salt, tokens[:cut], extra),
        (salt, changed, extra),
        (salt, tokens, extra + b"x"),
        (salt + b"2", tokens, extra),
    ]
    indexed = draw(st.sets(st.integers(0, len(variants) - 1)))
    index = {}
    for i in indexed:
        s, t, e = variants[i]
        keep = draw(st.integers(0, len(t) // page_tokens))
        for h in spec_hashes(s, t, page_tokens, e)[:keep]:
            index[h] = len(index)
    return page_tokens, variants, index


@settings(max_examples=300, deadline=None, derandomize=True)
@given(case=prompts())
def test_a_probe_with_the_memo_answers_what_it_answers_without(case: tuple) -> None:
    page_tokens, variants, index = case
    for salt, tokens, extra in variants:
        without = probe(salt, tokens, page_tokens, extra, index, None)
        expected = spec_hashes(salt, tokens, page_tokens, extra)
        assert without[0] == expected[: len(without[0])]
        for memo in (ONE_SET, ROOMY):
            assert probe(salt, tokens, page_tokens, extra, index, memo) == without
            assert probe(salt, tokens, page_tokens, extra, index, memo) == without  # now remembered
    assert ROOMY.stats()["hits"] > 0


def test_a_prefix_looked_up_again_is_not_hashed_again() -> None:
    memo = hashing.HashMemo(1024, 1 << 20, 1)
    tokens = list(range(64))
    index = {h: i for i, h in enumerate(spec_hashes(b"s", tokens, 4, b""))}
    first = probe(b"s", tokens, 4, b"", index, memo)
    assert (memo.stats()["hits"], memo.stats()["misses"]) == (0, 16)
    assert probe(b"s", tokens, 4, b"", index, memo) == first
    assert (memo.stats()["hits"], memo.stats()["misses"]) == (16, 16)
    # One token changed in page 10: pages 1-9 are remembered, 10 on are hashed (and miss).
    changed = tokens[:]
    changed[41] = 999
    found, values = probe(b"s", changed, 4, b"", index, memo)
    assert (memo.stats()["hits"], memo.stats()["misses"]) == (16 + 10, 16 + 1)
    assert values == list(range(10)) and found == spec_hashes(b"s", changed, 4, b"")[:11]


class Keyed:
    """An index value that holds its own key, as a pool page does (Page.block_hash)."""

    __slots__ = ("block_hash", "n")

    def __init__(self, block_hash: bytes, n: int) -> None:
        self.block_hash, self.n = block_hash, n


def test_the_memo_hands_out_the_index_own_key_objects() -> None:
    # Dict lookups by the very key object match without comparing bytes (the index's here,
    # the live MRC's in the daemon): the memo adopts the key of each value it finds.
    memo = hashing.HashMemo(1024, 1 << 20, 3)
    tokens = list(range(32))
    keys = [h[:8] + h[8:] for h in spec_hashes(b"s", tokens, 4, b"")]  # objects of the index's own
    index = {k: Keyed(k, i) for i, k in enumerate(keys)}
    for _ in range(2):  # hashed and remembered, then every step from the memo
        found, values = probe(b"s", tokens, 4, b"", index, memo)
        assert found == keys and all(f is k for f, k in zip(found, keys, strict=True))
        assert [v.n for v in values] == list(range(8))
    assert memo.stats()["hits"] == 8
    # A value whose block_hash no longer has the key's bytes is not adopted from: the memo
    # answers what it remembered, and the chain goes on from the right bytes.
    index[keys[3]].block_hash = b"\0" * 16
    fresh = probe(b"s", tokens, 4, b"", index, hashing.HashMemo(1024, 1 << 20, 4))
    assert fresh[0] == keys and fresh[0][3] is not keys[3] and fresh[0][2] is keys[2]
    assert probe(b"s", tokens, 4, b"", index, None)[0] == keys


def fill(memo, n: int, extra: bytes = b"") -> None:
    """n distinct inputs (each a one-page prompt under its own salt: a miss, remembered)."""
    for i in range(n):
        probe(b"salt-%d" % i, [i, i + 1, i + 2, i + 3], 4, extra, {}, memo)


def traced_growth(make, n: int, extra: bytes = b"") -> tuple[int, dict]:
    """(bytes Python's allocator holds for a memo filled with n inputs, its stats)."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        memo = make()
        fill(memo, n, extra)
        held = tracemalloc.get_traced_memory()[0] - base
        stats = memo.stats()
        del memo
        gc.collect()
        left = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert left < 4096, f"{left} bytes still held after the memo was freed"
    return held, stats


def test_the_memo_is_bounded_in_entries_and_in_measured_memory() -> None:
    # 20,000 distinct inputs into 1,024 entries: the entry bound binds.
    held, s = traced_growth(lambda: hashing.HashMemo(1024, 1 << 20), 20_000)
    assert s["entries"] <= s["max_entries"] == 1024
    assert s["misses"] == 20_000 and s["evictions"] >= 20_000 - 1024
    assert held <= 1.1 * s["bytes"] + 4096, (held, s)  # what it counts is what it holds
    assert s["bytes"] <= s["max_bytes"]
    # 1,000-byte extra keys into 64 KiB: the byte bound binds long before 1,024 entries.
    held, s = traced_growth(lambda: hashing.HashMemo(1024, 64 << 10), 2_000, b"k" * 1000)
    assert s["bytes"] <= s["max_bytes"] == 64 << 10 and s["entries"] < 64
    assert held <= s["max_bytes"] + 4096, (held, s)


def test_the_memo_refuses_bounds_it_cannot_keep() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        hashing.HashMemo(3, 1 << 20)
    with pytest.raises(ValueError, match="cannot hold the table"):
        hashing.HashMemo(1 << 16, 1 << 10)
    with pytest.raises(TypeError, match="HashMemo or None"):
        probe(b"s", [1, 2], 2, b"", {}, {})
    # make_memo keeps the table within a quarter of the bytes, and is off at 0.
    assert hashing.make_memo(0, 1 << 20) is None and hashing.make_memo(1024, 0) is None
    memo = hashing.make_memo(1 << 20, 1 << 16)
    assert memo is not None and memo.stats()["max_entries"] * 32 <= (1 << 16) // 4
