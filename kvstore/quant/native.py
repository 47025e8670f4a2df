"""The codec's per-layer loops over kvstore/_quant.c (one fused pass per tensor where numpy
makes ~20): the same arithmetic as numeric.py, byte for byte (tests/test_quant_fast.py).
`quantize is None` where the extension is not built; codec.py then uses numeric.py."""

from __future__ import annotations

import math

import numpy as np

from . import record
from .record import RecordInfo
from .scheme import FALLBACK, QuantScheme

try:
    from kvstore._quant import dequantize, quantize
except ImportError:  # not built (`make native`): numeric.py does the work
    quantize = dequantize = None

DTYPE = {"float32": 0, "float16": 1, "bfloat16": 2}
GRAN = {"tensor": 0, "vector": 1, "channel": 2}
BITS = {"int8": 8, "int4": 4}


def _rel(err2: float, x2: float) -> float:
    if x2 == 0:
        return 0.0 if err2 == 0 else math.inf
    return math.sqrt(err2 / x2)


def _views(block: bytearray | memoryview, ri: RecordInfo, precision: str) -> dict[str, np.ndarray]:
    """The sections of one layer's block as uint8 arrays over it (no copy), by name."""
    flat = np.frombuffer(block, dtype=np.uint8)
    out, at = {}, 0
    for sec in record.layer_sections(ri, precision):
        n = sec.nbytes(ri.shape.itemsize)
        out[sec.name] = flat[at : at + n]
        at += n
    return out


def _halves(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = a.nbytes // 2
    return a[:n], a[n:]


def encode_layer(x: np.ndarray, ri: RecordInfo, scheme: QuantScheme, asked: str) -> tuple[str, float, bytes]:
    """(precision stored, its error, the block) of one layer x[2, T, H, D] (the page's dtype,
    bfloat16 as uint16): at `asked`, or one step up while over the bound or not finite."""
    s = ri.shape
    sinks, t = ri.sink_tokens, s.page_tokens - ri.sink_tokens
    p = asked
    while p != "fp":
        block = bytearray(record.block_bytes(ri, p))
        v = _views(block, ri, p)
        v["sinks"][:] = x[:, :sinks].reshape(-1).view(np.uint8)
        oval, oidx, body = _halves(v["out_val"]), _halves(v["out_idx"]), _halves(v["body"])
        errs = []
        for kv, name, gran in ((0, "k", scheme.keys), (1, "v", scheme.values)):
            e2, x2 = quantize(
                x[kv, sinks:], DTYPE[s.dtype], t, s.num_kv_heads, s.head_dim, BITS[p], GRAN[gran], ri.outliers,
                v[f"{name}_scale"], v.get(f"{name}_zero"), oval[kv], oidx[kv], body[kv],
            )  # fmt: skip
            errs.append(_rel(e2, x2))
        err = math.nan if any(math.isnan(e) for e in errs) else max(errs)
        if math.isfinite(err) and (scheme.bound is None or err <= scheme.bound):
            return p, err, bytes(block)
        p = FALLBACK[p]
    return "fp", 0.0, x.tobytes()


def decode_layer(parts: dict[str, np.ndarray], ri: RecordInfo, precision: str, out: np.ndarray) -> None:
    """Dequantize one layer's checked block (its sections as arrays) into out[2, T, H, D]."""
    s = ri.shape
    sinks, t = ri.sink_tokens, s.page_tokens - ri.sink_tokens
    out[:, :sinks] = parts["sinks"]
    for kv, name, gran in ((0, "k", ri.keys), (1, "v", ri.values)):
        dequantize(
            parts[f"{name}_scale"], parts.get(f"{name}_zero"), parts["out_val"][kv], parts["out_idx"][kv],
            parts["body"][kv], t, s.num_kv_heads, s.head_dim, BITS[precision], GRAN[gran], ri.outliers,
            out[kv, sinks:], DTYPE[s.dtype],
        )  # fmt: skip
