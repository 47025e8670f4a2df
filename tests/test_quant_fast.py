"""kvstore/_quant.c (the codec's fused loops) writes the very bytes numeric.py (the numpy path,
itself equal to the torch reference) writes, reads them back to the very same pages, and
measures the same errors, on ugly shapes, all dtypes, schemes and fallbacks."""

from __future__ import annotations

import numpy as np
import pytest

from kvstore.quant import PageShape, QuantScheme, codec, decode, encode, native, numeric

pytestmark = pytest.mark.skipif(not native.available, reason="kvstore/_quant.c is not built (make native)")


def page(shape: PageShape, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape.dims).astype(np.float32) * rng.choice(
        [1e-4, 1.0, 300.0], size=(shape.num_layers, 1, 1, 1, 1)
    )
    x[:, 0, ..., 0] *= 9.0
    x[rng.random(shape.dims) < 0.03] = 0.0
    if shape.head_dim > 3:
        x[..., 2] = -x[..., 3]  # ties in |x|
    x[rng.random(shape.dims) < 0.001] = 4e4  # near fp16's end
    if shape.dtype == "bfloat16":
        return numeric.from_f32(x, "bfloat16").tobytes()
    return x.astype(shape.dtype).tobytes()


SCHEMES = [
    QuantScheme.preset("int8"),
    QuantScheme.preset("int4"),
    QuantScheme("int8", "tensor", "tensor", 0),
    QuantScheme("int4", "vector", "tensor", 3),
    QuantScheme("int8", "channel", "vector", 2),
    QuantScheme(("int4", "int8", "fp", "int4"), "channel", "vector", 1, bound=0.05),
    QuantScheme("int4", "channel", "vector", 2, bound=0.07),
]
SHAPES = [(4, 16, 2, 64), (4, 7, 3, 5), (4, 1, 1, 1), (4, 33, 1, 130), (4, 4, 2, 2)]


def both(buf: bytes, shape: PageShape, scheme: QuantScheme, sinks: int, monkeypatch: pytest.MonkeyPatch):
    fast = encode(buf, shape, scheme, sinks)
    with monkeypatch.context() as m:
        m.setattr(codec, "USE_NATIVE", False)
        slow = encode(buf, shape, scheme, sinks)
        slow_page = decode(slow.record)
    return fast, slow, slow_page


@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("si", range(len(SCHEMES)))
def test_native_equals_numpy(
    dims: tuple[int, ...], dtype: str, si: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    shape = PageShape(*dims, dtype)
    buf = page(shape, seed=si)
    sinks = min(2, dims[1] - 1) if si % 2 else 0
    fast, slow, slow_page = both(buf, shape, SCHEMES[si], sinks, monkeypatch)
    assert fast.precisions == slow.precisions
    assert fast.record == slow.record
    assert np.allclose(fast.layer_errors, slow.layer_errors, rtol=1e-9, atol=0)
    assert np.array_equal(decode(fast.record), slow_page)


def test_fallbacks_happen_on_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    shape = PageShape(4, 16, 2, 64, "float32")
    fast, slow, _ = both(page(shape, 1), shape, SCHEMES[-1], 1, monkeypatch)
    assert fast.fallbacks == slow.fallbacks > 0 and fast.record == slow.record


def test_non_finite_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    shape = PageShape(2, 16, 2, 64, "float32")
    x = np.frombuffer(page(shape, 3), np.float32).reshape(shape.dims).copy()
    x[0, 1, 5, 1, 3] = np.nan
    x[1, 0, 2, 0, 0] = -np.inf
    fast, slow, _ = both(x.tobytes(), shape, QuantScheme.preset("int8"), 0, monkeypatch)
    assert fast.precisions == slow.precisions == ("fp", "fp") and fast.record == slow.record


def test_quotients_on_half_integers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The C loop multiplies by 1 / scale and divides only the vectors where a quotient lies
    near a half-integer: here every quotient is exactly one (a tie, rounded to even), where
    the product by 1 / scale alone rounds some of them the other way."""
    s0 = np.float32(np.float16(0.0999755859375))  # a scale fp16 holds exactly: max / 127
    k = np.arange(-126, 126, dtype=np.float32) + np.float32(0.5)
    shape = PageShape(2, 16, 2, 64, "float32")
    rng = np.random.default_rng(7)
    x = (rng.choice(k, size=shape.dims) * s0).astype(np.float32)  # exact: 8 x 11 bits
    x[..., 0] = 127 * s0  # each vector's max: its scale is s0
    x[..., 1] = 1000 * s0  # the outlier, taken out first
    scheme = QuantScheme("int8", "vector", "vector", 1)
    fast, slow, _ = both(x.tobytes(), shape, scheme, 0, monkeypatch)
    assert fast.record == slow.record
    inv = np.float32(1) / s0
    assert (np.rint(x[..., 2:] * inv) != np.rint(x[..., 2:] / s0)).any()  # the product alone errs


def test_threads_encode_into_their_own_buffers() -> None:
    """The C encode writes each record in its thread's reused buffer (kvstore/quant/native.py):
    pages encoded at once on several threads come out as they do one at a time."""
    from concurrent.futures import ThreadPoolExecutor

    shape = PageShape(8, 64, 3, 64, "float32")
    pages = [page(shape, seed) for seed in range(8)]
    scheme = QuantScheme.preset("int8")
    alone = [encode(p, shape, scheme).record for p in pages]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            assert list(pool.map(lambda p: encode(p, shape, scheme).record, pages)) == alone
