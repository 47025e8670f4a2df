"""Quantized tiers in this process: a real Store over a real HostTier and a real LMDB DiskTier,
namespaces stored below the pool as int8/int4 records (docs/tiers.md, "Quantized tiers").

What is checked: pages come back within the error bound and the host tier holds fewer bytes
than it represents; a page over the bound is stored at the next higher precision (and comes
back as exactly as that precision gives); the layer schedule; a record corrupted in the real
LMDB file, or one the codec refuses, is a miss (counted, logged), never served; a page
dequantized from a record is never quantized again; fp namespaces stay byte-exact."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvstore.errors import InvalidArgument
from kvstore.quant import info
from kvstore.store.store import Store
from kvstore.store.tiering.flush import flush_to_disk
from kvstore.store.tiering.tiers import Tiers
from kvstore.store.types import NamespaceSpec, StoreLimits
from kvstore.tiers import DiskTier, HostTier, PageKey, PageRecord, make_meta

SPEC = NamespaceSpec(
    "q",
    num_layers=4,
    num_kv_heads=2,
    head_dim=64,
    dtype="float16",
    page_tokens=16,
    num_pages=16,
    tier_dtype="int8",
)
T = SPEC.page_tokens


def page_array(seed: int, spec: NamespaceSpec = SPEC) -> np.ndarray:
    """A page of KV-like values: gaussian, with a few large channels (as keys have)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(spec.page_shape).astype(np.float32)
    x[:, 0, :, :, 3] *= 8  # an outlier channel in the keys
    return x.astype(spec.dtype)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    g, w = got.astype(np.float64), want.astype(np.float64)
    return float(np.linalg.norm(g - w) / np.linalg.norm(w))


class Bench:
    """A store with tiers and one namespace; writes prompts of `pages` pages and reads them."""

    def __init__(
        self, tmp: Path, spec: NamespaceSpec, host_bytes: int = 1 << 20, disk: bool = False, **tiers: Any
    ) -> None:
        self.disk = DiskTier.open(tmp / "disk", 16 << 20) if disk else None
        self.tiers = Tiers(HostTier(host_bytes) if host_bytes else None, self.disk, **tiers)
        self.store = Store(StoreLimits(), f"kvq-{uuid.uuid4().hex[:8]}-", tiers=self.tiers)
        self.spec = spec
        self.store.create_namespace(spec)
        self.ns = self.store.namespace(spec.name)
        self.sid = self.store.open_session("test", 60).session_id

    def write(self, tokens: list[int], pages: list[np.ndarray]) -> None:
        store, ns = self.store, self.ns
        seq, _ = store.allocate(self.sid, ns.name, 0, b"")
        for ref in store.append(self.sid, seq, tokens).pages:
            ns.page_view(ref.slot)[:] = pages[ref.index].tobytes()
        store.commit(self.sid, seq, len(tokens))
        store.release_sequence(self.sid, seq)

    async def evict(self) -> None:
        """Evict everything and wait for the records (made on the quantizer's threads) to be placed."""
        self.store.evict_all(self.ns.name)
        await self.tiers.quant.settled()

    async def read(self, tokens: list[int]) -> list[np.ndarray]:
        r = self.store.lookup(self.sid, self.ns.name, tokens, b"", True)
        waiting = [p.wait() for p in r.promotions if p.ok is None]
        if waiting:
            await asyncio.gather(*waiting)
        if r.promotions:
            r = self.store.settle_lookup(r)
        dt = np.dtype(self.spec.dtype)
        out = [np.frombuffer(bytes(self.ns.page_view(s)), dt).reshape(self.spec.page_shape) for s in r.slots]
        if r.pin_id:
            self.store.release_pin(self.sid, r.pin_id)
        return out

    def close(self) -> None:
        self.store.close()


def prompt_pages(n: int, seed: int, spec: NamespaceSpec = SPEC) -> tuple[list[int], list[np.ndarray]]:
    tokens = list(range(1000 * seed, 1000 * seed + n * spec.page_tokens))
    return tokens, [page_array(seed * 100 + i, spec) for i in range(n)]


def host_records(tiers: Tiers) -> list[tuple[PageKey, bytes]]:
    assert tiers.host is not None
    return [(k, tiers.host.get(k)) for k in tiers.host.keys()]  # type: ignore[misc]  # noqa: SIM118


def test_int8_pages_come_back_within_the_bound_from_host_in_fewer_bytes(tmp_path: Path) -> None:
    async def run() -> None:
        b = Bench(tmp_path, dataclasses.replace(SPEC, tier_error_bound=0.02))
        try:
            tokens, pages = prompt_pages(4, seed=1)
            b.write(tokens, pages)
            await b.evict()
            host = b.tiers.host.stats()  # type: ignore[union-attr]
            assert host["pages"] == 4 and host["bytes_represented"] == 4 * SPEC.page_bytes
            ratio = host["bytes_represented"] / host["bytes_used"]
            assert ratio > 1.5, host  # int8 + 1 outlier of fp16 pages: ~1.5-1.9x
            for _, rec in host_records(b.tiers):
                assert info(rec).precisions == ("int8",) * 4
            got = await b.read(tokens)
            assert len(got) == 4
            errors = [rel_err(g, w) for g, w in zip(got, pages, strict=True)]
            assert max(errors) <= 0.02 and min(errors) > 0, errors  # lossy, within the bound
            q = b.tiers.stats()["quant"]
            assert q["quantized_pages"] == 4 and q["layers_int8"] == 16 and q["fallbacks"] == 0
            assert q["dequantized_pages"] == 4 and q["dequantize_failures"] == 0
            assert q["bytes_represented"] == 4 * SPEC.page_bytes and q["bytes_stored"] == host["bytes_used"]
            # Evicted again: its record is still in the host tier, nothing is quantized twice.
            await b.evict()
            assert b.tiers.stats()["quant"]["quantized_pages"] == 4
            again = await b.read(tokens)
            assert all(np.array_equal(g, h) for g, h in zip(again, got, strict=True))
        finally:
            b.close()

    asyncio.run(run())


@pytest.mark.parametrize("below", ["host", "disk"])
def test_records_are_made_off_the_loop_and_a_lookup_meanwhile_gets_the_original(
    tmp_path: Path, below: str
) -> None:
    """A demotion copies the page and frees its slot; the codec runs on the quantizer's
    threads (not one record is made before the loop runs again). A lookup before the records
    are placed promotes the copies: the original bytes, exactly (with a disk tier alone too)."""

    async def run() -> None:
        b = Bench(tmp_path, SPEC, host_bytes=(1 << 20) if below == "host" else 0, disk=below == "disk")
        try:
            tokens, pages = prompt_pages(3, seed=9)
            b.write(tokens, pages)
            b.store.evict_all("q")
            assert len(b.ns.index) == 0 and len(b.tiers.quant.encoding) == 3
            assert b.tiers.stats()["quant"]["quantized_pages"] == 0  # nothing encoded on the loop
            got = await b.read(tokens)  # (no await before the lookup: still being made)
            assert [g.tobytes() for g in got] == [p.tobytes() for p in pages]
            await b.tiers.quant.settled()
            tier: Any = b.tiers.host if below == "host" else b.disk
            if b.disk is not None:
                await flush_to_disk(b.tiers, [b.ns])
            assert b.tiers.stats()["quant"]["quantized_pages"] == 3 and len(tier) == 3
            await b.evict()  # the exact pages: their records are below already
            assert b.tiers.stats()["quant"]["quantized_pages"] == 3
            got = await b.read(tokens)  # now dequantized, on the threads too
            assert all(0 < rel_err(g, w) < 0.02 for g, w in zip(got, pages, strict=True))
        finally:
            b.close()

    asyncio.run(run())


def test_write_through_writes_quantized_records_made_off_the_loop(tmp_path: Path) -> None:
    async def run() -> None:
        b = Bench(tmp_path, SPEC, host_bytes=0, disk=True, write_through=True)
        try:
            tokens, pages = prompt_pages(3, seed=10)
            b.write(tokens, pages)  # sealed: each page queued for a record, on the threads
            assert b.tiers.stats()["quant"]["quantized_pages"] == 0 and len(b.tiers.quant.encoding) == 3
            await flush_to_disk(b.tiers, [b.ns])  # waits for them, then fsyncs
            assert b.disk is not None and len(b.disk) == 3 and b.tiers.counters["written_through"] == 3
            for h in b.store.lookup(b.sid, "q", tokens, b"", False).block_hashes:
                assert info(b.disk.get(PageKey("q", h))).precisions == ("int8",) * 4  # type: ignore[arg-type]
            await b.evict()  # on disk already, no host tier: freed, nothing quantized again
            assert b.tiers.stats()["quant"]["quantized_pages"] == 3
            got = await b.read(tokens)
            assert len(got) == 3 and all(0 < rel_err(g, w) < 0.02 for g, w in zip(got, pages, strict=True))
        finally:
            b.close()

    asyncio.run(run())


def test_flush_writes_the_pools_pages_as_quantized_records(tmp_path: Path) -> None:
    async def run() -> None:
        b = Bench(tmp_path, SPEC, host_bytes=0, disk=True)
        try:
            tokens, pages = prompt_pages(3, seed=11)
            b.write(tokens, pages)
            assert await flush_to_disk(b.tiers, [b.ns]) == 3  # records made on the threads
            assert b.disk is not None and len(b.disk) == 3 and len(b.ns.index) == 3
            assert b.tiers.stats()["quant"]["quantized_pages"] == 3
            assert b.disk.stats()["bytes_represented"] == 3 * SPEC.page_bytes
            await b.evict()  # on disk already: freed as is
            got = await b.read(tokens)
            assert len(got) == 3 and all(0 < rel_err(g, w) < 0.02 for g, w in zip(got, pages, strict=True))
            assert b.tiers.stats()["quant"]["quantized_pages"] == 3
        finally:
            b.close()

    asyncio.run(run())


def test_a_layer_over_the_error_bound_is_stored_at_the_next_higher_precision(tmp_path: Path) -> None:
    """int4 asked with a bound int4 cannot meet on gaussian layers (~7% error) but meets on a
    layer of values near +-1 (~2%): the gaussian layers are stored int8 (fallbacks), the other int4."""
    spec = dataclasses.replace(SPEC, tier_dtype="int4", tier_error_bound=0.03)

    def page(seed: int) -> np.ndarray:
        x = page_array(seed, spec).astype(np.float32)
        rng = np.random.default_rng(seed)
        x[3] = np.sign(rng.standard_normal(x[3].shape)) * (1 + 0.01 * rng.standard_normal(x[3].shape))
        return x.astype(np.float16)

    async def run() -> None:
        b = Bench(tmp_path, spec)
        try:
            tokens = list(range(5000, 5000 + 2 * T))
            pages = [page(50), page(51)]
            b.write(tokens, pages)
            await b.evict()
            for _, rec in host_records(b.tiers):
                assert info(rec).precisions == ("int8", "int8", "int8", "int4")
            q = b.tiers.stats()["quant"]
            assert q["fallbacks"] == 6 and q["layers_int8"] == 6 and q["layers_int4"] == 2
            got = await b.read(tokens)
            for g, w in zip(got, pages, strict=True):
                errors = [rel_err(g[layer], w[layer]) for layer in range(4)]
                assert max(errors) <= 0.03, errors
                assert errors[3] > 3 * max(errors[:3]), errors  # int4 there, int8 elsewhere
        finally:
            b.close()

    asyncio.run(run())


def test_a_bound_only_fp_meets_stores_the_page_exactly(tmp_path: Path) -> None:
    spec = dataclasses.replace(SPEC, tier_dtype="int4", tier_error_bound=1e-9)

    async def run() -> None:
        b = Bench(tmp_path, spec)
        try:
            tokens, pages = prompt_pages(2, seed=3, spec=spec)
            b.write(tokens, pages)
            await b.evict()
            q = b.tiers.stats()["quant"]
            assert q["layers_fp"] == 8 and q["fallbacks"] == 8 and q["layers_int4"] == 0
            got = await b.read(tokens)
            assert [g.tobytes() for g in got] == [p.tobytes() for p in pages]
        finally:
            b.close()

    asyncio.run(run())


def test_the_layer_schedule_gives_early_layers_more_bits(tmp_path: Path) -> None:
    spec = dataclasses.replace(SPEC, tier_dtype="int4", tier_schedule="fp:1,int8:1")

    async def run() -> None:
        b = Bench(tmp_path, spec)
        try:
            tokens, pages = prompt_pages(2, seed=4, spec=spec)
            b.write(tokens, pages)
            await b.evict()
            for _, rec in host_records(b.tiers):
                assert info(rec).precisions == ("fp", "int8", "int4", "int4")
            got = await b.read(tokens)
            for g, w in zip(got, pages, strict=True):
                assert np.array_equal(g[0], w[0])  # fp: exact
                assert rel_err(g[1], w[1]) < rel_err(g[2], w[2])
        finally:
            b.close()

    asyncio.run(run())


def _flip_in_file(path: Path, needle: bytes) -> int:
    """Flip 8 bytes at every copy of `needle` in the file (LMDB's copy-on-write may leave
    older copies); returns how many copies."""
    raw = bytearray(path.read_bytes())
    at, copies = 0, 0
    while (at := raw.find(needle, at)) >= 0:
        raw[at : at + 8] = bytes(x ^ 0xFF for x in raw[at : at + 8])
        copies += 1
    path.write_bytes(bytes(raw))
    return copies


def test_a_quantized_record_corrupted_in_the_lmdb_file_is_a_miss_never_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def run() -> None:
        b = Bench(tmp_path, SPEC, host_bytes=0, disk=True)
        try:
            tokens, pages = prompt_pages(4, seed=5)
            b.write(tokens, pages)
            keys = [PageKey("q", h) for h in b.store.lookup(b.sid, "q", tokens, b"", False).block_hashes]
            await b.evict()
            await flush_to_disk(b.tiers, [b.ns])
            assert b.disk is not None
            record2 = b.disk.get(keys[2])
            assert record2 is not None and info(record2).precisions == ("int8",) * 4
            assert _flip_in_file(tmp_path / "disk" / "data.mdb", record2[200:264]) >= 1
            with caplog.at_level(logging.WARNING):
                got = await b.read(tokens)
            assert len(got) == 2  # the hit ends at the corrupt page
            assert all(rel_err(g, w) < 0.02 for g, w in zip(got, pages[:2], strict=True))
            assert b.disk.stats()["corrupt"] == 1
            assert b.tiers.counters["promotion_failures"] >= 1
            assert "corrupt" in caplog.text
            assert len(await b.read(tokens)) == 2  # gone for good: a miss again
        finally:
            b.close()

    asyncio.run(run())


@pytest.mark.parametrize("below", ["host", "disk"])
def test_a_record_the_codec_refuses_is_dropped_and_missed(tmp_path: Path, below: str) -> None:
    """A record whose tier checksum holds but whose own does not (written wrong): the codec
    refuses it, the tier drops it (counted corrupt), the lookup misses; nothing is served."""

    async def run() -> None:
        b = Bench(tmp_path, SPEC, host_bytes=(1 << 20) if below == "host" else 0, disk=below == "disk")
        try:
            tokens, pages = prompt_pages(2, seed=6)
            b.write(tokens, pages)
            hashes = b.store.lookup(b.sid, "q", tokens, b"", False).block_hashes
            await b.evict()
            if b.disk is not None:
                await flush_to_disk(b.tiers, [b.ns])
            tier: Any = b.tiers.host if below == "host" else b.disk
            good = tier.get(PageKey("q", hashes[1]))
            bad = bytearray(good)
            bad[len(bad) // 2] ^= 0x40  # inside the record: its own checksum fails
            meta = make_meta("q", hashes[1], hashes[0], T, len(bad), b.ns.geometry, raw_bytes=SPEC.page_bytes)
            if below == "host":
                tier.remove(meta.key)
                tier.put(PageRecord.build(meta, bytes(bad)))
            else:
                await tier.put_many([PageRecord.build(meta, bytes(bad))])
            got = await b.read(tokens)
            assert len(got) == 1
            assert tier.stats()["corrupt"] == 1 and PageKey("q", hashes[1]) not in tier
            assert b.tiers.stats()["quant"]["dequantize_failures"] == 1
        finally:
            b.close()

    asyncio.run(run())


def test_a_dequantized_page_whose_record_is_gone_is_not_quantized_again(tmp_path: Path) -> None:
    async def run() -> None:
        b = Bench(tmp_path, SPEC)
        try:
            tokens, pages = prompt_pages(2, seed=7)
            b.write(tokens, pages)
            await b.evict()
            await b.read(tokens)  # promoted: dequantized bytes in the pool
            b.tiers.host.clear()  # type: ignore[union-attr] (the records are gone)
            await b.evict()
            q = b.tiers.stats()["quant"]
            assert q["not_requantized"] == 2 and q["quantized_pages"] == 2
            assert len(b.tiers.host) == 0  # type: ignore[arg-type]
            assert await b.read(tokens) == []
        finally:
            b.close()

    asyncio.run(run())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tier_dtype": "int3"}, "tier_dtype='int3' must be one of fp, int8, int4"),
        ({"tier_schedule": "int8:9"}, "names 9 layers; the namespace has 4"),
        ({"tier_schedule": "int8"}, "must be <dtype>:<layers>"),
        ({"tier_error_bound": -0.1}, "tier_error_bound=-0.1 must be in [0, 1)"),
        ({"tier_error_bound": float("nan")}, "tier_error_bound=nan"),
        ({"dtype": "int8"}, "only float16, bfloat16, float32 can be quantized"),
        ({"head_dim": 512}, "the quantized tier cannot store these pages"),
    ],
)
def test_bad_tier_precision_is_refused_naming_the_field(fields: dict[str, Any], message: str) -> None:
    store = Store(StoreLimits(), f"kvq-{uuid.uuid4().hex[:8]}-")
    try:
        with pytest.raises(InvalidArgument) as e:
            store.create_namespace(dataclasses.replace(SPEC, **fields))
        assert message in str(e.value)
        store.create_namespace(SPEC)  # and a good one is taken
    finally:
        store.close()


def test_a_demotion_while_the_quantizer_is_shut_down_drops_the_page(tmp_path: Path) -> None:
    """The daemon stopping (the quantizer's threads shut down): an eviction frees its pages and
    they are simply not cached; nothing raises, nothing is left being made."""

    async def run() -> None:
        b = Bench(tmp_path, SPEC)
        try:
            tokens, pages = prompt_pages(2, seed=12)
            b.write(tokens, pages)
            b.tiers.quant.close()
            assert b.store.evict_all("q").pages_evicted == 2
            assert len(b.tiers.quant.encoding) == 0 and len(b.tiers.host) == 0  # type: ignore[arg-type]
            assert await b.read(tokens) == []
        finally:
            b.close()

    asyncio.run(run())
