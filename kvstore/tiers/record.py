"""A page below the pool: its key, its metadata, its payload and the checksum over both.

The record is what the host tier holds and what the disk tier writes; the byte layout of
the metadata is fixed here (never pickle) so a restarted daemon can read what an older one
wrote and refuse what it cannot trust. Layout, little-endian:

    HEAD  magic "KVP1" | algo u8 | 3 pad bytes | checksum u64
    BODY  created_ns u64 | num_tokens u32 | page_bytes u64 | parent_len u8 |
          block_hash 16 | parent_hash 16 (zero-padded) | ns_len u16 | geom_len u16 |
          namespace (utf-8) | geometry (utf-8) [| raw_bytes u64: algo 3 only]

The checksum covers BODY and then the payload, so the namespace, block hash and length are
covered as well as the bytes. `algo` says how it was made:

- 2 = XXH3-64 (what this version writes): xxh3_64(payload, seed=xxh3_64(BODY)). ~100 GB/s
  on a 32 KiB page here (0.3 us), against ~6 GB/s (5.3 us) for CRC-32; a checksum is taken
  on every demotion of a new page and checked on every promotion, so that difference was a
  tenth of the tiers' cost under load (BENCHMARKS.md). A 64-bit hash misses a random
  corruption with probability 2^-64.
- 1 = CRC-32 (zlib): crc32(payload, crc32(BODY)). Written by earlier versions; still read
  and verified, so a disk tier written before the change is not lost.
- 3 = XXH3-64 as 2, and the payload is a quantized page record (kvstore/quant, docs/quant.md)
  standing for `raw_bytes` bytes of pool page: BODY ends with raw_bytes. A quantized record
  read as algo 2 (a flipped algo byte), or the reverse, has a BODY whose lengths do not add
  up: corrupt, never decoded as the other kind.

Both guard against accidents (torn writes, flipped bits, a wrong record under a key), not
against an attacker who can already write the daemon's files; neither is a cryptographic hash.

In memory a checksum is one int that carries its algorithm: `algo << 64 | value` (a
`Checksum`), so a record read from disk keeps verifying the way it was written.
"""

from __future__ import annotations

import struct
import time
import zlib
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

import xxhash

HASH_BYTES = 16
MAGIC = b"KVP1"
ALGO_CRC32 = 1
ALGO_XXH3 = 2
ALGO_XXH3_QUANT = 3  # XXH3-64; the payload is a quantized page record (BODY ends with raw_bytes)
ALGOS = (ALGO_CRC32, ALGO_XXH3, ALGO_XXH3_QUANT)
_VALUE_MASK = (1 << 64) - 1

_HEAD = struct.Struct("<4sB3xQ")
_BODY = struct.Struct("<QIQB16s16sHH")
_RAW = struct.Struct("<Q")
META_HEAD_BYTES = _HEAD.size
META_FIXED_BYTES = _HEAD.size + _BODY.size


class TierName(StrEnum):
    """A tier below the pool (a str: it reads as "host" or "disk" in messages and counters)."""

    HOST = "host"
    DISK = "disk"


class CorruptPage(Exception):
    """A record below the pool failed verification: never serve it. `key` names it."""

    def __init__(self, key: PageKey, reason: str) -> None:
        super().__init__(f"corrupt page {key}: {reason}")
        self.key = key
        self.reason = reason


class PageKey(NamedTuple):
    """A page's identity below the pool. The chained block hash already commits to the whole
    token prefix (docs/hashing.md); the namespace keeps tenants apart on disk."""

    namespace: str
    block_hash: bytes

    def encode(self) -> bytes:
        """The LMDB key: namespace bytes then the 16-byte hash (fixed length, so unambiguous)."""
        return self.namespace.encode() + self.block_hash

    @classmethod
    def decode(cls, raw: bytes) -> PageKey:
        if len(raw) < HASH_BYTES:
            raise ValueError(f"a page key is at least {HASH_BYTES} bytes, got {len(raw)}")
        return cls(raw[:-HASH_BYTES].decode(), bytes(raw[-HASH_BYTES:]))

    def __str__(self) -> str:
        return f"{self.namespace}/{self.block_hash.hex()}"


@dataclass(frozen=True, slots=True)
class PageMeta:
    """What a tier knows of a page without its bytes (all the re-index needs)."""

    namespace: str
    block_hash: bytes
    parent_hash: bytes  # b"" for the first page of a sequence
    num_tokens: int
    page_bytes: int  # the payload's length
    geometry: str  # the namespace's geometry/model tag; a daemon with another one refuses the page
    created_ns: int  # wall clock when the record was made: the order of pages after a restart
    # 0: the payload is the pool page's bytes. Else the payload is a quantized page record
    # (kvstore/quant) of a pool page of raw_bytes bytes; promotions dequantize it.
    raw_bytes: int = 0

    @property
    def key(self) -> PageKey:
        return PageKey(self.namespace, self.block_hash)

    @property
    def represented_bytes(self) -> int:
        """The bytes of pool page the payload stands for."""
        return self.raw_bytes or self.page_bytes

    def body(self) -> bytes:
        ns, geom = self.namespace.encode(), self.geometry.encode()
        return (
            _BODY.pack(
                self.created_ns,
                self.num_tokens,
                self.page_bytes,
                len(self.parent_hash),
                self.block_hash,
                self.parent_hash.ljust(HASH_BYTES, b"\0"),
                len(ns),
                len(geom),
            )
            + ns
            + geom
            + (_RAW.pack(self.raw_bytes) if self.raw_bytes else b"")
        )


def make_meta(
    namespace: str,
    block_hash: bytes,
    parent_hash: bytes,
    num_tokens: int,
    page_bytes: int,
    geometry: str,
    created_ns: int | None = None,
    raw_bytes: int = 0,
) -> PageMeta:
    """A checked PageMeta: hashes of the right length, sizes in range. `raw_bytes` > 0: the
    payload is a quantized record of a pool page of that many bytes."""
    if len(block_hash) != HASH_BYTES:
        raise ValueError(f"block_hash must be {HASH_BYTES} bytes, got {len(block_hash)}")
    if len(parent_hash) not in (0, HASH_BYTES):
        raise ValueError(f"parent_hash must be empty or {HASH_BYTES} bytes, got {len(parent_hash)}")
    if not 0 <= num_tokens < 2**32 or page_bytes < 0 or raw_bytes < 0:
        raise ValueError(
            f"num_tokens={num_tokens}, page_bytes={page_bytes} and raw_bytes={raw_bytes} must be >= 0"
        )
    return PageMeta(
        namespace,
        bytes(block_hash),
        bytes(parent_hash),
        num_tokens,
        page_bytes,
        geometry,
        time.time_ns() if created_ns is None else created_ns,
        raw_bytes,
    )


def checksum(body: bytes, payload: bytes | memoryview, algo: int = ALGO_XXH3) -> int:
    """The tagged checksum (`algo << 64 | value`) of a record's BODY and payload."""
    if algo in (ALGO_XXH3, ALGO_XXH3_QUANT):
        return algo << 64 | xxhash.xxh3_64_intdigest(payload, xxhash.xxh3_64_intdigest(body))
    if algo == ALGO_CRC32:
        return ALGO_CRC32 << 64 | zlib.crc32(payload, zlib.crc32(body))
    raise ValueError(f"unknown checksum algorithm {algo}")


@dataclass(frozen=True, slots=True)
class PageRecord:
    """Metadata, payload and checksum, ready for a tier. Build with `PageRecord.build`."""

    meta: PageMeta
    payload: bytes | memoryview
    checksum: int

    @classmethod
    def build(cls, meta: PageMeta, payload: bytes | bytearray | memoryview) -> PageRecord:
        view = memoryview(payload).cast("B")
        if view.nbytes != meta.page_bytes:
            raise ValueError(
                f"page {meta.key}: page_bytes={meta.page_bytes} but the payload has {view.nbytes}"
            )
        algo = ALGO_XXH3_QUANT if meta.raw_bytes else ALGO_XXH3
        return cls(meta, view, checksum(meta.body(), view, algo))

    @property
    def key(self) -> PageKey:
        return self.meta.key

    def encode_meta(self) -> bytes:
        """The metadata bytes the disk tier stores under the key (HEAD + BODY)."""
        return _HEAD.pack(MAGIC, self.checksum >> 64, self.checksum & _VALUE_MASK) + self.meta.body()


def decode_meta(key: PageKey, raw: bytes | memoryview) -> tuple[PageMeta, int]:
    """(meta, checksum) from stored metadata bytes; CorruptPage if they are not a well-formed
    record of `key` (garbage, truncated, another key's record, unknown format)."""
    raw = bytes(raw)
    if len(raw) < META_FIXED_BYTES:
        raise CorruptPage(key, f"metadata is {len(raw)} bytes, shorter than {META_FIXED_BYTES}")
    magic, algo, value = _HEAD.unpack_from(raw)
    if magic != MAGIC or algo not in ALGOS:
        raise CorruptPage(key, f"unknown record format magic={magic!r} algo={algo}")
    created, ntok, nbytes, plen, bh, parent, ns_len, geom_len = _BODY.unpack_from(raw, _HEAD.size)
    tail = _RAW.size if algo == ALGO_XXH3_QUANT else 0
    if plen not in (0, HASH_BYTES) or META_FIXED_BYTES + ns_len + geom_len + tail != len(raw):
        raise CorruptPage(key, "metadata lengths do not add up")
    raw_bytes = _RAW.unpack_from(raw, len(raw) - tail)[0] if tail else 0
    if tail and not raw_bytes:
        raise CorruptPage(key, "a quantized record with raw_bytes=0")
    rest = raw[META_FIXED_BYTES : len(raw) - tail]
    try:
        ns, geom = rest[:ns_len].decode(), rest[ns_len:].decode()
    except UnicodeDecodeError:
        raise CorruptPage(key, "namespace or geometry is not utf-8") from None
    meta = PageMeta(ns, bh, parent[:plen], ntok, nbytes, geom, created, raw_bytes)
    if meta.key != key:
        raise CorruptPage(key, f"the record stored under it is for {meta.key}")
    return meta, algo << 64 | value


def verify(
    key: PageKey, meta: PageMeta, expected: int, payload: bytes | memoryview, body: bytes | None = None
) -> None:
    """Raise CorruptPage unless `payload` is exactly the bytes the checksum was made over.
    `body`: the stored BODY bytes when the caller has them (the disk tier): the checksum is
    then taken over them as stored, and `meta.body()` need not be packed again."""
    n = memoryview(payload).nbytes
    if n != meta.page_bytes:
        raise CorruptPage(key, f"payload is {n} bytes, the metadata says {meta.page_bytes}")
    if checksum(meta.body() if body is None else body, payload, expected >> 64) != expected:
        raise CorruptPage(key, "checksum mismatch")
