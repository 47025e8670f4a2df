"""Quantized tiers: a namespace whose `tier_dtype`/`tier_schedule` ask for fewer bits stores
its pages below the pool as quantized page records (kvstore/quant, docs/quant.md), and a
promotion dequantizes them back into the pool (docs/tiers.md, "Quantized tiers").

The record is made once, when the page first goes below the pool, from the pool's own bytes
(the original): the codec measures each layer's reconstruction error there and stores a
layer over the namespace's `tier_error_bound` at the next higher precision, so what is stored
is within the bound or exact. A page that came up from a quantized record holds dequantized
bytes; it is never quantized again (the error would compound): while its record is below, a
demotion frees it as is, and once the record is gone it is simply not cached any more.

The first `precision.SINK_TOKENS` tokens of a sequence (its first page) are kept exact: attention sinks.
Encoding and decoding run where the copies ran before (numpy, on the loop for the host tier;
~ms a page): `stats()` has their time. Loop-owned like the rest of `Tiers`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from kvstore.quant import PageShape, QuantError, QuantScheme, decode, encode
from kvstore.store.precision import SINK_TOKENS
from kvstore.tiers import CorruptPage, PageKey, PageMeta, PageRecord, make_meta

if TYPE_CHECKING:
    from kvstore.store.namespace import Namespace
    from kvstore.store.types import NamespaceSpec


class TierQuant:
    """Encodes and decodes the quantized namespaces' pages; counts what it did."""

    def __init__(self) -> None:
        self._schemes: dict[str, tuple[NamespaceSpec, PageShape, QuantScheme]] = {}
        self.counters: dict[str, Any] = {
            "quantized_pages": 0,  # records made
            "layers_fp": 0,  # their layers, by the precision stored (after any fallback)
            "layers_int8": 0,
            "layers_int4": 0,
            "fallbacks": 0,  # layers stored more precisely than asked: over the error bound
            "bytes_stored": 0,  # of the records made
            "bytes_represented": 0,  # of the pool pages they stand for
            "quantize_s": 0.0,
            "dequantized_pages": 0,
            "dequantize_s": 0.0,
            "dequantize_failures": 0,  # records the codec refused (never served)
            "not_requantized": 0,  # dequantized pages whose record was gone: not quantized again
        }

    def _scheme(self, spec: NamespaceSpec) -> tuple[PageShape, QuantScheme]:
        known = self._schemes.get(spec.name)
        if known is None or known[0] is not spec:  # (a namespace deleted and made again)
            shape, scheme = spec.tier_codec()
            known = self._schemes[spec.name] = (spec, shape, scheme)
        return known[1], known[2]

    def record(self, ns: Namespace, block_hash: bytes, parent_hash: bytes, view: memoryview) -> PageRecord:
        """A quantized record of the pool page `view` (the original bytes)."""
        spec = ns.spec
        shape, scheme = self._scheme(spec)
        sinks = 0 if parent_hash else min(SINK_TOKENS, spec.page_tokens)
        t0 = time.perf_counter()
        enc = encode(view, shape, scheme, sink_tokens=sinks)
        c = self.counters
        c["quantize_s"] += time.perf_counter() - t0
        c["quantized_pages"] += 1
        for p in enc.precisions:
            c["layers_" + p] += 1
        c["fallbacks"] += enc.fallbacks
        c["bytes_stored"] += len(enc.record)
        c["bytes_represented"] += spec.page_bytes
        meta = make_meta(
            ns.name,
            block_hash,
            parent_hash,
            spec.page_tokens,
            len(enc.record),
            ns.geometry,
            raw_bytes=spec.page_bytes,
        )
        return PageRecord.build(meta, enc.record)

    def decode_into(
        self, ns: Namespace, key: PageKey, meta: PageMeta, payload: memoryview, out: memoryview
    ) -> None:
        """Dequantize a verified record into the pool page `out`; CorruptPage (nothing
        written) if the codec refuses it (another geometry, a version it cannot read)."""
        if meta.raw_bytes != ns.spec.page_bytes:
            raise CorruptPage(
                key, f"a record of {meta.raw_bytes} bytes of page, the namespace's are {ns.spec.page_bytes}"
            )
        shape, _ = self._scheme(ns.spec)
        t0 = time.perf_counter()
        try:
            decode(payload, shape=shape, out=out)
        except QuantError as e:
            self.counters["dequantize_failures"] += 1
            raise CorruptPage(key, str(e)) from None
        self.counters["dequantize_s"] += time.perf_counter() - t0
        self.counters["dequantized_pages"] += 1

    def stats(self) -> dict[str, Any]:
        return dict(self.counters)
