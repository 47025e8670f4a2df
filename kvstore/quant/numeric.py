"""The quantizer's arithmetic on numpy arrays: the daemon's CPU path. It computes exactly what
the torch reference (kernels/kvstore_kernels/reference.py, the oracle) computes, operation for
operation, so the two agree bit for bit (tests/test_quant_reference.py).

A batch is `x[G, T, H, D]` float32: G tensors (layers) of T tokens x H heads x D dims. Per
vector (one token x one head, D values): the k largest |x| are kept aside as fp16 values and
uint8 indices (the first index wins a tie) and zeroed in the body; scales are taken from the
body over the granularity's axes; the body is quantized:

- int8, symmetric:  scale = fp16(max|body| / 127); q = clip(rint(body / scale), -127, 127)
- int4, asymmetric: zero = fp16(min body); scale = fp16((max body - zero) / 15);
                    q = clip(rint((body - zero) / scale), 0, 15)

A scale that rounds to 0 is stored as 1. Dequantize: q * scale (+ zero), then the outliers are
written back in their slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

F16 = np.float16
F32 = np.float32

# The axes of x[G, T, H, D] that one scale covers, and the shape its scales are stored in.
_AXES = {"vector": (3,), "channel": (1,), "tensor": (1, 2, 3)}


def scale_shape(gran: str, g: int, t: int, h: int, d: int) -> tuple[int, ...]:
    return {"vector": (g, t, h), "channel": (g, h, d), "tensor": (g,)}[gran]


@dataclass(slots=True)
class Quantized:
    """One batch, quantized. codes are unpacked (int8, or uint8 0..15 for int4)."""

    bits: int
    gran: str
    scale: np.ndarray  # fp16, scale_shape()
    zero: np.ndarray | None  # fp16, same shape (int4 only)
    out_val: np.ndarray  # fp16 [G, T, H, k]
    out_idx: np.ndarray  # uint8 [G, T, H, k]
    codes: np.ndarray  # [G, T, H, D]


def split_outliers(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(body, values fp16, indices uint8): the top-k |x| of every vector, the body with them zeroed."""
    idx = np.empty((*x.shape[:-1], k), dtype=np.intp)
    if k:
        a = np.abs(x)
        for j in range(k):
            i = a.argmax(axis=-1)[..., None]
            idx[..., j : j + 1] = i
            np.put_along_axis(a, i, -1.0, axis=-1)
    values = np.take_along_axis(x, idx, axis=-1).astype(F16)
    body = x.copy()
    np.put_along_axis(body, idx, 0.0, axis=-1)
    return body, values, idx.astype(np.uint8)


def _kept(codes: np.ndarray, gran: str) -> tuple[int, ...]:
    g, t, h, d = codes.shape
    return {"vector": (g, t, h, 1), "channel": (g, 1, h, d), "tensor": (g, 1, 1, 1)}[gran]


def _nonzero_scale(scale16: np.ndarray) -> np.ndarray:
    scale16[scale16 == 0] = 1
    return scale16


def quantize(x: np.ndarray, bits: int, gran: str, k: int) -> Quantized:
    axes = _AXES[gran]
    body, out_val, out_idx = split_outliers(x, k)
    with np.errstate(all="ignore"):  # non-finite input: the encoder's error check refuses it
        if bits == 8:
            absmax = np.abs(body).max(axis=axes, keepdims=True)
            scale16 = _nonzero_scale((absmax / F32(127)).astype(F16))
            q = np.rint(body / scale16.astype(F32))
            codes = np.clip(q, -127, 127).astype(np.int8)
            zero16 = None
        elif bits == 4:
            lo = body.min(axis=axes, keepdims=True)
            hi = body.max(axis=axes, keepdims=True)
            zero16 = lo.astype(F16)
            z = zero16.astype(F32)
            scale16 = _nonzero_scale(((hi - z) / F32(15)).astype(F16))
            q = np.rint((body - z) / scale16.astype(F32))
            codes = np.clip(q, 0, 15).astype(np.uint8)
        else:
            raise ValueError(f"bits must be 8 or 4, got {bits}")
    shape = scale_shape(gran, *x.shape)
    return Quantized(
        bits,
        gran,
        scale16.reshape(shape),
        None if zero16 is None else zero16.reshape(shape),
        out_val,
        out_idx,
        codes,
    )


def dequantize(q: Quantized) -> np.ndarray:
    """float32 [G, T, H, D]."""
    kept = _kept(q.codes, q.gran)
    y = q.codes.astype(F32) * q.scale.reshape(kept).astype(F32)
    if q.zero is not None:
        y += q.zero.reshape(kept).astype(F32)
    np.put_along_axis(y, q.out_idx.astype(np.intp), q.out_val.astype(F32), axis=-1)
    return y


def pack4(codes: np.ndarray) -> np.ndarray:
    """uint8 codes 0..15 [..., D] -> [..., ceil(D / 2)]: element 2i in the low nibble."""
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), np.uint8)], axis=-1)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack4(packed: np.ndarray, d: int) -> np.ndarray:
    out = np.empty((*packed.shape[:-1], 2 * packed.shape[-1]), np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out[..., :d]


def to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """An array of a page's elements (float16/float32, or bfloat16 as uint16 bits) as float32."""
    if dtype == "bfloat16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(F32)
    return raw.astype(F32)


def from_f32(y: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> the page's element type (bfloat16 as uint16 bits, rounded to nearest even)."""
    if dtype == "bfloat16":
        u = y.astype(F32).view(np.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    with np.errstate(over="ignore"):
        return y.astype(np.dtype(dtype))


def relative_error(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """||x - y|| / ||x|| of every tensor of a batch [G, ...] (0 where both are 0, inf where only
    x is; NaN stays NaN, and the encoder treats it as over any bound)."""
    g = x.shape[0]
    with np.errstate(all="ignore"):
        d = (x - y).reshape(g, -1).astype(np.float64)
        xs = x.reshape(g, -1).astype(np.float64)
        num = np.einsum("ij,ij->i", d, d)
        den = np.einsum("ij,ij->i", xs, xs)
        rel = np.sqrt(num / den)
    rel[(den == 0) & (num == 0)] = 0.0
    return rel
