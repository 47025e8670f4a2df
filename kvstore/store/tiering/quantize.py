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
Encoding and decoding cost milliseconds a page (kvstore/quant), so with a running loop they
run on this module's threads (the codec's loops release the GIL), never on the loop: a
demotion copies the page's bytes (one memcpy, as before) and frees its slot; the record is
placed below when it is made (`start`), and until then a lookup promotes the copy, exactly.
Without a loop (tools, tests of the store alone) they run inline. Loop-owned like `Tiers`;
the threads only encode bytes they were handed and decode into a RESERVED pool page.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvstore.quant import Encoded, PageShape, QuantError, QuantScheme, decode, encode
from kvstore.store.precision import SINK_TOKENS
from kvstore.tiers import CorruptPage, PageKey, PageMeta, PageRecord, make_meta

if TYPE_CHECKING:
    from kvstore.store.namespace import Namespace
    from kvstore.store.types import NamespaceSpec

log = logging.getLogger(__name__)
QUANT_THREADS = 2
Placed = Callable[["Namespace", PageKey, "PageRecord | None"], None]


class TierQuant:
    """Encodes and decodes the quantized namespaces' pages; counts what it did."""

    def __init__(self) -> None:
        self._schemes: dict[str, tuple[NamespaceSpec, PageShape, QuantScheme]] = {}
        self._pool: cf.ThreadPoolExecutor | None = None
        self._closed = False
        self._lock = threading.Lock()  # the counters, from the threads
        # Being encoded: key -> the page's original bytes (a lookup meanwhile promotes them).
        self.encoding: dict[PageKey, bytes] = {}
        self._done: dict[PageKey, asyncio.Future[Any]] = {}
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

    def executor(self) -> cf.ThreadPoolExecutor:
        if self._closed:
            raise RuntimeError("the quantizer's threads are shut down (the daemon is stopping)")
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(QUANT_THREADS, thread_name_prefix="kvstore-quant")
        return self._pool

    def _scheme(self, spec: NamespaceSpec) -> tuple[PageShape, QuantScheme]:
        known = self._schemes.get(spec.name)
        if known is None or known[0] is not spec:  # (a namespace deleted and made again)
            shape, scheme = spec.tier_codec()
            known = self._schemes[spec.name] = (spec, shape, scheme)
        return known[1], known[2]

    def _encode(self, shape: PageShape, scheme: QuantScheme, sinks: int, raw: Any) -> tuple[Encoded, float]:
        t0 = time.perf_counter()
        return encode(raw, shape, scheme, sink_tokens=sinks), time.perf_counter() - t0

    def _made(
        self, ns: Namespace, key: PageKey, parent_hash: bytes, got: tuple[Encoded, float]
    ) -> PageRecord:
        enc, seconds = got
        spec = ns.spec
        c = self.counters
        c["quantize_s"] += seconds
        c["quantized_pages"] += 1
        for p in enc.precisions:
            c["layers_" + p] += 1
        c["fallbacks"] += enc.fallbacks
        c["bytes_stored"] += len(enc.record)
        c["bytes_represented"] += spec.page_bytes
        meta = make_meta(
            ns.name,
            key.block_hash,
            parent_hash,
            spec.page_tokens,
            len(enc.record),
            ns.geometry,
            raw_bytes=spec.page_bytes,
        )
        return PageRecord.build(meta, enc.record)

    def _args(self, ns: Namespace, parent_hash: bytes) -> tuple[PageShape, QuantScheme, int]:
        shape, scheme = self._scheme(ns.spec)
        return shape, scheme, 0 if parent_hash else min(SINK_TOKENS, ns.spec.page_tokens)

    def record(self, ns: Namespace, block_hash: bytes, parent_hash: bytes, view: Any) -> PageRecord:
        """A quantized record of the pool page `view` (the original bytes), made here."""
        key = PageKey(ns.name, block_hash)
        return self._made(ns, key, parent_hash, self._encode(*self._args(ns, parent_hash), view))

    def start(self, ns: Namespace, key: PageKey, parent_hash: bytes, raw: bytes, placed: Placed) -> None:
        """Make the record of `raw` (a copy of the original page) on the threads, then call
        `placed(ns, key, record)` on the loop (record None if it failed); inline without a loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            placed(ns, key, self.record(ns, key.block_hash, parent_hash, raw))
            return
        try:
            fut = loop.run_in_executor(self.executor(), self._encode, *self._args(ns, parent_hash), raw)
        except RuntimeError:  # the daemon is stopping: its threads are shut down
            placed(ns, key, None)
            return
        self.encoding[key] = raw
        self._done[key] = fut

        def made(f: asyncio.Future[tuple[Encoded, float]]) -> None:
            if self._done.get(key) is f:
                del self._done[key]
                self.encoding.pop(key, None)
            if f.cancelled() or f.exception() is not None:
                log.error(
                    "quantizing page %s failed: %r; it is not cached",
                    key,
                    None if f.cancelled() else f.exception(),
                )
                placed(ns, key, None)
                return
            placed(ns, key, self._made(ns, key, parent_hash, f.result()))

        fut.add_done_callback(made)

    async def make(self, ns: Namespace, key: PageKey, parent_hash: bytes, raw: bytes) -> PageRecord:
        """The record of `raw` (a copy of the original page), made on the threads."""
        args = self._args(ns, parent_hash)
        got = await asyncio.get_running_loop().run_in_executor(self.executor(), self._encode, *args, raw)
        return self._made(ns, key, parent_hash, got)

    async def settled(self) -> None:
        """Every record being made now is made and placed (Admin.Flush waits for this)."""
        while self._done:
            await asyncio.wait(list(self._done.values()))
            await asyncio.sleep(0)  # (their callbacks run)

    def decode_into(self, ns: Namespace, key: PageKey, meta: PageMeta, payload: Any, out: memoryview) -> None:
        """Dequantize a verified record into the pool page `out` (any thread); CorruptPage
        (nothing written) if the codec refuses it (another geometry, a version it cannot read)."""
        if meta.raw_bytes != ns.spec.page_bytes:
            raise CorruptPage(
                key, f"a record of {meta.raw_bytes} bytes of page, the namespace's are {ns.spec.page_bytes}"
            )
        shape, _ = self._scheme(ns.spec)
        t0 = time.perf_counter()
        try:
            decode(payload, shape=shape, out=out)
        except QuantError as e:
            with self._lock:
                self.counters["dequantize_failures"] += 1
            raise CorruptPage(key, str(e)) from None
        with self._lock:
            self.counters["dequantize_s"] += time.perf_counter() - t0
            self.counters["dequantized_pages"] += 1

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return dict(self.counters)

    def close(self) -> None:
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
