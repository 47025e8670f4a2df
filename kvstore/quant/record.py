"""The quantized page record: a versioned, checksummed byte format that carries everything
needed to dequantize a page (docs/quant.md has the layout for other readers). Little-endian:

    HEADER (32 B)  magic "KVQ1" | version u8 = 1 | dtype u8 (kvstore.v1.DType) | keys u8 |
                   values u8 | outliers u8 | 0 u8 | layers u16 | tokens u16 | heads u16 |
                   head_dim u16 | sinks u16 | 0 u16 | 0 u16 | checksum u64
    TABLE          one u8 per layer: its precision (0 fp, 1 int8, 2 int4)
    BLOCKS         one per layer, in layer order (`layer_sections` gives their parts)

checksum = xxh3_64 (seed 0) of the header's first 24 bytes followed by every byte after the
header, so a flipped bit anywhere, a truncation or an appended byte is refused.
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass

import xxhash
from kvstore_proto import dtypes

from .errors import CorruptRecord
from .scheme import KEY_SCALES, PRECISIONS, VALUE_SCALES, PageShape

MAGIC = b"KVQ1"
VERSION = 1
HEADER = struct.Struct("<4s6B7HQ")
_CHECKED = HEADER.size - 8  # the header's bytes before the checksum (the last 8)


@dataclass(frozen=True, slots=True)
class RecordInfo:
    """What a record's header says (no dequantization)."""

    shape: PageShape
    precisions: tuple[str, ...]  # per layer
    keys: str
    values: str
    outliers: int
    sink_tokens: int
    stored_bytes: int

    @property
    def represented_bytes(self) -> int:
        return self.shape.page_bytes


@dataclass(frozen=True, slots=True)
class Section:
    name: str
    dtype: str  # numpy dtype, or "page" for the page's own element type (raw bytes)
    shape: tuple[int, ...]

    def nbytes(self, itemsize: int) -> int:
        return math.prod(self.shape) * (itemsize if self.dtype == "page" else _ITEMSIZE[self.dtype])


_ITEMSIZE = {"float16": 2, "int8": 1, "uint8": 1}


@functools.lru_cache(maxsize=64)
def layer_sections(info: RecordInfo, precision: str) -> tuple[Section, ...]:
    """The parts of one layer's block, in order. T' = tokens - sinks (the quantized tokens)."""
    s = info.shape
    t, h, d, k = s.page_tokens - info.sink_tokens, s.num_kv_heads, s.head_dim, info.outliers
    if precision == "fp":
        return (Section("raw", "page", (2, s.page_tokens, h, d)),)
    key_scales = {"vector": (t, h), "channel": (h, d), "tensor": (1,)}[info.keys]
    value_scales = {"vector": (t, h), "tensor": (1,)}[info.values]
    parts = [Section("sinks", "page", (2, info.sink_tokens, h, d)), Section("k_scale", "float16", key_scales)]
    if precision == "int4":
        parts.append(Section("k_zero", "float16", key_scales))
    parts.append(Section("v_scale", "float16", value_scales))
    if precision == "int4":
        parts.append(Section("v_zero", "float16", value_scales))
    parts += [Section("out_val", "float16", (2, t, h, k)), Section("out_idx", "uint8", (2, t, h, k))]
    if precision == "int8":
        parts.append(Section("body", "int8", (2, t, h, d)))
    else:
        parts.append(Section("body", "uint8", (2, t, h, (d + 1) // 2)))
    return tuple(parts)


@functools.lru_cache(maxsize=64)
def block_bytes(info: RecordInfo, precision: str) -> int:
    return sum(p.nbytes(info.shape.itemsize) for p in layer_sections(info, precision))


def record_bytes(info: RecordInfo) -> int:
    per = {p: block_bytes(info, p) for p in set(info.precisions)}
    return HEADER.size + info.shape.num_layers + sum(per[p] for p in info.precisions)


def pack_header(info: RecordInfo) -> bytes:
    s = info.shape
    return HEADER.pack(
        MAGIC,
        VERSION,
        dtypes.BY_NAME[s.dtype].wire,
        KEY_SCALES.index(info.keys),
        VALUE_SCALES.index(info.values),
        info.outliers,
        0,
        s.num_layers,
        s.page_tokens,
        s.num_kv_heads,
        s.head_dim,
        info.sink_tokens,
        0,
        0,
        0,
    ) + bytes(PRECISIONS.index(p) for p in info.precisions)


def seal(record: bytearray | memoryview) -> bytes:
    """Write the checksum into a complete record."""
    struct.pack_into("<Q", record, _CHECKED, checksum(memoryview(record)))
    return bytes(record)


def checksum(record: memoryview) -> int:
    h = xxhash.xxh3_64()
    h.update(record[:_CHECKED])
    h.update(record[HEADER.size :])
    return h.intdigest()


def parse(record: bytes | bytearray | memoryview, verify: bool = True) -> RecordInfo:
    """The header of a record; CorruptRecord unless it is well-formed, of a version this code
    reads, exactly as long as its header says and (verify) its checksum matches."""
    mv = memoryview(record).cast("B")
    if mv.nbytes < HEADER.size:
        raise CorruptRecord(f"{mv.nbytes} bytes, shorter than the {HEADER.size}-byte header")
    magic, version, wire, keys, values, k, _, layers, tokens, heads, dim, sinks, *_, value = (
        HEADER.unpack_from(mv)
    )
    if magic != MAGIC:
        raise CorruptRecord(f"bad magic {bytes(magic)!r}")
    if version != VERSION:
        raise CorruptRecord(f"version {version}; this code reads version {VERSION}")
    if verify and checksum(mv) != value:
        raise CorruptRecord("checksum mismatch")
    table = bytes(mv[HEADER.size : HEADER.size + layers])
    if wire not in dtypes.BY_WIRE or keys >= len(KEY_SCALES) or values >= len(VALUE_SCALES):
        raise CorruptRecord(f"invalid header codes dtype={wire} keys={keys} values={values}")
    if len(table) != layers or any(p >= len(PRECISIONS) for p in table):
        raise CorruptRecord("invalid precision table")
    if not (all(0 < v < 2**16 for v in (layers, tokens, heads, dim)) and sinks <= tokens and k <= dim):
        raise CorruptRecord(f"invalid geometry {(layers, tokens, heads, dim)} sinks={sinks} outliers={k}")
    shape = PageShape(layers, tokens, heads, dim, dtypes.BY_WIRE[wire].name)
    info = RecordInfo(
        shape,
        tuple(PRECISIONS[p] for p in table),
        KEY_SCALES[keys],
        VALUE_SCALES[values],
        k,
        sinks,
        mv.nbytes,
    )
    if record_bytes(info) != mv.nbytes:
        raise CorruptRecord(f"{mv.nbytes} bytes; its header describes {record_bytes(info)}")
    return info
