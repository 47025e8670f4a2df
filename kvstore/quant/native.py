"""The codec over kvstore/_quant.c (one call per page, a few passes per vector where numpy
makes ~20): the same arithmetic as numeric.py, byte for byte (tests/test_quant_fast.py).
`available` is False where the extension is not built; codec.py then uses numeric.py."""

from __future__ import annotations

import math
import threading
from itertools import accumulate

import numpy as np

from . import record
from .record import RecordInfo
from .scheme import FALLBACK, PRECISIONS, QuantScheme

try:
    from kvstore import _quant as _native
except ImportError:  # not built (`make native`): numeric.py does the work
    _native = None

# a build from before encode_page (a stale .so: `make native` rebuilds it) is not used
available = _native is not None and hasattr(_native, "encode_page")
DTYPE = {"float32": 0, "float16": 1, "bfloat16": 2}
GRAN = {"tensor": 0, "vector": 1, "channel": 2}


_scratch = threading.local()


def _buffer(n: int) -> memoryview:
    """n bytes of this thread's buffer, reused by every encode on the thread (the record is
    copied out of it as it is sealed). A fresh, zeroed bytearray per page cost as much CPU as
    the quantizing on a busy machine: the allocator hands the ~0.8 MB back to the kernel after
    each page, so each new one is faulted in and zeroed again."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or len(buf) < n:
        buf = _scratch.buf = bytearray(n)
    return memoryview(buf)[:n]


def _rel(err2: float, x2: float) -> float:
    if x2 == 0:
        return 0.0 if err2 == 0 else math.inf
    return math.sqrt(err2 / x2)


def encode_page(
    x: np.ndarray, ri: RecordInfo, scheme: QuantScheme
) -> tuple[list[str], list[float], bytearray | memoryview]:
    """(precision stored per layer, its error, the record with its blocks written and room for
    its header: in this thread's buffer, valid until its next encode) of a page x[L, 2, T, H, D] (the page's dtype, bfloat16 as uint16): each layer
    at the precision ri asks, or one step up while over the bound or not finite. One call
    writes every layer straight into the record; only the layers that fall back are redone."""
    s = ri.shape
    sizes = {c: record.block_bytes(ri, p) for c, p in enumerate(PRECISIONS)}
    table = [PRECISIONS.index(p) for p in ri.precisions]
    redo = [1] * s.num_layers
    errors = [0.0] * s.num_layers
    sums = np.zeros((s.num_layers, 4))
    prev: tuple[memoryview, list[int]] | None = None
    while True:
        starts = list(accumulate((sizes[c] for c in table), initial=record.HEADER.size + s.num_layers))
        out = _buffer(starts[-1]) if prev is None else bytearray(starts[-1])
        if prev is not None:  # the layers kept from the round before, where they now start
            old, old_starts = prev
            for i, again in enumerate(redo):
                if not again:
                    out[starts[i] : starts[i + 1]] = old[old_starts[i] : old_starts[i + 1]]
        _native.encode_page(
            x, DTYPE[s.dtype], s.num_layers, s.page_tokens, s.num_kv_heads, s.head_dim, ri.sink_tokens,
            ri.outliers, GRAN[scheme.keys], GRAN[scheme.values], bytes(table), bytes(redo), out, sums,
        )  # fmt: skip
        over = []
        rows = sums.tolist()  # Python floats: numpy scalars cost ~1 us per operation here
        for i, again in enumerate(redo):
            if again and table[i]:
                ek, xk, ev, xv = rows[i]
                rk, rv = _rel(ek, xk), _rel(ev, xv)
                err = math.nan if math.isnan(rk) or math.isnan(rv) else max(rk, rv)
                if math.isfinite(err) and (scheme.bound is None or err <= scheme.bound):
                    errors[i] = err
                else:
                    over.append(i)
        if not over:
            return [PRECISIONS[c] for c in table], errors, out
        prev = (memoryview(out), starts)
        redo = [0] * s.num_layers
        for i in over:
            table[i] = PRECISIONS.index(FALLBACK[PRECISIONS[table[i]]])
            redo[i] = 1


def decode_page(mv: memoryview, ri: RecordInfo, out: np.ndarray) -> None:
    """Dequantize a verified record (record.parse) into out; ValueError (before writing
    anything) if an outlier index is past head_dim."""
    s = ri.shape
    _native.decode_page(
        mv, out, s.num_layers, s.page_tokens, s.num_kv_heads, s.head_dim, ri.sink_tokens, ri.outliers,
        GRAN[ri.keys], GRAN[ri.values], DTYPE.get(s.dtype, -1), s.itemsize,
    )  # fmt: skip
