"""Integrity of sealed pages in the pool (docs/security.md, "Sealed pages"): a writer maps its
namespace's pool read-write, so nothing stops it writing on a page after sealing it, and a
freed page still holds its previous occupant's bytes. Three defences, per host pool:

- **Checksum at seal.** `Namespace.seal` hands each page to `NamespaceGuard.sealed`; the page's
  checksum (page_sums.py) is computed on the integrity thread, batched (every page sealed
  since the last batch: a seal wakes the task SEAL_WAKE_S later), so a Put pays nothing on
  the loop. Until it is in, the page carries its batch as a marker (`Page.checksum`), which
  also makes a late result for a page freed and sealed again meanwhile be ignored. The thread
  runs at nice +10 and falls behind under load: a page that leaves the pool while still
  waiting is counted (`pages_unchecked`).
- **The scrubber** re-verifies sealed pages on that thread at a bounded rate
  (`server.scrub_bytes_per_s`), a slot cursor per namespace. Copies below the pool verify
  first (`page_sums.intact`, called by the tiers). A mismatch drops the page: out of the index
  at once (new lookups miss; a pin already holding it keeps what it has), freed once nobody
  holds it (`sweep`), counted, and logged with the session that sealed it.
- **Zero on free.** A freed page is dirty (kvstore/memory/pages.py); this thread zeroes dirty
  pages that have been free for `server.zero_freed_after_s` in bounded batches (the newest of
  them first), and one taken before its turn is zeroed as it is taken (after waiting for the
  batch zeroing it now, if any): never handed out unzeroed, unless its taker writes it whole
  (a promotion, a put's unzeroed credit), which then costs no zeroing at all.

Every job runs on one thread, which touches only pool bytes; each job is in its namespace's
`private_reads` while it runs, so a DeleteNamespace waits for it before closing the pool, and
`close` waits for it before the store closes the pools. Device pools are left alone (their
bytes are not in host memory; docs/gpu.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from time import monotonic
from typing import TYPE_CHECKING, Any

from kvstore.memory.backend import HandleType
from kvstore.memory.page_zero import zero
from kvstore.memory.pages import FREE, SEALED, Page
from kvstore.store import zero_later
from kvstore.store.integrity_jobs import Batch, background, tracked, work
from kvstore.store.namespace import GoneKind, Namespace
from kvstore.store.page_sums import CORRUPT

if TYPE_CHECKING:
    from kvstore.store.sessions import Session

log = logging.getLogger(__name__)

TICK_S = 0.05  # how often the scrubber runs (and freed pages are zeroed) when nothing wakes it
JOB_BYTES = 32 << 20  # bytes of sealed pages to checksum, or freed pages to zero, per job: a
# page taken while its batch is being zeroed waits for the job, so this bounds that wait
# Slots the scrubber's cursor steps over per tick, at most: its scan is a Python loop on the
# event loop (~120 ns a slot), so this bounds what a tick holds the loop for in a large pool
# with few sealed pages (4,096 took ~0.5 ms a tick, 10 ms/s of an idle daemon's loop at 32,768
# pages: kvstore-bench idle); 10,240 slots a second still pass over such a pool in seconds.
SCRUB_SCAN = 512
# A pass over a pool starts at most this often: a pool the rate re-reads in less (at 64 MiB/s,
# any under 64 MiB) is not re-read many times a second, each time paying the loop per page (a
# 256-page pool of 4 KiB pages, 64 sealed, was re-read every 50 ms tick: an idle daemon's loop
# 10.0-11.7 ms/s, 7.7 with this, 6.2 with no background work: kvstore-bench idle). A page
# scribbled on is then found within about this long in a small pool; a large one takes its
# size / the rate.
SCRUB_MIN_PASS_S = 1.0
# A seal wakes the task this long after it: one checksum job for the seals of those ms, not
# one a Put (~50-70 us of loop a job, any size). A freed page wakes it at once (zeroing ahead).
SEAL_WAKE_S = 0.005


@dataclass(frozen=True)
class IntegrityConfig:
    checksums: bool = True  # checksum at seal, verify before copies below, scrub
    scrub_bytes_per_s: int = 64 << 20  # 0: no scrubber
    zero_freed: bool = True
    unzeroed_credits: bool = True  # honour a grant's unzeroed_ok (kvstore/store/credit.py)
    zero_after_s: float = 1.0  # a freed page is zeroed by the thread once free this long


class NamespaceGuard:
    """One namespace's integrity state (page_sums.Guard); loop-owned."""

    def __init__(self, service: Integrity, ns: Namespace) -> None:
        self.service = service
        self.ns = ns
        self.to_sum = Batch()  # sealed, checksum not yet computed
        self.given: dict[int, int] | None = None  # (page_sums.Guard.given)
        self.cursor = 0  # the scrubber's next slot
        self.next_pass_at = 0.0  # (monotonic) the scrubber's next pass starts no sooner
        self.zeroing: Batch | None = None  # the freed pages being zeroed now
        self.aged: deque[Page] = deque()  # freed pages free for zero_after_s by the last job: to zero
        self.counts = dict.fromkeys(
            (
                "pages_checksummed",
                "pages_scrubbed",
                "pages_corrupt",
                "copies_refused",
                "pages_zeroed",
                "pages_zeroed_inline",
                "pages_unchecked",
                "replies_waited_zeroing",
                "pages_sums_given",
            ),
            0,
        )

    def view(self, page: Page) -> memoryview:
        return self.ns.page_view(page.slot)

    # ------------------------------------------------------------ page_sums.Guard

    def takes_sums(self) -> bool:
        return self.service.config.checksums

    def lends_unzeroed(self) -> bool:
        return self.service.config.zero_freed and self.service.config.unzeroed_credits

    def sealed(self, pages: list[Page], writer: int) -> None:
        batch = self.to_sum if self.service.config.checksums else None
        given = self.given if batch is not None else None
        for page in pages:
            page.writer = writer
            page.checksum = batch
        if given:
            # The writer's own checksums, taken as it copied (a Put's page_sums): kept as
            # these pages' checksums, so the integrity thread does not read them again. A
            # wrong one is found by the scrubber or the check before a copy below, like any
            # change after the seal: the page is dropped, never served again after that.
            to_sum = []
            for page in pages:
                s = given.get(page.slot)
                if s is None:
                    to_sum.append(page)
                else:
                    page.checksum = s
            self.counts["pages_sums_given"] += len(pages) - len(to_sum)
            pages = to_sum
        if batch is not None and pages:
            batch.pages += pages
            self.service.kick_soon()

    def corrupt(self, page: Page, where: str) -> None:
        if page.checksum is CORRUPT:
            return
        page.checksum = CORRUPT
        ns = self.ns
        self.counts["pages_corrupt"] += 1
        session: Session | None = self.service.sessions().get(page.writer)
        who = (
            f"session {page.writer} ({session.client_name!r})"
            if session
            else f"session {page.writer} (ended)"
        )
        if not page.writer:
            who = "a promotion from below the pool"
        log.error(
            "namespace %s: sealed page %d (block %s) changed after its seal (found %s); sealed by %s: "
            "dropped, never served again",
            ns.name,
            page.slot,
            (page.block_hash or b"").hex()[:16],
            where,
            who,
        )
        if page.block_hash is not None and ns.index.get(page.block_hash) is page:
            ns.index.remove(page)  # new lookups miss it from now on
            ns.condemned.add(page)  # freed by `sweep` once nobody holds it
            ns.remember_gone(
                page.block_hash, "integrity", f"changed after its seal ({where})", GoneKind.CORRUPT
            )
            self.service.kick()

    def refused(self) -> None:
        self.counts["copies_refused"] += 1

    def zero_soon(self, pages: list[Page]) -> None:
        """On the zeroing threads at once (zero_later.py), not in the integrity thread's next
        batch: that batch marks its pages clean only once its checksums are done too, at nice
        +10, and the next credit would wait for it (zero_ahead.py says why). Marked with their
        job meanwhile: the integrity thread's batches pass them by, a call taking one waits."""
        dirty = [p for p in pages if p.state is FREE and p.dirty and p.zeroing is None]
        if dirty:
            zero_later.zero_off_loop(self, dirty)

    def stats(self) -> dict[str, int]:
        self.settle_unchecked(self.to_sum)  # (those gone since the last job: counted now)
        return dict(self.counts)

    # ------------------------------------------------------------ zeroing

    def zero_now(self, pages: list[Page], overwritten: bool) -> None:
        """PageTable.zero: dirty pages being taken, zeroed before anyone gets them (with
        `overwritten`, only no longer being zeroed: the taker replaces every byte). Inside a
        call whose reply waits for it (zero_later.py), zeroed off the loop instead, and the
        jobs already zeroing some of them waited for by the reply, not the loop."""
        busy = {p.zeroing for p in pages if p.zeroing is not None}
        if not overwritten and zero_later.collect(self, pages, busy):
            return
        for batch in busy:
            self.zeroed(batch, wait=True)  # (bounded: JOB_BYTES, or one call's pages)
        dirty = [p for p in pages if p.dirty]
        if overwritten:
            for page in dirty:
                page.dirty = False
        elif dirty:
            self.zero_inline(dirty)

    def zero_inline(self, pages: list[Page]) -> None:
        for page in pages:
            view = self.view(page)
            zero(view)
            view.release()
            page.dirty = False
            self.counts["pages_zeroed_inline"] += 1

    def zeroed(self, batch: Batch, wait: bool = False) -> None:
        """The job zeroing `batch` is done (or, with `wait`, waited for): its pages are clean."""
        ok = True
        if wait and batch.future is not None:
            ok = batch.future.exception() is None  # (failed: zeroed on the loop instead)
        if self.zeroing is batch:
            self.zeroing = None
        table = self.ns.pages
        free = table.free
        for page in batch.pages:
            if page.zeroing is batch:  # (else taken, and freed again, since)
                page.zeroing = None
                if ok and page.dirty and page.state is FREE:
                    table.dirty_free -= 1
                page.dirty = not ok
                if ok and page.prev is not None:  # (on the free list) handed out before dirty ones
                    free.remove(page)
                    free.push_front(page)
                self.counts["pages_zeroed"] += ok

    # ------------------------------------------------------------ one job

    def job(
        self, scrub_bytes: int
    ) -> tuple[Batch, Batch, list[tuple[Page, object]], list[memoryview]] | None:
        """Collect (on the loop) what the next job does: checksums of pages sealed since the
        last, freed pages to zero, sealed pages to re-verify; None when there is nothing."""
        page_bytes = self.ns.spec.page_bytes
        per_job = max(1, JOB_BYTES // page_bytes)
        sums = self.to_sum
        if len(sums.pages) > per_job:  # (the rest in the next job)
            rest = Batch()
            rest.pages = sums.pages[per_job:]
            sums.pages = sums.pages[:per_job]
            for page in rest.pages:
                if page.checksum is sums:
                    page.checksum = rest
            self.to_sum = rest
            self.service.kick()
        else:
            self.to_sum = Batch()
        self.settle_unchecked(sums)
        zeros = Batch()
        if self.zeroing is None:
            # Only pages free for zero_after_s: one a put's credit takes before then is written
            # whole by its client, so zeroing it would be a write of the whole page for nothing
            # (and its memory bandwidth taken from the clients' copies).
            freed, aged = self.ns.pages.freed, self.aged
            cutoff = monotonic() - self.service.config.zero_after_s
            while freed and freed[0][0] <= cutoff:
                aged.append(freed.popleft()[1])
            while aged and len(zeros.pages) < per_job:
                # Newest first: a call takes the oldest dirty pages (the free list's order), so
                # it rarely takes one of this batch and waits for the whole batch at this
                # thread's low priority (zero_later.py zeroes just its own pages instead).
                page = aged.pop()
                if page.state is FREE and page.dirty and page.zeroing is None:
                    page.zeroing = zeros
                    zeros.pages.append(page)
            if aged:
                self.service.kick()
        scrubs = self.scrub_pages(scrub_bytes // page_bytes) if scrub_bytes >= page_bytes else []
        if not (sums.pages or zeros.pages or scrubs):
            return None
        views = [self.view(p) for p in sums.pages], [self.view(p) for p in zeros.pages]
        return sums, zeros, scrubs, [*views[0], *views[1], *(self.view(p) for p, _ in scrubs)]

    def settle_unchecked(self, sums: Batch) -> None:
        """Keep in `sums` the pages still waiting for it; count the others: they left the pool
        (freed: evicted, copied below, dropped) before their checksum was taken. (A page freed
        and sealed again into the same batch is in it twice: its first occupant left unchecked.)"""
        kept = list(dict.fromkeys(p for p in sums.pages if p.checksum is sums))
        self.counts["pages_unchecked"] += len(sums.pages) - len(kept)
        sums.pages = kept

    def scrub_pages(self, n: int) -> list[tuple[Page, object]]:
        """Up to `n` checksummed sealed pages from the cursor on: (page, its checksum). A
        pass ends at the pool's last slot; the next starts SCRUB_MIN_PASS_S after the last
        one started, or later."""
        pages = self.ns.pages.pages
        out: list[tuple[Page, object]] = []
        if self.cursor == 0:
            now = monotonic()
            if now < self.next_pass_at:
                return out
            self.next_pass_at = now + SCRUB_MIN_PASS_S
        for _ in range(min(len(pages), SCRUB_SCAN)):
            page = pages[self.cursor]
            self.cursor = (self.cursor + 1) % len(pages)
            if page.state is SEALED and type(page.checksum) is int:
                out.append((page, page.checksum))
            if len(out) >= n or self.cursor == 0:
                break
        return out

    def done(self, sums: Batch, zeros: Batch, scrubs: list[tuple[Page, object]], result: Any) -> None:
        """The job's results, back on the loop."""
        got_sums, got_scrubs = result
        for page, value in zip(sums.pages, got_sums, strict=True):
            if page.checksum is sums:
                page.checksum = value
                self.counts["pages_checksummed"] += 1
            else:  # freed (and maybe sealed again) while its checksum was being taken
                self.counts["pages_unchecked"] += 1
        if zeros.pages:
            self.zeroed(zeros)
        for (page, expected), value in zip(scrubs, got_scrubs, strict=True):
            # `is`: the same int object means the same seal (a page sealed again gets a new one)
            if page.checksum is expected and page.state is SEALED:
                self.counts["pages_scrubbed"] += 1
                if value != expected:
                    self.corrupt(page, "by the scrubber")

    def sweep(self) -> None:
        """Free the corrupt pages nobody holds any more."""
        ns = self.ns
        for page in [p for p in ns.condemned if p.evictable]:
            ns.evicting_for = "its bytes changed after its seal"
            try:
                ns.drop(page)
            finally:
                ns.evicting_for = ""


class Integrity:
    """The store's integrity service: one guard per host pool, one thread, one task (`run`)."""

    def __init__(self, config: IntegrityConfig, sessions: Callable[[], dict[int, Session]]) -> None:
        self.config = config
        self.sessions = sessions
        self.guards: dict[str, NamespaceGuard] = {}
        self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix="kvstore-integrity", initializer=background)
        # (zero_later.py: a reply's freshly taken dirty pages, not queued behind the thread's jobs)
        self.zero_pool = cf.ThreadPoolExecutor(zero_later.THREADS, thread_name_prefix="kvstore-zero")
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # (both set by `run`)
        self._soon: asyncio.TimerHandle | None = None  # kick_soon's wake, until it fires or the task runs
        self._credit = 0.0  # scrub bytes earned and not yet spent
        self.jobs = 0  # jobs submitted to the integrity thread (benchmarks and tests read it)

    def attach(self, ns: Namespace) -> None:
        """Guard a new namespace (host pools only)."""
        if ns.pool.handle.handle_type is not HandleType.CPU_MEMFD:
            return
        if not (self.config.checksums or self.config.zero_freed):
            return
        guard = NamespaceGuard(self, ns)
        self.guards[ns.name] = guard
        ns.guard = guard
        if self.config.zero_freed:
            ns.pages.zero = guard.zero_now

    def kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def kick_soon(self) -> None:
        """Wake the task within SEAL_WAKE_S (at once if something else woke it meanwhile)."""
        if (
            self._loop is not None
            and self._wake is not None
            and self._soon is None
            and not self._wake.is_set()
        ):
            self._soon = self._loop.call_later(SEAL_WAKE_S, self._wake.set)

    async def run(self, namespaces: Callable[[], dict[str, Namespace]]) -> None:
        """The background task: each tick (or at once when woken), one job per namespace."""
        loop = self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        rate = self.config.scrub_bytes_per_s if self.config.checksums else 0
        last = scrubbed = loop.time()
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that arrives in
            # the loop step of a wake (every Put wakes it): the task ran on, and the daemon's stop
            # waited out its step timeout for it.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_S):
                    await self._wake.wait()
            self._wake.clear()
            if self._soon is not None:  # (this turn takes what it was for)
                self._soon.cancel()
                self._soon = None
            now = loop.time()
            self._credit = min(self._credit + rate * (now - last), rate * 1.0)
            last = now
            # Woken for checksums or zeroing (every Put wakes it), the scrubber still runs at most
            # once a tick: its scan and reads are not repeated at every call's pace.
            scrub = now - scrubbed >= TICK_S
            scrubbed = now if scrub else scrubbed
            for name, ns in list(namespaces().items()):
                guard = self.guards.get(name)
                if guard is None or guard.ns is not ns:
                    continue
                try:
                    guard.sweep()
                    await self._one_job(guard, namespaces, scrub)
                except Exception:  # (a bug here must not end the checks of every namespace)
                    log.exception("namespace %s: integrity checks failed this tick", name)

    async def _one_job(
        self, guard: NamespaceGuard, namespaces: Callable[[], dict[str, Namespace]], scrub: bool = True
    ) -> None:
        # At most two ticks' worth of scrubbing a job (one page at least): the credit saved
        # while nothing was sealed (up to 1 s of it) is spent over ticks, not in one burst
        # that competes with the first calls after a quiet spell.
        most = max(self.config.scrub_bytes_per_s * 2 * TICK_S, guard.ns.spec.page_bytes)
        credit = int(min(self._credit, most)) if scrub else 0
        made = guard.job(credit)
        if made is None:
            return
        sums, zeros, scrubs, views = made
        self._credit -= len(scrubs) * guard.ns.spec.page_bytes
        n = len(sums.pages)
        try:
            future = self._pool.submit(
                work, views[:n], views[n : n + len(zeros.pages)], views[n + len(zeros.pages) :]
            )
        except RuntimeError:  # (closed: the daemon is stopping)
            for view in views:
                view.release()
            for page in zeros.pages:
                page.zeroing = None  # (still dirty)
            return
        self.jobs += 1
        if zeros.pages:
            zeros.future = future
            guard.zeroing = zeros
        ns = guard.ns
        waited = tracked(ns, future)
        try:
            result = await asyncio.shield(waited)  # (cancelled: the job still runs; close waits)
        except Exception:
            log.exception("namespace %s: an integrity job failed; its pages are left unverified", ns.name)
            for page in zeros.pages:  # (still dirty: zeroed on the loop when taken)
                if page.zeroing is zeros:
                    page.zeroing = None
            if guard.zeroing is zeros:
                guard.zeroing = None
            return
        if namespaces().get(ns.name) is ns:
            guard.done(sums, zeros, scrubs, result)

    def close(self) -> None:
        """Wait for the jobs under way (before the pools are closed)."""
        self._pool.shutdown(wait=True)
        self.zero_pool.shutdown(wait=True)
