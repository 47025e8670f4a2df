"""Promotion: a page below the pool brought up into a pool page (docs/tiers.md, "In the store").

A lookup whose prefix continues below the pool reserves a pool page per such block (the
policy makes room, demoting others) and fills it: from the host tier, or from disk if its
bytes are in the OS page cache, at once and in place (`promote_now` seals it there and then);
else on the disk tier's reader threads, tracked by a `Promotion` (`start`). A `Promotion`
seals its page into the index once its bytes have verified *and* its parent is sealed (chains
seal in order); a checksum failure or a missing record frees the page and every later one of
the chain, so a lookup never serves bytes that failed verification. Each promotion holds one
reference on its parent page until it settles, so the parent cannot be evicted under it.
Loop-owned; the reader threads touch only disk state and the bytes of the RESERVED page.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from kvstore.errors import InvariantBroken
from kvstore.memory.pages import Page
from kvstore.store.namespace import GoneKind
from kvstore.store.tiering import promote_quant
from kvstore.store.tiering.promotion import PROMOTING_OWNER, NotNow, Promotion, Read, Verified
from kvstore.store.tiering.tiers import WRITE_WAIT_S, Tiers
from kvstore.tiers import NOT_RESIDENT, CorruptPage, PageKey, TierName

if TYPE_CHECKING:
    from kvstore.store.namespace import Namespace

log = logging.getLogger(__name__)


def start(
    tiers: Tiers,
    ns: Namespace,
    block_hash: bytes,
    parent_page: Page | None,
    parent: Promotion | None,
    source: TierName,
) -> Promotion:
    """Start bringing one page up; the caller has made room for one page. `parent_page`
    (resident) or `parent` (in flight) is the page it extends."""
    key = PageKey(ns.name, block_hash)
    page = ns.reserve(PROMOTING_OWNER, overwritten=True)
    page.block_hash = block_hash
    if parent_page is not None:
        ns.ref(parent_page)  # released when we settle
    prom = Promotion(ns, key, page, parent_page, parent, source)
    tiers.promoting[key] = prom
    if parent is not None:
        parent.children.append(prom)
    loop = _running_loop() if ns.spec.tier_quantized and key not in tiers.quant.encoding else None
    if source is TierName.HOST and loop is not None:  # (dequantized on the quantizer's threads)
        promote_quant.read_host_later(tiers, prom, loop, lambda got: _read_done(tiers, prom, got))
    elif source is TierName.HOST:
        _read_done(tiers, prom, _read_host(tiers, prom))
    elif tiers.read_batch is not None:
        tiers.read_batch.append(prom)
    else:
        _submit_reads(tiers, [prom])
    return prom


def promote_now(
    tiers: Tiers, ns: Namespace, key: PageKey, parent_page: Page | None, source: TierName
) -> Page | NotNow:
    """Bring one page up at once when nothing has to wait for it: from the host tier, or
    from disk when its record has committed and its bytes are in the OS page cache (read
    here, on the loop). The caller has made room for one page, and `parent_page` is
    resident. Returns the sealed page, with one reference that is now the caller's;
    FAILED if its record failed verification or is gone (the hit ends there); WAIT if it
    has to wait (a write not yet committed, bytes not in the page cache): nothing was
    done, `start` one. The common case of a lookup that continues below the pool,
    without a `Promotion` to track, settle and wait for."""
    if ns.spec.tier_quantized and key not in tiers.quant.encoding and _running_loop() is not None:
        return NotNow.WAIT  # a record to dequantize: on the quantizer's threads (`start`)
    block_hash = key.block_hash
    in_page_cache = False
    got: Read
    if source is TierName.HOST:
        if tiers.host is None and key not in tiers.quant.encoding:
            raise InvariantBroken(f"promoting {key} from a host tier that does not exist")
        page = ns.reserve(PROMOTING_OWNER, overwritten=True)
        got = _read_host_into(tiers, ns, key, ns.page_in(page.slot))
    else:
        if key in tiers.queued:
            return NotNow.WAIT  # its write first: a reader thread waits for it
        loop = _running_loop()
        page = ns.reserve(PROMOTING_OWNER, overwritten=True)
        got = _read_disk_one(tiers, ns, key, ns.page_in(page.slot), loop)
        if got is NotNow.WAIT:  # not in the page cache: a reader thread reads it
            ns.free_reserved(page)
            return NotNow.WAIT
        in_page_cache = loop is not None
    if isinstance(got, NotNow):
        ns.free_reserved(page)
        _failed(tiers, ns, key, source)
        return NotNow.FAILED
    existing = ns.index.get(block_hash)
    if existing is not None:  # (cannot happen from a lookup's walk; kept for any caller)
        ns.free_reserved(page)
        ns.ref(existing)
        return existing
    page.block_hash = block_hash
    ns.seal(page, parent_page)  # refcount 1: the caller's
    page.verified = Verified(got[0], got[1], in_page_cache)
    tiers.counters["promoted_" + source] += 1
    tiers.counters["promoted_disk_inline"] += in_page_cache
    return page


def begin_reads(tiers: Tiers) -> None:
    """Collect the disk reads of the promotions started until `end_reads` into one job
    for the reader threads (one executor hop and one callback per lookup, not per page)."""
    tiers.read_batch = []


def end_reads(tiers: Tiers) -> None:
    batch, tiers.read_batch = tiers.read_batch, None
    if batch:
        _submit_reads(tiers, batch)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # no loop (tools, tests of the store alone): read here
        return None


def _failed(tiers: Tiers, ns: Namespace, key: PageKey, source: TierName) -> None:
    """A promotion's record failed verification or was gone: counted, and remembered for
    Explain when no tier holds the page any more."""
    tiers.counters["promotion_failures"] += 1
    if tiers.holds(ns, key.block_hash) is None:
        tiers.lost(
            key,
            f"{source} tier",
            f"promotion from the {source} tier failed: corrupt or missing record",
            GoneKind.CORRUPT,
        )


def _read_host(tiers: Tiers, prom: Promotion) -> Read:
    if tiers.host is None and prom.key not in tiers.quant.encoding:
        raise InvariantBroken(f"promoting {prom.key} from a host tier that does not exist")
    return _read_host_into(tiers, prom.ns, prom.key, prom.ns.page_in(prom.page.slot))


def _read_host_into(tiers: Tiers, ns: Namespace, key: PageKey, view: memoryview) -> Read:
    if ns.spec.tier_quantized:
        return promote_quant.read_host(tiers, ns, key, view)
    try:
        got = tiers.host.read_record_into(key, view)  # type: ignore[union-attr]
    except (CorruptPage, ValueError) as e:
        log.warning("promotion of %s from host failed: %s", key, e)
        return NotNow.FAILED
    return NotNow.FAILED if got is None else got


def _submit_reads(tiers: Tiers, proms: list[Promotion]) -> None:
    """Read the promotions' pages from disk, in chain order (parents first). Those whose
    bytes are in the OS page cache are copied here, on the loop, at once (a memcpy is
    cheaper than the hop to a thread and back); from the first that is not, the rest go to
    the reader threads as one job."""
    disk = tiers.disk
    if disk is None:
        raise InvariantBroken("reading from a disk tier that does not exist")
    loop = _running_loop()
    inline = 0
    for prom in proms:
        if prom.ns.spec.tier_quantized and loop is not None:
            break  # a record to dequantize: on the reader threads, never on the loop
        write = tiers.queued.get(prom.key)
        if write is not None:  # its batch is not committed yet
            if loop is not None:
                break  # a reader thread waits for it
            with contextlib.suppress(Exception):
                write.result(WRITE_WAIT_S)
        got = _read_disk_one(tiers, prom.ns, prom.key, prom.ns.page_in(prom.page.slot), loop)
        if got is NotNow.WAIT:
            break
        _read_done(tiers, prom, got, in_page_cache=True)
        inline += 1
    tiers.counters["promoted_disk_inline"] += inline
    rest = proms[inline:]
    if not rest or loop is None:  # (without a loop every read was done above)
        return
    jobs = [(p.ns, p.key, p.ns.page_in(p.page.slot), tiers.queued.get(p.key)) for p in rest]

    def read_all() -> list[Read]:
        results: list[Read] = []
        for ns, key, view, write in jobs:
            if write is not None:  # a page demoted a moment ago: its write first
                with contextlib.suppress(Exception):  # (what is on disk then decides)
                    write.result(WRITE_WAIT_S)
            got = _read_disk_one(tiers, ns, key, view, None)
            results.append(NotNow.FAILED if got is NotNow.WAIT else got)
        return results

    def done(results: list[Read]) -> None:
        with contextlib.ExitStack() as landing:  # the pages these seal land in one batch a pool
            for ns in {id(p.ns): p.ns for p in rest}.values():
                landing.enter_context(ns.landing_batch())
            for prom, got in zip(rest, results, strict=True):  # chain order: parents first
                _read_done(tiers, prom, got)

    fut = loop.run_in_executor(disk.readers, read_all)
    fut.add_done_callback(
        lambda f: done(
            f.result() if not f.cancelled() and f.exception() is None else [NotNow.FAILED] * len(rest)
        )
    )


def _read_disk_one(
    tiers: Tiers, ns: Namespace, key: PageKey, view: memoryview, loop: asyncio.AbstractEventLoop | None
) -> Read:
    """Read one page from disk into its pool slot: the (meta, checksum) it verified against
    if it did and is of the namespace's geometry, else FAILED. On the loop (`loop` given)
    only if it cannot block: WAIT if its bytes are not in the page cache (nothing was read).
    A quantized namespace's record is read whole, verified, then dequantized into the slot."""
    disk = tiers.disk
    if disk is None:
        raise InvariantBroken(f"reading {key} from a disk tier that does not exist")
    try:
        if ns.spec.tier_quantized:
            stored = disk.read_stored(key, resident_only=loop is not None)
            if stored is NOT_RESIDENT:
                return NotNow.WAIT
            got = None if stored is None else promote_quant.unpack(tiers, ns, key, stored, view, disk.refuse)  # type: ignore[arg-type]
            return NotNow.FAILED if got is None else got
        got = disk.read_record_into(key, view, resident_only=loop is not None)
    except (CorruptPage, ValueError) as e:
        log.warning("promotion of %s from disk failed: %s", key, e)
        return NotNow.FAILED
    if got is NOT_RESIDENT:
        return NotNow.WAIT
    if not isinstance(got, tuple) or got[0].geometry != ns.geometry:
        return NotNow.FAILED
    return got


def _read_done(tiers: Tiers, prom: Promotion, got: Read, in_page_cache: bool = False) -> None:
    prom.read_ok = isinstance(got, tuple)
    prom.verified = Verified(got[0], got[1], in_page_cache) if isinstance(got, tuple) else None
    if prom.parent is None or prom.parent.ok is not None:
        _settle(tiers, prom)


def _settle(tiers: Tiers, prom: Promotion) -> None:
    """Seal or free the page, once its read is done and its parent has settled; then its
    children whose reads are done."""
    ns, page = prom.ns, prom.page
    ok = bool(prom.read_ok) and (prom.parent is None or bool(prom.parent.ok))
    del tiers.promoting[prom.key]
    holders = len(prom.pins) + len(prom.children)
    if ok:
        parent = prom.parent.sealed if prom.parent is not None else prom.parent_page
        existing = ns.index.get(prom.key.block_hash)
        if existing is not None:  # a sequence sealed the same block meanwhile: share it
            ns.free_reserved(page)
            for _ in range(holders):
                ns.ref(existing)
            prom.sealed = existing
        else:
            ns.seal(page, parent)  # refcount 1 (ours), replaced by the holders' count
            page.verified = prom.verified
            if holders == 0:
                ns.unref(page)
            else:
                page.refcount = holders
            prom.sealed = page
        for pin in prom.pins:
            pin.settled(prom, prom.sealed)
        tiers.counters["promoted_" + prom.source] += 1
        # The host copy stays (the host tier is inclusive): when the pool evicts the page
        # again, demoting it costs nothing.
    else:
        ns.free_reserved(page)
        for pin in list(prom.pins):
            pin.settled(prom, None)
        if prom.read_ok is False:
            _failed(tiers, ns, prom.key, prom.source)
    if prom.parent is not None and prom.parent.sealed is not None:
        ns.unref(prom.parent.sealed)  # the reference our parent's holders count gave us
    if prom.parent_page is not None:
        ns.unref(prom.parent_page)
    prom.resolve(ok)
    children = prom.children
    # Settled: drop the links of the chain (parent <-> children is a reference cycle,
    # which would leave every chain to the garbage collector instead of freeing it here).
    prom.parent, prom.children, prom.pins = None, [], []
    for child in children:
        if child.read_ok is not None:
            _settle(tiers, child)
