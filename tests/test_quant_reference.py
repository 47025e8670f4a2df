"""The daemon's numpy quantizer (kvstore/quant/numeric.py) computes exactly what the torch
reference (kernels/kvstore_kernels/reference.py, the oracle) computes: same codes, scales, zeros
and outliers, bit for bit, on ugly shapes."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the reference needs torch (pip install -e '.[torch]')")

from kvstore_kernels import reference  # noqa: E402

from kvstore.quant import numeric  # noqa: E402

SHAPES = [(1, 1, 1, 1), (2, 7, 3, 5), (3, 16, 2, 64), (1, 33, 1, 130), (2, 5, 4, 2)]


def ugly(shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32) * rng.choice(
        [1e-3, 1.0, 50.0], size=shape[:1] + (1,) * 3
    )
    x[..., 0] *= 6.0
    x[rng.random(shape) < 0.05] = 0.0  # zeros and ties
    if shape[-1] > 2:
        x[..., 1] = x[..., 2]  # tied magnitudes: the first index wins
    return x.astype(np.float32)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("bits", "gran", "k"),
    [(8, "vector", 1), (8, "tensor", 0), (4, "channel", 2), (4, "vector", 0), (8, "channel", 3)],
)
def test_numpy_path_equals_the_reference(shape: tuple[int, ...], bits: int, gran: str, k: int) -> None:
    x = ugly(shape, seed=bits * 7 + k)
    k = min(k, shape[-1])
    n = numeric.quantize(x, bits, gran, k)
    r = reference.quantize(torch.from_numpy(x), bits, gran, k)
    assert np.array_equal(n.codes, r.codes.numpy())
    assert np.array_equal(n.scale, r.scale.numpy())
    assert (n.zero is None) == (r.zero is None)
    if n.zero is not None:
        assert np.array_equal(n.zero, r.zero.numpy())
    assert np.array_equal(n.out_idx, r.out_idx.numpy())
    assert np.array_equal(n.out_val, r.out_val.numpy())
    assert np.array_equal(numeric.dequantize(n), reference.dequantize(r, gran).numpy())
    if bits == 4:
        packed = numeric.pack4(n.codes)
        assert np.array_equal(packed, reference.pack4(r.codes).numpy())
        assert np.array_equal(numeric.unpack4(packed, shape[-1]), n.codes)
        assert np.array_equal(reference.unpack4(torch.from_numpy(packed), shape[-1]).numpy(), n.codes)
