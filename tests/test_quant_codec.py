"""The quantized page record (kvstore/quant): round trips within the measured error, the error
bound enforced by construction (fallback to a higher precision), and corrupt records refused
before anything is written."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from kvstore.quant import (
    CorruptRecord,
    PageShape,
    QuantScheme,
    RecordMismatch,
    SchemeError,
    decode,
    decode_array,
    encode,
    encode_array,
    info,
    numeric,
    record,
)


def kv(shape: tuple[int, ...], seed: int = 0, dtype: str = "float32") -> np.ndarray:
    """Page-shaped KV with what real keys have: a few large channels and rare spikes."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    x[:, 0, ..., 1 % shape[-1]] *= 8.0  # a key channel much larger than the others
    spikes = rng.random(shape) < 0.002
    x[spikes] *= 30.0
    return x.astype(dtype)


def rel(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x.astype(np.float64), y.astype(np.float64)
    return float(np.linalg.norm(x - y) / np.linalg.norm(x))


SCHEMES = {
    "int8": QuantScheme.preset("int8"),
    "int4": QuantScheme.preset("int4"),
    "int8-tensor": QuantScheme("int8", "tensor", "tensor", 0),
    "int4-plain": QuantScheme("int4", "vector", "vector", 0),
    "int4-channel-3": QuantScheme("int4", "channel", "vector", 3),
}


@pytest.mark.parametrize("name", list(SCHEMES))
@pytest.mark.parametrize("dims", [(3, 2, 16, 2, 64), (2, 2, 7, 3, 5), (1, 2, 1, 1, 1), (4, 2, 33, 1, 130)])
def test_round_trip_matches_the_measured_error(name: str, dims: tuple[int, ...]) -> None:
    x = kv(dims, seed=len(name))
    enc = encode_array(x, SCHEMES[name])
    y = decode_array(enc.record)
    assert y.shape == x.shape and y.dtype == x.dtype
    # the encoder's measured per-layer error is the real one of what decode returns
    for layer in range(dims[0]):
        got = max(rel(x[layer, kv], y[layer, kv]) for kv in (0, 1))
        assert got == pytest.approx(enc.layer_errors[layer], rel=1e-4, abs=1e-7)
    assert enc.precisions == (SCHEMES[name].precision,) * dims[0]
    assert enc.fallbacks == 0 and enc.stored_bytes == len(enc.record)
    assert info(enc.record).precisions == enc.precisions


def test_protections_reduce_the_error() -> None:
    """Outliers, per-channel keys and vector scales each pay on KV with outlier channels."""
    x = kv((4, 2, 64, 3, 64))
    err = {name: encode_array(x, s).error for name, s in SCHEMES.items()}
    assert err["int8"] < 0.01 < err["int8-tensor"]
    assert err["int4"] < err["int4-plain"] and err["int4-channel-3"] < err["int4"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_pages(dtype: str) -> None:
    x32 = kv((2, 2, 16, 2, 64))
    # numpy has no bfloat16: its bits, as the pool holds them
    raw = numeric.from_f32(x32, "bfloat16") if dtype == "bfloat16" else x32.astype(np.float16)
    shape = PageShape(2, 16, 2, 64, dtype)
    enc = encode(raw.tobytes(), shape, QuantScheme.preset("int8"), sink_tokens=3)
    out = decode(enc.record, shape=shape).view(raw.dtype).reshape(raw.shape)
    xf, yf = numeric.to_f32(raw, dtype), numeric.to_f32(out, dtype)
    assert rel(xf, yf) < 0.01
    assert np.array_equal(out[:, :, :3], raw[:, :, :3])  # the sinks, bit for bit


def test_sinks_are_kept_exactly_and_counted() -> None:
    x = kv((2, 2, 16, 2, 64))
    enc = encode_array(x, QuantScheme.preset("int4"), sink_tokens=4)
    y = decode_array(enc.record)
    assert np.array_equal(y[:, :, :4], x[:, :, :4])
    assert info(enc.record).sink_tokens == 4
    plain = encode_array(x, QuantScheme.preset("int4"))
    assert len(enc.record) > len(plain.record)  # raw fp32 sinks are stored bytes too
    assert encode_array(x, QuantScheme.preset("int4"), sink_tokens=16).precisions == ("fp", "fp")


def test_a_page_over_the_bound_is_stored_more_precisely() -> None:
    x = kv((3, 2, 16, 2, 64))
    free = encode_array(x, QuantScheme.preset("int4"))
    assert free.precisions == ("int4",) * 3
    # a bound int4 cannot meet but int8 can: every layer falls back one step
    bound = free.error / 2
    enc = encode_array(x, QuantScheme.preset("int4", bound=bound))
    assert enc.precisions == ("int8",) * 3 and enc.fallbacks == 3 and enc.error <= bound
    assert rel(x, decode_array(enc.record)) <= bound
    # a bound nothing lossy meets: raw bytes, exact
    exact = encode_array(x, QuantScheme.preset("int4", bound=1e-9))
    assert exact.precisions == ("fp",) * 3 and exact.error == 0.0
    assert np.array_equal(decode_array(exact.record), x)
    # only the layer that needs it: spoil layer 1 with one huge spike in a flat vector
    y = x.copy()
    y[1, 1, 5, 0, :] = 0.01
    y[1, 1, 5, 0, 7] = 1e4
    y[1, 1, 5, 0, 9] = -1e4
    y[1, 1, 5, 0, 11] = 1e4
    enc = encode_array(y, QuantScheme("int4", "channel", "vector", 0, bound=0.2))
    assert enc.precisions[0] == enc.precisions[2] == "int4" and enc.precisions[1] != "int4"


def test_non_finite_values_are_never_quantized() -> None:
    x = kv((2, 2, 16, 2, 64))
    x[0, 1, 3, 1, 2] = np.nan
    x[1, 0, 0, 0, 0] = np.inf
    enc = encode_array(x, QuantScheme.preset("int8"))  # no bound given: still refused
    assert enc.precisions == ("fp", "fp")
    assert np.array_equal(decode_array(enc.record), x, equal_nan=True)


def test_layer_schedule() -> None:
    x = kv((6, 2, 16, 2, 64))
    scheme = QuantScheme.layer_schedule(
        6, early="int8", rest="int4", early_layers=2, keys="channel", outliers=2
    )
    enc = encode_array(x, scheme)
    assert enc.precisions == ("int8", "int8", "int4", "int4", "int4", "int4")
    assert enc.layer_errors[0] < enc.layer_errors[2]
    with pytest.raises(SchemeError, match="schedule has 6 layers"):
        encode_array(x[:5], scheme)


def test_compression_counts_every_byte() -> None:
    """The record's length is the header, the table and each section, nothing else (QUANT.md's
    arithmetic: 69 B per int8 vector + 1 outlier at head_dim 64)."""
    x = kv((30, 2, 64, 3, 64))
    enc = encode_array(x, QuantScheme.preset("int8"))
    vectors = 30 * 2 * 64 * 3
    assert len(enc.record) == 32 + 30 + vectors * (64 + 2 + 3)
    assert x.nbytes / len(enc.record) > 3.7


# ---------------------------------------------------------------- corruption


def good() -> tuple[np.ndarray, bytes]:
    x = kv((2, 2, 16, 2, 64))
    return x, encode_array(x, QuantScheme.preset("int4"), sink_tokens=1).record


def test_every_flipped_byte_is_refused_and_out_is_untouched() -> None:
    x, rec = good()
    shape = PageShape(2, 16, 2, 64, "float32")
    sentinel = np.full(shape.page_bytes, 0xAB, np.uint8)
    for pos in range(0, len(rec), 7):
        bad = bytearray(rec)
        bad[pos] ^= 0x10
        out = bytearray(sentinel.tobytes())
        with pytest.raises(CorruptRecord):
            decode(bad, shape=shape, out=out)
        assert out == sentinel.tobytes()
    assert np.array_equal(decode(rec, shape=shape).view(np.float32).reshape(x.shape)[:, :, :1], x[:, :, :1])


@pytest.mark.parametrize("cut", [0, 10, 31, 32, -1])
def test_truncated_or_extended_records_are_refused(cut: int) -> None:
    _, rec = good()
    with pytest.raises(CorruptRecord):
        decode(rec[:cut])
    with pytest.raises(CorruptRecord):
        decode(rec + b"\0")


def reseal(rec: bytes | bytearray) -> bytes:
    return record.seal(bytearray(rec))


def test_a_wrong_version_or_invalid_header_is_refused_even_with_a_valid_checksum() -> None:
    _, rec = good()
    for offset, value, reason in [
        (4, 2, "version 2"),
        (5, 200, "invalid header codes"),
        (6, 9, "invalid header codes"),
        (32, 7, "invalid precision table"),
        (8, 3, "its header describes"),  # outliers: the sections no longer add up
    ]:
        bad = bytearray(rec)
        bad[offset] = value
        with pytest.raises(CorruptRecord, match=reason):
            decode(reseal(bad))
    bad = bytearray(rec)
    bad[:4] = b"KVP1"
    with pytest.raises(CorruptRecord, match="bad magic"):
        decode(reseal(bad))


def test_an_outlier_index_past_head_dim_is_refused() -> None:
    _, rec = good()
    ri = info(rec)
    at = 32 + 2
    for sec in record.layer_sections(ri, "int4"):
        if sec.name == "out_idx":
            break
        at += sec.nbytes(4)
    bad = bytearray(rec)
    bad[at] = 200
    with pytest.raises(CorruptRecord, match="outlier index"):
        decode(reseal(bad))


def test_another_geometry_is_a_mismatch_not_a_decode() -> None:
    _, rec = good()
    with pytest.raises(RecordMismatch):
        decode(rec, shape=PageShape(2, 16, 2, 64, "float16"))
    with pytest.raises(RecordMismatch):
        decode(rec, out=bytearray(10))


def test_bad_arguments() -> None:
    shape = PageShape(2, 16, 2, 64, "float32")
    with pytest.raises(SchemeError, match="bytes"):
        encode(b"\0" * 10, shape, QuantScheme.preset("int8"))
    with pytest.raises(SchemeError, match="sink_tokens"):
        encode(b"\0" * shape.page_bytes, shape, QuantScheme.preset("int8"), sink_tokens=17)
    with pytest.raises(SchemeError, match="precision"):
        QuantScheme("int3")
    with pytest.raises(SchemeError, match="outliers"):
        QuantScheme("int8", outliers=9)
    assert (
        struct.unpack_from("<4s", encode(b"\0" * shape.page_bytes, shape, QuantScheme.preset("int8")).record)[
            0
        ]
        == b"KVQ1"
    )
