"""The torch reference of the KV quantizer: the oracle the Triton kernels (and the daemon's numpy
path, kvstore/quant/numeric.py) are tested against. Written to be read, not to be fast.

A batch is `x[G, T, H, D]` float32: G tensors (a layer's keys or values, of one or many pages)
of T tokens x H heads x D dims. Per vector (one token x one head, D values):

1. outliers: the k largest |x| (the first index wins a tie) are kept as fp16 values + uint8
   indices, and zeroed in the body (dense-and-sparse);
2. scales from the body, one per `gran`: "vector" (over D: token x head, g = 1), "channel"
   (over T: one per head x dim, the keys' choice) or "tensor" (one per G);
3. int8, symmetric:  scale = fp16(max|body| / 127); q = clip(round(body / scale), -127, 127)
   int4, asymmetric: zero = fp16(min body); scale = fp16((max body - zero) / 15);
                     q = clip(round((body - zero) / scale), 0, 15)
   (a scale that rounds to 0 is stored as 1; round is half to even);
4. dequantize: q * scale (+ zero), then the outliers go back in their slots.

Sinks (the first tokens of a sequence) are not quantized at all: the caller leaves them out
of the batch and keeps them as they are (kvstore/quant/codec.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# The dims of x[G, T, H, D] one scale covers, and the shape its scales are kept in.
REDUCE_DIMS = {"vector": (3,), "channel": (1,), "tensor": (1, 2, 3)}


def scale_shape(gran: str, g: int, t: int, h: int, d: int) -> tuple[int, ...]:
    return {"vector": (g, t, h), "channel": (g, h, d), "tensor": (g,)}[gran]


def kept_shape(gran: str, g: int, t: int, h: int, d: int) -> tuple[int, ...]:
    """A scale's shape broadcast against x[G, T, H, D]."""
    return {"vector": (g, t, h, 1), "channel": (g, 1, h, d), "tensor": (g, 1, 1, 1)}[gran]


class Quantized(NamedTuple):
    scale: torch.Tensor  # fp16, scale_shape()
    zero: torch.Tensor | None  # fp16 (int4), same shape
    out_val: torch.Tensor  # fp16 [G, T, H, k]
    out_idx: torch.Tensor  # uint8 [G, T, H, k]
    codes: torch.Tensor  # int8, or uint8 0..15 for int4 (unpacked) [G, T, H, D]


def split_outliers(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(body, outlier values fp16, outlier indices uint8) of every vector of x."""
    a = x.abs()
    picks = []
    for _ in range(k):
        i = a.argmax(dim=-1, keepdim=True)  # the first maximum
        picks.append(i)
        a = a.scatter(-1, i, -1.0)
    idx = torch.cat(picks, dim=-1) if picks else torch.zeros((*x.shape[:-1], 0), dtype=torch.long)
    values = x.gather(-1, idx).to(torch.float16)
    body = x.scatter(-1, idx, 0.0)
    return body, values, idx.to(torch.uint8)


def _nonzero(scale16: torch.Tensor) -> torch.Tensor:
    return torch.where(scale16 == 0, torch.ones_like(scale16), scale16)


def quantize(x: torch.Tensor, bits: int, gran: str, k: int) -> Quantized:
    dims = REDUCE_DIMS[gran]
    body, out_val, out_idx = split_outliers(x.float(), k)
    if bits == 8:
        absmax = body.abs().amax(dim=dims, keepdim=True)
        scale16 = _nonzero((absmax / 127).to(torch.float16))
        codes = torch.clamp(torch.round(body / scale16.float()), -127, 127).to(torch.int8)
        zero16 = None
    elif bits == 4:
        lo = body.amin(dim=dims, keepdim=True)
        hi = body.amax(dim=dims, keepdim=True)
        zero16 = lo.to(torch.float16)
        scale16 = _nonzero(((hi - zero16.float()) / 15).to(torch.float16))
        codes = torch.clamp(torch.round((body - zero16.float()) / scale16.float()), 0, 15).to(torch.uint8)
    else:
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    shape = scale_shape(gran, *x.shape)
    return Quantized(
        scale16.reshape(shape), None if zero16 is None else zero16.reshape(shape), out_val, out_idx, codes
    )


def dequantize(q: Quantized, gran: str) -> torch.Tensor:
    """float32 [G, T, H, D]."""
    kept = kept_shape(gran, *q.codes.shape)
    y = q.codes.float() * q.scale.reshape(kept).float()
    if q.zero is not None:
        y = y + q.zero.reshape(kept).float()
    return y.scatter(-1, q.out_idx.long(), q.out_val.float())


def pack4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [..., D] -> [..., ceil(D / 2)]: element 2i in the low nibble."""
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack4(packed: torch.Tensor, d: int) -> torch.Tensor:
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)[..., :d]
