"""The codec's per-layer loops over kvstore/_quant.c (one fused pass per tensor where numpy
makes ~20): the same arithmetic as numeric.py, byte for byte (tests/test_quant_fast.py).
`available` is False where the extension is not built; codec.py then uses numeric.py."""

from __future__ import annotations

import math

import numpy as np

from . import record
from .record import RecordInfo
from .scheme import FALLBACK, QuantScheme

try:
    from kvstore import _quant as _native
except ImportError:  # not built (`make native`): numeric.py does the work
    _native = None

available = _native is not None
DTYPE = {"float32": 0, "float16": 1, "bfloat16": 2}
GRAN = {"tensor": 0, "vector": 1, "channel": 2}
PREC = {"int8": 1, "int4": 2}


def _rel(err2: float, x2: float) -> float:
    if x2 == 0:
        return 0.0 if err2 == 0 else math.inf
    return math.sqrt(err2 / x2)


def encode_layer(x: np.ndarray, ri: RecordInfo, scheme: QuantScheme, asked: str) -> tuple[str, float, bytes]:
    """(precision stored, its error, the block) of one layer x[2, T, H, D] (the page's dtype,
    bfloat16 as uint16): at `asked`, or one step up while over the bound or not finite."""
    s = ri.shape
    p = asked
    while p != "fp":
        block = bytearray(record.block_bytes(ri, p))
        ek, xk, ev, xv = _native.encode_layer(
            x, DTYPE[s.dtype], s.page_tokens, s.num_kv_heads, s.head_dim, ri.sink_tokens, ri.outliers,
            GRAN[scheme.keys], GRAN[scheme.values], PREC[p], block,
        )  # fmt: skip
        errs = (_rel(ek, xk), _rel(ev, xv))
        err = math.nan if any(math.isnan(e) for e in errs) else max(errs)
        if math.isfinite(err) and (scheme.bound is None or err <= scheme.bound):
            return p, err, bytes(block)
        p = FALLBACK[p]
    return "fp", 0.0, x.tobytes()


def decode_page(mv: memoryview, ri: RecordInfo, out: np.ndarray) -> None:
    """Dequantize a verified record (record.parse) into out; ValueError (before writing
    anything) if an outlier index is past head_dim."""
    s = ri.shape
    _native.decode_page(
        mv, out, s.num_layers, s.page_tokens, s.num_kv_heads, s.head_dim, ri.sink_tokens, ri.outliers,
        GRAN[ri.keys], GRAN[ri.values], DTYPE.get(s.dtype, -1), s.itemsize,
    )  # fmt: skip
