"""An in-process store over real tiers (a real HostTier, a real LMDB DiskTier on disk, real
shared memory), and what the tests of its async paths need: pages with known bytes, the
disk tier's reader threads held busy so a read from the device stays in flight until the
test lets it go, and a check that the store's books balance."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from kvstore.memory.pages import PageState
from kvstore.store import fastpath, waits
from kvstore.store.namespace import Namespace
from kvstore.store.store import Store
from kvstore.store.tiering.tiers import Tiers
from kvstore.store.types import LookupResult, NamespaceSpec, StoreLimits
from kvstore.tiers import DiskTier, HostTier

SPEC = NamespaceSpec(
    "t", num_layers=2, num_kv_heads=2, head_dim=256, dtype="float16", page_tokens=4, num_pages=16
)
PB = SPEC.page_bytes  # 16 KiB: a payload covers whole OS pages of the LMDB file
T = SPEC.page_tokens
READERS = 2


def content(tokens: list[int], index: int) -> bytes:
    return hashlib.shake_128(repr(tokens[: (index + 1) * T]).encode()).digest(PB)


def make_store(tmp: Path, host: bool, disk: bool) -> tuple[Store, Namespace, int]:
    """(store, its namespace "t" of 16 pages, an open session)."""
    d = DiskTier.open(tmp / "disk", 16 << 20, readahead=False, reader_threads=READERS) if disk else None
    tiers = Tiers(HostTier(64 * PB) if host else None, d)
    store = Store(StoreLimits(), f"kvt-{uuid.uuid4().hex[:8]}-", tiers=tiers)
    store.create_namespace(SPEC)
    return store, store.namespace("t"), store.open_session("test", 60).session_id


def write(store: Store, sid: int, tokens: list[int], commit: int | None = None, max_tokens: int = 0) -> int:
    """A sequence of `tokens` with known bytes in each page; the first `commit` tokens
    committed (all by default). Returns its id."""
    ns = store.namespace("t")
    seq, _ = store.allocate(sid, "t", max_tokens, b"")
    for ref in store.append(sid, seq, tokens).pages:
        ns.page_view(ref.slot)[:] = content(tokens, ref.index)
    store.commit(sid, seq, len(tokens) if commit is None else commit)
    return seq


def same_bytes(ns: Namespace, tokens: list[int], slots: list[int]) -> list[bool]:
    return [bytes(ns.page_view(s)) == content(tokens, i) for i, s in enumerate(slots)]


async def to_device(store: Store, tmp: Path) -> None:
    """Commit what is queued for disk and drop the file from the OS page cache, so a read of
    it goes to the reader threads."""
    tiers = store.tiers
    assert tiers is not None and tiers.disk is not None
    await asyncio.wrap_future(tiers.disk.flush_async())
    fd = os.open(tmp / "disk" / "data.mdb", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@contextlib.contextmanager
def readers_held(store: Store) -> Iterator[None]:
    """Every reader thread of the disk tier busy until the block ends: reads submitted
    meanwhile wait in its queue (in flight, as a slow device would leave them)."""
    tiers = store.tiers
    assert tiers is not None and tiers.disk is not None
    gate = threading.Event()
    started = [threading.Event() for _ in range(READERS)]

    def hold(ev: threading.Event) -> None:
        ev.set()
        gate.wait(60)

    futs = [tiers.disk.readers.submit(hold, ev) for ev in started]
    try:
        for ev in started:
            assert ev.wait(10), "a reader thread did not start"
        yield
    finally:
        gate.set()
        for f in futs:
            f.result(10)


async def until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Let the loop run (reader threads' results hop back to it) until `cond()` holds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def books(store: Store, ns: Namespace) -> dict[str, object]:
    """The namespace's books, checked to balance: every page free, reserved or sealed; every
    sealed page's refcount equal to its holders (sequences and pins; call with nothing in
    flight). Returned for comparing before and after."""
    pages = ns.pages.pages
    states = Counter(p.state for p in pages)
    assert states[PageState.FREE] == len(ns.pages.free)
    assert states[PageState.RESERVED] == ns.pages_reserved
    assert states[PageState.SEALED] == len(ns.index)
    assert not store.tiers or not store.tiers.promoting, "a promotion is in flight"
    holders: Counter[int] = Counter()
    owned: Counter[int] = Counter()  # RESERVED pages: each a sequence's, and one sequence's only
    for session in store.sessions.values():
        for seq in session.sequences.values():
            assert seq.swap_in is None or seq.swapped is not None
            for p in [*seq.pages, *seq.spare]:
                if p is not None and p.state is PageState.SEALED:
                    holders[p.slot] += 1
                elif p is not None:
                    assert p.state is PageState.RESERVED and p.owner == seq.id, (p, seq.id)
                    owned[p.slot] += 1
        for pin in session.pins.values():
            assert not pin.pending
            for p in pin.pages:
                holders[p.slot] += 1
    refs = {p.slot: p.refcount for p in pages if p.state is PageState.SEALED and p.refcount}
    assert refs == dict(holders), "a refcount differs from its holders"
    assert ns.pages_pinned == len(refs)
    reserved = {p.slot for p in pages if p.state is PageState.RESERVED}
    assert owned == Counter(reserved), "a reserved page is nobody's, or two sequences'"
    return {
        "free": len(ns.pages.free),
        "reserved": ns.pages_reserved,
        "refs": refs,
        "pins": sum(len(s.pins) for s in store.sessions.values()),
    }


async def lookup_with_deadline(
    store: Store, sid: int, namespace: str, tokens: list[int], extra_keys: bytes, pin: bool,
    model_fingerprint: str, return_in_flight: bool, pin_ttl_ms: int,
) -> tuple[LookupResult, int, int]:  # fmt: skip
    """A get's steps as the Lookup RPC takes them (fast_servicer.lookup_reply): (the result,
    the granted ttl ms, the deadline ns; 0 and 0 without a deadline)."""
    r = fastpath.begin_lookup(
        store, sid, namespace, tokens, extra_keys, pin, model_fingerprint, return_in_flight, pin_ttl_ms
    )
    if r.promotions and not return_in_flight:
        r = await waits.settled(store, sid, r)
    if not pin_ttl_ms or not r.pin_id:
        return r, 0, 0
    return r, *fastpath.pin_deadline(store, sid, r.pin_id, pin_ttl_ms)
