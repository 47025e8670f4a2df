"""The Triton kernels (kernels/kvstore_kernels/triton_quant.py) against the torch reference on
ugly shapes: under TRITON_INTERPRET=1 on a CPU (bit for bit), natively on a GPU. Small grids:
the interpreter runs every program in Python."""

from __future__ import annotations

import numpy as np
import pytest
from triton_mode import native

ON_GPU = native()

import torch  # noqa: E402
from kvstore_kernels import reference, triton_quant  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
SHAPES = [(1, 1, 1, 1), (2, 7, 3, 5), (1, 16, 2, 64), (1, 3, 1, 130), (2, 5, 2, 2)]
CASES = [
    (8, "vector", 1),
    (8, "tensor", 0),
    (4, "channel", 2),
    (4, "vector", 0),
    (8, "channel", 3),
    (4, "tensor", 1),
]


def ugly(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32) * rng.choice(
        [1e-3, 1.0, 50.0], size=shape[:1] + (1,) * 3
    )
    x[..., 0] *= 6.0
    x[rng.random(shape) < 0.05] = 0.0
    if shape[-1] > 2:
        x[..., 1] = x[..., 2]  # tied magnitudes: the first index wins
    return torch.from_numpy(x.astype(np.float32))


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit for bit on the interpreter; on a GPU a code may differ by one where the division is
    a tie away from a rounding edge, and dequantized values by the FMA the compiler fuses."""
    a, b = a.cpu(), b.cpu()
    assert a.shape == b.shape and a.dtype == b.dtype
    if ON_GPU and a.is_floating_point():
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-6)
    elif ON_GPU:
        # (no outliers kept, k=0: empty, and max() of nothing is an error, not a pass)
        assert a.numel() == 0 or (a.int() - b.int()).abs().max() <= 1
    else:
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("bits", "gran", "k"), CASES)
def test_triton_equals_the_reference(shape: tuple[int, ...], bits: int, gran: str, k: int) -> None:
    x = ugly(shape, seed=bits + k)
    k = min(k, shape[-1])
    ref = reference.quantize(x, bits, gran, k)
    got = triton_quant.quantize(x.to(DEVICE), bits, gran, k)
    same(got.scale, ref.scale)
    if bits == 4:
        same(got.zero, ref.zero)
    same(got.out_idx, ref.out_idx)
    same(got.out_val, ref.out_val)
    same(got.codes, ref.codes if bits == 8 else reference.pack4(ref.codes))
    # dequantize the reference's own output, so a code differing on a GPU is not counted twice
    q = ref._replace(codes=ref.codes if bits == 8 else reference.pack4(ref.codes))
    q = reference.Quantized(*(None if v is None else v.to(DEVICE) for v in q))
    same(triton_quant.dequantize(q, gran, shape[-1]), reference.dequantize(ref, gran))
