"""Chained block hashes: the identity of a page is the token prefix it ends.

    h_0 = BLAKE2b-128(b"kvstore/v1" || salt)
    h_i = BLAKE2b-128(h_{i-1} || token ids of page i as little-endian int32 || extra_keys)

The salt is the namespace's, set by the operator (never by a client), so two
tenants never share a hash. The spec and test vectors are in docs/hashing.md;
tests/test_hashing.py checks that the vectors there are what this code computes.

The per-request loops (`chain_hashes`, `probe`) run in C (kvstore/_chainhash.c, built by
`pip install -e .` or `make native`) when it is built, else in Python (`py_chain_hashes`,
`py_probe`); tests/test_hashing.py checks that both give the same output.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from typing import NewType, TypeVar

import numpy as np

BlockHash = NewType("BlockHash", bytes)
V = TypeVar("V")

DOMAIN = b"kvstore/v1"
DIGEST_BYTES = 16


def namespace_salt(name: str, salt: bytes) -> bytes:
    """The salt a namespace hashes with: the operator's, or its name when none is set."""
    return salt if salt else b"namespace:" + name.encode()


def root_hash(salt: bytes) -> BlockHash:
    return BlockHash(hashlib.blake2b(DOMAIN + salt, digest_size=DIGEST_BYTES).digest())


def chain(parent: BlockHash, page_token_bytes: bytes, extra_keys: bytes = b"") -> BlockHash:
    """The hash of the page whose tokens are `page_token_bytes` (little-endian int32)."""
    # One call on the joined bytes: the same digest as one update() per part.
    return BlockHash(
        hashlib.blake2b(parent + page_token_bytes + extra_keys, digest_size=DIGEST_BYTES).digest()
    )


def token_bytes(token_ids: Sequence[int] | np.ndarray) -> bytes:
    """Token ids as the little-endian int32 bytes that hashing consumes."""
    return np.asarray(token_ids, dtype="<i4").tobytes()


def iter_block_hashes(
    parent: BlockHash, tokens_le: bytes, page_tokens: int, extra_keys: bytes = b""
) -> Iterator[BlockHash]:
    """Hashes of each full page of `tokens_le`, in order; lazy so a lookup can stop at its first miss."""
    page_len = 4 * page_tokens
    for start in range(0, len(tokens_le) - page_len + 1, page_len):
        parent = chain(parent, tokens_le[start : start + page_len], extra_keys)
        yield parent


def py_chain_hashes(
    parent: BlockHash, tokens_le: bytes, page_tokens: int, extra_keys: bytes = b""
) -> list[BlockHash]:
    """Every hash `iter_block_hashes` yields, as a list."""
    return list(iter_block_hashes(parent, tokens_le, page_tokens, extra_keys))


def py_probe(
    parent: BlockHash,
    tokens_le: bytes,
    page_tokens: int,
    extra_keys: bytes,
    index: dict[bytes, V],
    memo: None = None,
) -> tuple[list[BlockHash], list[V]]:
    """(the hashes of the full pages up to and including the first that is not a key of `index`,
    or all of them; `index[h]` of each before it). A lookup's hashing and probing in one loop."""
    page_len = 4 * page_tokens
    found: list[BlockHash] = []
    values: list[V] = []
    blake2b = hashlib.blake2b
    get = index.get
    for start in range(0, len(tokens_le) - page_len + 1, page_len):
        parent = blake2b(
            parent + tokens_le[start : start + page_len] + extra_keys, digest_size=DIGEST_BYTES
        ).digest()
        found.append(parent)
        value = get(parent)
        if value is None:
            break
        values.append(value)
    return found, values


try:  # the C loops, when built (their output is the same: tests/test_hashing.py)
    from kvstore._chainhash import HashMemo, probe
    from kvstore._chainhash import hashes as chain_hashes

    NATIVE = True
except ImportError:  # a tree used without building it
    chain_hashes, probe = py_chain_hashes, py_probe  # (py_probe takes no memo: given None)
    NATIVE = False


def make_memo(max_entries: int, max_bytes: int) -> HashMemo | None:
    """Remembered chain steps for `probe` (kvstore/_hashmemo.c; docs/hashing.md, "Remembered
    hashes"): None when off or when the C module is not built. Its table (32 bytes an entry)
    takes at most a quarter of `max_bytes`: fewer entries than asked when that is small, and
    off below 4. Its tag hash is seeded per process, so which inputs share a set cannot be
    chosen from outside."""
    entries = min(max_entries, max_bytes // 128)
    if entries < 4 or not NATIVE:
        return None
    return HashMemo(entries, max_bytes, int.from_bytes(os.urandom(8), "little"))


def memo_stats(memo: HashMemo | None) -> dict[str, int]:
    """hits, misses, evictions, entries, bytes, max_entries, max_bytes (all 0 without one)."""
    if memo is None:
        return dict.fromkeys(MEMO_STATS, 0)
    return memo.stats()


MEMO_STATS = ("hits", "misses", "evictions", "entries", "bytes", "max_entries", "max_bytes")


def block_hashes(
    salt: bytes, token_ids: Sequence[int], page_tokens: int, extra_keys: bytes = b""
) -> list[BlockHash]:
    """All full-page hashes of a token sequence from the root (reference form of the spec)."""
    return list(iter_block_hashes(root_hash(salt), token_bytes(token_ids), page_tokens, extra_keys))


# Inputs of the published test vectors (docs/hashing.md); changing them changes the docs.
TEST_VECTORS = (
    {"salt": b"", "page_tokens": 4, "token_ids": [1, 2, 3, 4, 5, 6, 7, 8, 9], "extra_keys": b""},
    {"salt": b"tenant-a", "page_tokens": 4, "token_ids": [1, 2, 3, 4, 5, 6, 7, 8], "extra_keys": b""},
    {"salt": b"tenant-a", "page_tokens": 4, "token_ids": [1, 2, 3, 4, 5, 6, 7, 8], "extra_keys": b"lora:7"},
    {"salt": b"tenant-a", "page_tokens": 2, "token_ids": [0, 2147483647, 65535, 256], "extra_keys": b""},
)


def test_vector_lines() -> list[str]:
    """The test vectors as Markdown lines, exactly as docs/hashing.md shows them."""
    lines = []
    for v in TEST_VECTORS:
        lines.append(
            f"- salt=`{v['salt'].hex() or '(empty)'}` (hex), page_tokens={v['page_tokens']}, "
            f"token_ids={v['token_ids']}, extra_keys=`{v['extra_keys'].hex() or '(empty)'}` (hex)"
        )
        lines.append(f"  - h_0 = `{root_hash(v['salt']).hex()}`")
        hashes = block_hashes(v["salt"], v["token_ids"], v["page_tokens"], v["extra_keys"])
        for i, h in enumerate(hashes, start=1):
            lines.append(f"  - h_{i} = `{h.hex()}`")
    return lines
