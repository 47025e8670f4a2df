"""encode: a page's bytes -> a quantized page record, each layer within the scheme's error bound
or stored one step more precisely; decode: a record -> the page's bytes, after every check.
numpy only: this is the daemon's path (the daemon never imports torch)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from . import native, numeric, record
from .errors import CorruptRecord, RecordMismatch, SchemeError
from .numeric import Quantized
from .record import RecordInfo
from .scheme import FALLBACK, QUANTIZABLE, PageShape, QuantScheme

BITS = {"int8": 8, "int4": 4}
USE_NATIVE = True  # kvstore/_quant.c where built; tests turn it off to compare with numeric.py


@dataclass(frozen=True, slots=True)
class Encoded:
    record: bytes
    precisions: tuple[str, ...]  # per layer, as stored
    layer_errors: tuple[float, ...]  # measured relative L2 error per layer (max of K and V); 0 for fp
    fallbacks: int  # layers stored more precisely than the scheme asked (over the bound)
    represented_bytes: int

    @property
    def error(self) -> float:
        return max(self.layer_errors, default=0.0)

    @property
    def stored_bytes(self) -> int:
        return len(self.record)


def _elements(buf: object, shape: PageShape) -> np.ndarray:
    """The page's elements [L, 2, T, H, D] over `buf` (no copy); bfloat16 as uint16 bits."""
    dt = np.uint16 if shape.dtype == "bfloat16" else np.dtype(shape.dtype)
    flat = (
        np.frombuffer(buf, dtype=np.uint8)
        if not isinstance(buf, np.ndarray)
        else buf.reshape(-1).view(np.uint8)
    )
    if flat.nbytes != shape.page_bytes:
        raise SchemeError(f"the page has {flat.nbytes} bytes, its shape says {shape.page_bytes}")
    return flat.view(dt).reshape(shape.dims)


def _quantize_layers(xf: np.ndarray, precision: str, scheme: QuantScheme, dtype: str, k: int):
    """Quantize xf[G, 2, T', H, D]; (K part, V part, per-layer error of the stored result)."""
    bits = BITS[precision]
    parts, errors = [], []
    for kv, gran in ((0, scheme.keys), (1, scheme.values)):
        q = numeric.quantize(xf[:, kv], bits, gran, k)
        y = numeric.dequantize(q)
        if dtype != "float32":  # measure what a reader gets back: the page's own element type
            y = numeric.to_f32(numeric.from_f32(y, dtype), dtype)
        parts.append(q)
        errors.append(numeric.relative_error(xf[:, kv], y))
    return parts[0], parts[1], np.maximum(errors[0], errors[1])


def _encode_numpy(x: np.ndarray, info: RecordInfo, scheme: QuantScheme) -> list[tuple[str, float, bytes]]:
    """(precision, error, block) per layer: numeric.py over all layers of a precision at once."""
    shape, sink_tokens, k = info.shape, info.sink_tokens, info.outliers
    precisions = list(info.precisions)
    errors = [0.0] * shape.num_layers
    stored: dict[int, tuple[Quantized, Quantized, int]] = {}  # layer -> (K, V, index in batch)
    pending = [i for i, p in enumerate(precisions) if p != "fp"]
    xf = numeric.to_f32(x[:, :, sink_tokens:], shape.dtype) if pending else None
    while pending:
        for p in ("int4", "int8"):
            layers = [i for i in pending if precisions[i] == p]
            if not layers:
                continue
            qk, qv, err = _quantize_layers(xf[layers], p, scheme, shape.dtype, k)
            for j, i in enumerate(layers):
                if np.isfinite(err[j]) and (scheme.bound is None or err[j] <= scheme.bound):
                    stored[i] = (qk, qv, j)
                    errors[i] = float(err[j])
                    pending.remove(i)
                else:
                    precisions[i] = FALLBACK[p]
                    if precisions[i] == "fp":
                        pending.remove(i)
    blocks = []
    for i, p in enumerate(precisions):
        if p == "fp":
            blocks.append((p, 0.0, x[i].tobytes()))
            continue
        qk, qv, j = stored[i]
        parts = [x[i, :, :sink_tokens], qk.scale[j]]
        if p == "int4":
            parts.append(qk.zero[j])
        parts.append(qv.scale[j])
        if p == "int4":
            parts.append(qv.zero[j])
        parts += [np.stack([qk.out_val[j], qv.out_val[j]]), np.stack([qk.out_idx[j], qv.out_idx[j]])]
        body = np.stack([qk.codes[j], qv.codes[j]])
        parts.append(numeric.pack4(body) if p == "int4" else body)
        blocks.append((p, errors[i], b"".join(a.tobytes() for a in parts)))
    return blocks


def encode(page: object, shape: PageShape, scheme: QuantScheme, sink_tokens: int = 0) -> Encoded:
    """Quantize one page (any bytes-like of shape.page_bytes, layout [layer, kv, token, head,
    dim]) into a record. The first `sink_tokens` tokens are kept as they are."""
    if not 0 <= sink_tokens <= shape.page_tokens:
        raise SchemeError(f"sink_tokens must be in 0..{shape.page_tokens}, got {sink_tokens}")
    x = _elements(page, shape)
    asked = scheme.layer_precisions(shape.num_layers)
    k = min(scheme.outliers, shape.head_dim)
    if any(p != "fp" for p in asked) and k and shape.head_dim > 256:
        raise SchemeError(f"outliers need head_dim <= 256 (a uint8 index), got {shape.head_dim}")
    if shape.dtype not in QUANTIZABLE or sink_tokens == shape.page_tokens:
        asked = ("fp",) * shape.num_layers
    info = RecordInfo(shape, asked, scheme.keys, scheme.values, k, sink_tokens, 0)
    if native.available and USE_NATIVE:
        precisions, errors, out = native.encode_page(x, info, scheme)
    else:
        stored = _encode_numpy(x, info, scheme)
        precisions = [p for p, _, _ in stored]
        errors = [e for _, e, _ in stored]
        out = bytearray(record.HEADER.size + shape.num_layers)
        for _, _, block in stored:
            out += block
    out[: record.HEADER.size + shape.num_layers] = record.pack_header(
        replace(info, precisions=tuple(precisions))
    )
    return Encoded(
        record.seal(out),
        tuple(precisions),
        tuple(errors),
        sum(a != b for a, b in zip(asked, precisions, strict=True)),
        shape.page_bytes,
    )


def info(rec: object, verify: bool = False) -> RecordInfo:
    """The header of a record (cheap unless verify: then the checksum over all of it too)."""
    return record.parse(rec, verify=verify)


def _read_block(
    mv: memoryview, at: int, info: RecordInfo, precision: str
) -> tuple[dict[str, np.ndarray], int]:
    s = info.shape
    page_dt = np.uint16 if s.dtype == "bfloat16" else np.dtype(s.dtype)
    parts = {}
    for sec in record.layer_sections(info, precision):
        n = sec.nbytes(s.itemsize)
        dt = page_dt if sec.dtype == "page" else np.dtype(sec.dtype)
        parts[sec.name] = np.frombuffer(mv[at : at + n], dtype=np.uint8).view(dt).reshape(sec.shape)
        at += n
    return parts, at


def decode(rec: object, shape: PageShape | None = None, out: object = None) -> np.ndarray:
    """The page's bytes (uint8, shape.page_bytes) from a record, written into `out` (a writable
    bytes-like of the page's size) when given. Every check comes first: a corrupt record
    (CorruptRecord) or one of another shape (RecordMismatch) leaves `out` untouched."""
    mv = memoryview(rec).cast("B")
    ri = record.parse(mv, verify=True)
    s = ri.shape
    if shape is not None and s != shape:
        raise RecordMismatch(f"the record holds a page of {s}, not {shape}")
    if native.available and USE_NATIVE:
        target = _target(out, s)
        try:
            native.decode_page(mv, ri, target)
        except ValueError as e:
            raise CorruptRecord(str(e)) from None
        return target
    at = record.HEADER.size + s.num_layers
    blocks = []
    for p in ri.precisions:
        parts, at = _read_block(mv, at, ri, p)
        if p != "fp" and ri.outliers and int(parts["out_idx"].max(initial=0)) >= s.head_dim:
            raise CorruptRecord(f"an outlier index is past head_dim {s.head_dim}")
        blocks.append(parts)
    target = _target(out, s)
    pages = target.view(np.uint16 if s.dtype == "bfloat16" else np.dtype(s.dtype)).reshape(s.dims)
    for p in ("int8", "int4"):
        layers = [i for i, q in enumerate(ri.precisions) if q == p]
        if layers:
            y = _dequantize_layers([blocks[i] for i in layers], p, ri)
            pages[layers, :, ri.sink_tokens :] = numeric.from_f32(y, s.dtype)
            pages[layers, :, : ri.sink_tokens] = np.stack([blocks[i]["sinks"] for i in layers])
    for i, p in enumerate(ri.precisions):
        if p == "fp":
            pages[i] = blocks[i]["raw"]
    return target


def _target(out: object, s: PageShape) -> np.ndarray:
    target = np.empty(s.page_bytes, np.uint8) if out is None else np.frombuffer(out, dtype=np.uint8)
    if target.nbytes != s.page_bytes:
        raise RecordMismatch(f"out has {target.nbytes} bytes, the page {s.page_bytes}")
    return target


def _dequantize_layers(blocks: list[dict[str, np.ndarray]], precision: str, ri: RecordInfo) -> np.ndarray:
    """float32 [G, 2, T', H, D] of G layers' blocks of one precision."""
    d = ri.shape.head_dim

    def stack(name: str) -> np.ndarray:
        return np.stack([b[name] for b in blocks])

    body = stack("body")
    codes = numeric.unpack4(body, d) if precision == "int4" else body
    zero = {kv: stack(f"{kv}_zero") if precision == "int4" else None for kv in ("k", "v")}
    out_val, out_idx = stack("out_val"), stack("out_idx")
    halves = []
    for kv, name, gran in ((0, "k", ri.keys), (1, "v", ri.values)):
        q = Quantized(
            BITS[precision],
            gran,
            stack(f"{name}_scale"),
            zero[name],
            out_val[:, kv],
            out_idx[:, kv],
            codes[:, kv],
        )
        halves.append(numeric.dequantize(q))
    return np.stack(halves, axis=1)


def encode_array(x: np.ndarray, scheme: QuantScheme, sink_tokens: int = 0) -> Encoded:
    """encode() of a float16/float32 array [L, 2, T, H, D] (tests and benchmarks)."""
    layers, _, tokens, heads, dim = x.shape
    return encode(
        np.ascontiguousarray(x), PageShape(layers, tokens, heads, dim, x.dtype.name), scheme, sink_tokens
    )


def decode_array(rec: object) -> np.ndarray:
    """decode() as an array [L, 2, T, H, D] of the page's element type (bfloat16 as uint16)."""
    s = record.parse(rec, verify=False).shape
    flat = decode(rec)
    return flat.view(np.uint16 if s.dtype == "bfloat16" else np.dtype(s.dtype)).reshape(s.dims)
