"""Triton kernels of the KV quantizer: the same arithmetic as `reference` (the oracle; see its
docstring), fused into one pass over each tile. On a GPU they run natively; on a CPU, under
TRITON_INTERPRET=1 (set before importing this module), which is how CI tests them against the
reference (tests/test_quant_triton.py).

`quantize(x[G, T, H, D] float32, bits, gran, k)` returns a `reference.Quantized` whose codes
are int8 `[G, T, H, D]`, or for int4 packed uint8 `[G, T, H, ceil(D / 2)]` (element 2i in the
low nibble: the record's body); `dequantize(q, gran, head_dim)` reads them back.
Divisions are IEEE (`div_rn`) and rounding is half to even (the 1.5 * 2^23 trick, exact for
|v| < 2^22), so on the interpreter the codes equal the reference's bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import Quantized, scale_shape

MODES = {"vector": 0, "channel": 1, "tensor": 2}


@triton.jit
def _rne(v):
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _scale16(m, qmax):
    s = tl.math.div_rn(m, qmax).to(tl.float16)
    return tl.where(s == 0, 1.0, s).to(tl.float16)


@triton.jit
def _store_codes(
    codes_ptr,
    q,
    vec,
    cols,
    valid,
    row_ok,
    D,
    BITS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    if BITS == 8:
        tl.store(codes_ptr + vec[:, None] * D + cols[None, :], q.to(tl.int8), mask=valid)
    else:
        dp = (D + 1) // 2
        q = tl.where(valid, q, 0.0).to(tl.uint8)
        even, odd = tl.split(tl.reshape(q, (BLOCK_R, BLOCK_D // 2, 2)))
        pcols = tl.arange(0, BLOCK_D // 2)
        tl.store(
            codes_ptr + vec[:, None] * dp + pcols[None, :],
            even | (odd << 4),
            mask=row_ok[:, None] & (pcols[None, :] < dp),
        )


@triton.jit
def _quant_kernel(
    x_ptr, codes_ptr, scale_ptr, zero_ptr, oval_ptr, oidx_ptr,
    N, TH, H, D, NROWS, ROW_STEP, NI,
    MODE: tl.constexpr, BITS: tl.constexpr, K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """MODE 0 (vector): a program quantizes BLOCK_R consecutive vectors, a scale per row.
    MODE 1 (channel) / 2 (tensor): a program is one scale group: group g, head h (channel) of
    NROWS vectors ROW_STEP apart; a scale per column (channel) or one (tensor)."""
    pid = tl.program_id(0)
    r = tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    if MODE == 0:
        vec = pid * BLOCK_R + r
        row_ok = vec < N
    else:
        g = pid // NI
        h = pid % NI
        vec = g * TH + r * ROW_STEP + h
        row_ok = r < NROWS
    valid = row_ok[:, None] & (cols[None, :] < D)
    x = tl.load(x_ptr + vec[:, None] * D + cols[None, :], mask=valid, other=0.0)
    # outliers: the K largest |x| of each row (the first index on a tie), kept aside and
    # zeroed in the body with the padding (tl.argmax inline: the interpreter cannot call it
    # from a helper)
    a = tl.where(valid, tl.abs(x), -2.0)
    picked = a < -3.0
    for j in tl.static_range(K):
        i = tl.argmax(a, axis=1, tie_break_left=True)
        hit = cols[None, :] == i[:, None]
        v = tl.sum(tl.where(hit, x, 0.0), axis=1)
        tl.store(oval_ptr + vec * K + j, v.to(tl.float16), mask=row_ok)
        tl.store(oidx_ptr + vec * K + j, i.to(tl.uint8), mask=row_ok)
        a = tl.where(hit, -1.0, a)
        picked = picked | hit
    body = tl.where(picked | (valid == 0), 0.0, x)
    if BITS == 8:
        m = tl.abs(body)
        if MODE == 0:
            s16 = _scale16(tl.max(m, axis=1), 127.0)
            tl.store(scale_ptr + vec, s16, mask=row_ok)
            s = s16.to(tl.float32)[:, None]
        elif MODE == 1:
            s16 = _scale16(tl.max(m, axis=0), 127.0)
            tl.store(scale_ptr + (g * H + h) * D + cols, s16, mask=cols < D)
            s = s16.to(tl.float32)[None, :]
        else:
            s16 = _scale16(tl.max(tl.max(m, axis=1), axis=0), 127.0)
            tl.store(scale_ptr + g, s16)
            s = s16.to(tl.float32)
        q = tl.minimum(tl.maximum(_rne(tl.math.div_rn(body, s)), -127.0), 127.0)
    else:
        lo_in = tl.where(valid, body, float("inf"))
        hi_in = tl.where(valid, body, -float("inf"))
        if MODE == 0:
            z16 = tl.where(row_ok, tl.min(lo_in, axis=1), 0.0).to(tl.float16)  # (padding rows: 0)
            s16 = _scale16(tl.where(row_ok, tl.max(hi_in, axis=1), 0.0) - z16.to(tl.float32), 15.0)
            tl.store(scale_ptr + vec, s16, mask=row_ok)
            tl.store(zero_ptr + vec, z16, mask=row_ok)
            s = s16.to(tl.float32)[:, None]
            z = z16.to(tl.float32)[:, None]
        elif MODE == 1:
            z16 = tl.where(cols < D, tl.min(lo_in, axis=0), 0.0).to(tl.float16)
            s16 = _scale16(tl.where(cols < D, tl.max(hi_in, axis=0), 0.0) - z16.to(tl.float32), 15.0)
            at = (g * H + h) * D + cols
            tl.store(scale_ptr + at, s16, mask=cols < D)
            tl.store(zero_ptr + at, z16, mask=cols < D)
            s = s16.to(tl.float32)[None, :]
            z = z16.to(tl.float32)[None, :]
        else:
            z16 = tl.min(tl.min(lo_in, axis=1), axis=0).to(tl.float16)
            s16 = _scale16(tl.max(tl.max(hi_in, axis=1), axis=0) - z16.to(tl.float32), 15.0)
            tl.store(scale_ptr + g, s16)
            tl.store(zero_ptr + g, z16)
            s = s16.to(tl.float32)
            z = z16.to(tl.float32)
        q = tl.minimum(tl.maximum(_rne(tl.math.div_rn(body - z, s)), 0.0), 15.0)
    _store_codes(codes_ptr, q, vec, cols, valid, row_ok, D, BITS, BLOCK_R, BLOCK_D)


@triton.jit
def _dequant_kernel(
    codes_ptr, scale_ptr, zero_ptr, oval_ptr, oidx_ptr, y_ptr,
    N, TH, H, D,
    MODE: tl.constexpr, BITS: tl.constexpr, K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    vec = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = vec < N
    valid = row_ok[:, None] & (cols[None, :] < D)
    if BITS == 8:
        q = tl.load(codes_ptr + vec[:, None] * D + cols[None, :], mask=valid, other=0).to(tl.float32)
    else:
        byte = tl.load(codes_ptr + vec[:, None] * ((D + 1) // 2) + cols[None, :] // 2, mask=valid, other=0)
        q = ((byte >> ((cols[None, :] % 2) * 4).to(tl.uint8)) & 0x0F).to(tl.float32)
    if MODE == 0:
        at = vec[:, None]
        at_ok = row_ok[:, None]
    elif MODE == 1:
        at = ((vec // TH) * H + vec % H)[:, None] * D + cols[None, :]
        at_ok = valid
    else:
        at = (vec // TH)[:, None]
        at_ok = row_ok[:, None]
    y = q * tl.load(scale_ptr + at, mask=at_ok, other=1.0).to(tl.float32)
    if BITS == 4:
        y = y + tl.load(zero_ptr + at, mask=at_ok, other=0.0).to(tl.float32)
    for j in tl.static_range(K):
        i = tl.load(oidx_ptr + vec * K + j, mask=row_ok, other=0).to(tl.int32)
        v = tl.load(oval_ptr + vec * K + j, mask=row_ok, other=0.0).to(tl.float32)
        y = tl.where(cols[None, :] == i[:, None], v[:, None], y)
    tl.store(y_ptr + vec[:, None] * D + cols[None, :], y, mask=valid)


def _blocks(d: int, rows: int = 16) -> tuple[int, int]:
    return rows, max(2, triton.next_power_of_2(d))


def quantize(x: torch.Tensor, bits: int, gran: str, k: int) -> Quantized:
    """Quantize x[G, T, H, D] (float32; any device Triton runs on) like reference.quantize."""
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    x = x.contiguous().float()
    g, t, h, d = x.shape
    n = g * t * h
    dev = x.device
    sshape = scale_shape(gran, g, t, h, d)
    scale = torch.empty(sshape, dtype=torch.float16, device=dev)
    zero = torch.empty(sshape, dtype=torch.float16, device=dev) if bits == 4 else None
    out_val = torch.empty((g, t, h, k), dtype=torch.float16, device=dev)
    out_idx = torch.empty((g, t, h, k), dtype=torch.uint8, device=dev)
    width = d if bits == 8 else (d + 1) // 2
    codes = torch.empty((g, t, h, width), dtype=torch.int8 if bits == 8 else torch.uint8, device=dev)
    mode = MODES[gran]
    block_r, block_d = _blocks(d)
    if mode == 0:
        grid, nrows, step, ni = (triton.cdiv(n, block_r),), 0, 0, 1
    elif mode == 1:  # one program per (group, head): the page's tokens of one head
        grid, nrows, step, ni = (g * h,), t, h, h
        block_r = max(2, triton.next_power_of_2(t))
    else:  # one program per group
        grid, nrows, step, ni = (g,), t * h, 1, 1
        block_r = max(2, triton.next_power_of_2(t * h))
    _quant_kernel[grid](
        x, codes, scale, zero if zero is not None else scale, out_val, out_idx,
        n, t * h, h, d, nrows, step, ni,
        MODE=mode, BITS=bits, K=k, BLOCK_R=block_r, BLOCK_D=block_d,
    )  # fmt: skip
    return Quantized(scale, zero, out_val, out_idx, codes)


def dequantize(q: Quantized, gran: str, head_dim: int) -> torch.Tensor:
    """float32 [G, T, H, head_dim] from `quantize`'s output (int4 codes packed)."""
    g, t, h, _ = q.codes.shape
    bits = 8 if q.codes.dtype == torch.int8 else 4
    k = q.out_idx.shape[-1]
    n = g * t * h
    y = torch.empty((g, t, h, head_dim), dtype=torch.float32, device=q.codes.device)
    block_r, block_d = _blocks(head_dim)
    _dequant_kernel[(triton.cdiv(n, block_r),)](
        q.codes, q.scale, q.zero if q.zero is not None else q.scale, q.out_val, q.out_idx, y,
        n, t * h, h, head_dim,
        MODE=MODES[gran], BITS=bits, K=k, BLOCK_R=block_r, BLOCK_D=block_d,
    )  # fmt: skip
    return y
