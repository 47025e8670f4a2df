"""Promotion of a quantized namespace's pages (promote.py calls these; docs/tiers.md,
"Quantized tiers"): a record is read whole, verified, and dequantized into the RESERVED pool
page, on the quantizer's threads when a loop runs (milliseconds a page: never on the loop);
a page whose record is still being made is promoted from the copy of its original bytes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvstore.store.tiering.promotion import NotNow, Promotion, Read
from kvstore.tiers import CorruptPage, PageKey, PageMeta, PageRecord, make_meta

if TYPE_CHECKING:
    from kvstore.store.namespace import Namespace
    from kvstore.store.tiering.tiers import Tiers

log = logging.getLogger(__name__)


def unpack(
    tiers: Tiers,
    ns: Namespace,
    key: PageKey,
    stored: tuple[PageMeta, int, memoryview],
    view: memoryview,
    refuse: Callable[[PageKey], None] | None,
) -> tuple[PageMeta, int] | None:
    """A verified stored payload into the pool page `view`: dequantized if it is a quantized
    record, copied if it is the page's bytes; None if it is another geometry's. A record the
    codec refuses is `refuse`d (dropped, counted corrupt; by the caller when None) and raises
    CorruptPage: nothing of it is served."""
    meta, crc, payload = stored
    if meta.geometry != ns.geometry or not tiers.readable(ns, meta):
        return None
    if not meta.raw_bytes:
        view[:] = payload
        return meta, crc
    try:
        tiers.quant.decode_into(ns, key, meta, payload, view)
    except CorruptPage:
        if refuse is not None:
            refuse(key)
        raise
    return meta, crc


def from_original(tiers: Tiers, ns: Namespace, key: PageKey, view: memoryview) -> Read | None:
    """A page whose record is being made: its original bytes, exactly (None if it is not)."""
    raw = tiers.quant.encoding.get(key)
    if raw is None:
        return None
    view[:] = raw
    rec = PageRecord.build(
        make_meta(ns.name, key.block_hash, b"", ns.spec.page_tokens, len(raw), ns.geometry), raw
    )
    return rec.meta, rec.checksum


def read_host(tiers: Tiers, ns: Namespace, key: PageKey, view: memoryview) -> Read:
    """Here and now (no loop, or the original bytes): the page into `view`."""
    got = from_original(tiers, ns, key, view)
    if got is not None:
        return got
    host = tiers.host
    try:
        stored = host.read_stored(key)  # type: ignore[union-attr]
        out = None if stored is None else unpack(tiers, ns, key, stored, view, host.refuse)  # type: ignore[union-attr]
    except (CorruptPage, ValueError) as e:
        log.warning("promotion of %s from host failed: %s", key, e)
        return NotNow.FAILED
    return NotNow.FAILED if out is None else out


def read_host_later(
    tiers: Tiers, prom: Promotion, loop: asyncio.AbstractEventLoop, done: Callable[[Read], None]
) -> None:
    """The record copied out of the host tier here (it is loop-owned), dequantized into the
    promotion's page on the quantizer's threads; `done(read)` on the loop."""
    ns, key, view = prom.ns, prom.key, prom.ns.page_in(prom.page.slot)
    host = tiers.host
    try:
        stored = host.read_stored(key)  # type: ignore[union-attr]
    except (CorruptPage, ValueError) as e:
        log.warning("promotion of %s from host failed: %s", key, e)
        done(NotNow.FAILED)
        return
    if stored is None:
        done(NotNow.FAILED)
        return

    def work() -> tuple[PageMeta, int] | CorruptPage | None:
        try:
            return unpack(tiers, ns, key, stored, view, None)
        except CorruptPage as e:
            return e

    def finished(f: asyncio.Future[tuple[PageMeta, int] | CorruptPage | None]) -> None:
        got = None if f.cancelled() or f.exception() is not None else f.result()
        if isinstance(got, CorruptPage):
            log.warning("promotion of %s from host failed: %s", key, got)
            host.refuse(key)  # type: ignore[union-attr]
            got = None
        done(NotNow.FAILED if got is None else got)

    try:
        fut = loop.run_in_executor(tiers.quant.executor(), work)
    except RuntimeError:  # the daemon is stopping: its threads are shut down
        done(NotNow.FAILED)
        return
    fut.add_done_callback(finished)
