"""Block hashing (kvstore/hashing.py) against an independent reading of the spec:

h_0 = BLAKE2b-128(b"kvstore/v1" || salt)
h_i = BLAKE2b-128(h_{i-1} || page i token ids as little-endian int32 || extra_keys)
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore import hashing

DOCS = Path(__file__).resolve().parent.parent / "docs" / "hashing.md"


def spec_hashes(salt: bytes, token_ids: list[int], page_tokens: int, extra_keys: bytes = b"") -> list[bytes]:
    """Written from the spec only: no code shared with kvstore.hashing."""
    h = hashlib.blake2b(b"kvstore/v1" + salt, digest_size=16).digest()
    out = []
    for p in range(len(token_ids) // page_tokens):
        page = token_ids[p * page_tokens : (p + 1) * page_tokens]
        data = h + b"".join(struct.pack("<i", t) for t in page) + extra_keys
        h = hashlib.blake2b(data, digest_size=16).digest()
        out.append(h)
    return out


def spec_root(salt: bytes) -> bytes:
    return hashlib.blake2b(b"kvstore/v1" + salt, digest_size=16).digest()


def test_root_hash_matches_spec():
    assert hashing.root_hash(b"") == spec_root(b"")
    assert hashing.root_hash(b"tenant-a") == spec_root(b"tenant-a")
    assert len(hashing.root_hash(b"x")) == 16


def test_chain_matches_spec():
    parent = spec_root(b"s")
    page = struct.pack("<4i", 1, 2, 3, 4)
    expected = hashlib.blake2b(parent + page + b"lora:1", digest_size=16).digest()
    assert hashing.chain(hashing.BlockHash(parent), page, b"lora:1") == expected
    assert (
        hashing.chain(hashing.BlockHash(parent), page)
        == hashlib.blake2b(parent + page, digest_size=16).digest()
    )


def test_token_bytes_are_little_endian_int32():
    assert hashing.token_bytes([1, 256, 2**31 - 1, 0]) == struct.pack("<4i", 1, 256, 2**31 - 1, 0)
    assert hashing.token_bytes([1]) == b"\x01\x00\x00\x00"


def test_block_hashes_known_example():
    got = hashing.block_hashes(b"tenant-a", [1, 2, 3, 4, 5, 6, 7, 8], 4)
    assert got == spec_hashes(b"tenant-a", [1, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(got) == 2
    # h_2 chains on h_1: recomputing page 2 from the root gives something else.
    assert got[1] != spec_hashes(b"tenant-a", [5, 6, 7, 8], 4)[0]


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    salt=st.binary(max_size=16),
    tokens=st.lists(st.integers(0, 2**31 - 1), max_size=40),
    page_tokens=st.integers(1, 8),
    extra=st.binary(max_size=8),
)
def test_block_hashes_match_spec(salt, tokens, page_tokens, extra):
    got = hashing.block_hashes(salt, tokens, page_tokens, extra)
    assert got == spec_hashes(salt, tokens, page_tokens, extra)
    assert len(got) == len(tokens) // page_tokens
    # The lazy form agrees, from the same root.
    lazy = list(
        hashing.iter_block_hashes(hashing.root_hash(salt), hashing.token_bytes(tokens), page_tokens, extra)
    )
    assert lazy == got


def test_partial_trailing_page_is_not_hashed():
    full = hashing.block_hashes(b"s", [1, 2, 3, 4], 2)
    for tail in ([5], [0], [9]):
        assert hashing.block_hashes(b"s", [1, 2, 3, 4, *tail], 2) == full
    assert hashing.block_hashes(b"s", [1], 2) == []
    assert hashing.block_hashes(b"s", [], 2) == []
    assert len(hashing.block_hashes(b"s", [1, 2, 3, 4, 5, 6], 2)) == 3


def test_different_salt_extra_or_tokens_give_different_hashes():
    base = hashing.block_hashes(b"a", [1, 2, 3, 4], 2, b"")
    other_salt = hashing.block_hashes(b"b", [1, 2, 3, 4], 2, b"")
    other_extra = hashing.block_hashes(b"a", [1, 2, 3, 4], 2, b"lora:7")
    other_tokens = hashing.block_hashes(b"a", [1, 2, 3, 5], 2, b"")
    swapped = hashing.block_hashes(b"a", [2, 1, 3, 4], 2, b"")
    assert set(base).isdisjoint(other_salt)
    assert set(base).isdisjoint(other_extra)
    assert set(base).isdisjoint(swapped)  # a change in page 1 changes every later hash
    assert other_tokens[0] == base[0] and other_tokens[1] != base[1]  # same prefix, same h_1
    # Page size is part of the identity of a page: [1,2],[3,4] is not [1,2,3,4].
    assert hashing.block_hashes(b"a", [1, 2, 3, 4], 4)[0] not in base


def test_namespace_salt():
    assert hashing.namespace_salt("llama", b"secret") == b"secret"
    assert hashing.namespace_salt("llama", b"") == b"namespace:llama"
    assert hashing.namespace_salt("a", b"") != hashing.namespace_salt("b", b"")


def test_test_vectors_match_spec():
    """The published vectors are what the spec gives, not only what the code gives."""
    lines = hashing.test_vector_lines()
    for v in hashing.TEST_VECTORS:
        assert f"  - h_0 = `{spec_root(v['salt']).hex()}`" in lines
        for i, h in enumerate(spec_hashes(v["salt"], v["token_ids"], v["page_tokens"], v["extra_keys"]), 1):
            assert f"  - h_{i} = `{h.hex()}`" in lines


@pytest.mark.skipif(not DOCS.exists(), reason="docs/hashing.md is not written yet")
def test_docs_contain_every_test_vector_line():
    doc_lines = DOCS.read_text().splitlines()
    missing = [line for line in hashing.test_vector_lines() if line not in doc_lines]
    assert not missing, f"docs/hashing.md lacks {len(missing)} test-vector lines, first: {missing[0]!r}"


# ------------------------------------------------------------------ the C loops and their fallback

IMPLEMENTATIONS = [("python", hashing.py_chain_hashes, hashing.py_probe)]
if hashing.NATIVE:
    from kvstore import _chainhash

    IMPLEMENTATIONS.append(("native", _chainhash.hashes, _chainhash.probe))


def test_native_loops_are_built_and_used():
    """`pip install -e .` and `make test` build kvstore/_chainhash.c; the daemon uses it."""
    assert hashing.NATIVE, "kvstore._chainhash is not built: run `make native` (or pip install -e .)"
    assert hashing.chain_hashes is _chainhash.hashes
    assert hashing.probe is _chainhash.probe


@pytest.mark.parametrize("name,hashes,probe", IMPLEMENTATIONS)
def test_loops_give_the_published_vectors(name, hashes, probe):
    for v in hashing.TEST_VECTORS:
        want = spec_hashes(v["salt"], v["token_ids"], v["page_tokens"], v["extra_keys"])
        root, tokens = spec_root(v["salt"]), hashing.token_bytes(v["token_ids"])
        assert hashes(root, tokens, v["page_tokens"], v["extra_keys"]) == want
        assert probe(root, tokens, v["page_tokens"], v["extra_keys"], dict.fromkeys(want, 1)) == (
            want,
            [1] * 2,
        )


@settings(max_examples=300, deadline=None)
@given(
    parent=st.binary(min_size=16, max_size=16),
    tokens=st.binary(max_size=4 * 300).map(lambda b: b[: len(b) // 4 * 4]),
    page_tokens=st.integers(1, 40),
    extra=st.binary(max_size=1024),  # past one BLAKE2b block (128 bytes) and the 1024 the store allows
    hits=st.integers(0, 80),
)
def test_native_and_python_loops_agree(parent, tokens, page_tokens, extra, hits):
    """Same hashes and same probe answers, for every length of message BLAKE2b sees (one or
    more 128-byte blocks, a last one full or not) and every place of the first miss."""
    want = hashing.py_chain_hashes(parent, tokens, page_tokens, extra)
    assert want == list(hashing.iter_block_hashes(parent, tokens, page_tokens, extra))
    index = {h: i for i, h in enumerate(want[:hits])}
    want_probe = hashing.py_probe(parent, tokens, page_tokens, extra, index)
    assert want_probe == (want[: hits + 1], list(range(min(hits, len(want)))))
    for _name, hashes, probe in IMPLEMENTATIONS:
        assert hashes(parent, tokens, page_tokens, extra) == want
        assert probe(parent, tokens, page_tokens, extra, index) == want_probe


def test_native_loops_refuse_a_bad_parent_or_page_size():
    """The store never passes these; the C code must still not read past a buffer."""
    assert hashing.NATIVE
    for args in ((b"short", b"", 1, b""), (bytes(16), bytes(8), 0, b""), (bytes(16), bytes(8), -1, b"")):
        with pytest.raises(ValueError):
            _chainhash.hashes(*args)
        with pytest.raises(ValueError):
            _chainhash.probe(*args, {})
    with pytest.raises(TypeError):
        _chainhash.probe(bytes(16), bytes(8), 1, b"", [])  # the index is a dict
