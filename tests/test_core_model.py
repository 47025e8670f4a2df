"""A model-based test of the whole core: the store over a real HostTier and a real LMDB
DiskTier (in a temporary directory), driven through the servicers' async paths on an event
loop of its own. A tiny pool (12 pages of 2 tokens) and host tier (4 pages) keep both under
pressure, so pages move down and back up (at once, or in flight on the disk tier's reader
threads once the OS page cache is dropped), sequences are swapped out, swapped in and
dropped, sessions die, the daemon restarts over the same disk directory and re-indexes it,
and Lookup, SwapIn, WaitPages and Flush are cancelled at each await.

The model writes into every page the bytes it expects there (derived from the block hash,
or from the sequence and tokens for a page that is nobody's prefix) and checks, after every
step (tests/core_model_checks.py): free + used = total in the pool and the host tier; no
page or slot owned twice; every refcount equals its holders (sequences, pins, swap-ins,
promotions); a dead session holds nothing; every sealed page, in the pool, the host tier or
on disk, holds its hash's bytes; every hit it is served holds them; every page a flush
acknowledged is on disk after a restart.

KVSTORE_MODEL_EXAMPLES=N runs N examples instead of the default (a deeper run)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

import grpc
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

from kvstore.errors import OutOfRange, ResourceExhausted
from kvstore.server.admin_servicer import AdminServicer
from kvstore.server.kvstore_servicer import KVStoreServicer
from kvstore.store.store import Store
from kvstore.store.tiering.reindex import reindex_disk
from kvstore.store.tiering.tiers import Tiers
from kvstore.store.types import SLIDING_WINDOW, SequenceOptions
from kvstore.tiers import DiskTier, HostTier, PageKey
from tests.core_model_support import (
    DISK_BYTES,
    HOST_BYTES,
    LIMITS,
    PB,
    READERS,
    SPEC,
    TTL,
    VOCAB,
    WAIT_S,
    Aborted,
    ModelSteps,
    SeqModel,
    SessionModel,
    T,
    check_disk,
    check_holders,
    check_host,
    check_pool,
    content,
    pick,
    picks,
    shares,
    swap_keys,
    tokens_st,
)
from tests.test_store_stateful import FakeClock

SHM = Path("/dev/shm")


# Stats fields other threads move while a call runs (see CoreMachine.steady_stats).
BACKGROUND_FIELDS = ("disk_bytes", "pages_checksummed", "pages_scrubbed", "pages_zeroed")


class CoreMachine(ModelSteps, RuleBasedStateMachine):
    spec = SPEC

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="kvstore-model-"))
        self.clock = FakeClock()
        self.prefix = f"kvtest-model-{uuid.uuid4().hex[:12]}-"
        self.disk_evicted: set[PageKey] = set()  # (the writer thread adds to it)
        self.acked: set[bytes] = set()  # block hashes a flush acknowledged
        self.sessions: dict[int, SessionModel] = {}
        self.prompts: list[list[int]] = []  # token lists appended, for prefixes that collide
        self.start()

    def start(self) -> None:
        disk = DiskTier.open(
            self.dir / "disk",
            DISK_BYTES,
            readahead=False,
            on_evict=self.disk_evicted.update,
            reader_threads=READERS,
            # A demoted page's write stays queued a while (not committed within a few ms, as
            # in production): a promotion of it goes to a reader thread, in flight.
            batch_wait_s=0.05,
        )
        self.tiers = Tiers(HostTier(HOST_BYTES), disk)
        self.store = Store(LIMITS, shm_prefix=self.prefix, clock=self.clock, tiers=self.tiers)
        self.store.create_namespace(self.spec)
        self.ns = self.store.namespaces["ns"]
        self.kv = KVStoreServicer(self.store)
        self.admin = AdminServicer(self.store)

    def teardown(self) -> None:
        try:
            try:
                self.store.close()
            finally:
                for ns in self.store.namespaces.values():
                    ns.pool.close()
                self.loop.close()
                shutil.rmtree(self.dir, ignore_errors=True)
        finally:
            left = sorted(p.name for p in SHM.glob(self.prefix + "*"))
            assert not left, f"segments left in /dev/shm: {left}"

    # ------------------------------------------------------------ setup

    @initialize()
    def two_sessions(self):
        self.open_session()
        self.open_session()

    # Every rule draws the same things whatever the state (no preconditions, no draws that
    # depend on it): how the disk tier's threads race the loop may change what a step finds,
    # and hypothesis must still replay the same steps.

    # ------------------------------------------------------------ sequences

    @rule(
        i=picks,
        max_tokens=st.sampled_from([0, 0, 4, 8]),
        window=st.sampled_from([0, 0, 3, 5]),
        share=shares,
        tokens=tokens_st,
        commit=st.booleans(),
    )
    def allocate(self, i, max_tokens, window, share, tokens, commit):
        """A sequence (a static budget with max_tokens, a sliding window), appended to at once."""
        sid = pick(list(self.sessions), i)
        options = SequenceOptions(SLIDING_WINDOW, sink_tokens=2, window_tokens=window) if window else None
        self.new_sequence(sid, 0 if window else max_tokens, options, self.prompt(share, tokens), commit)

    def steady_stats(self) -> list:
        """The namespace's stats but for what other threads move at any time: the disk
        writer's bytes (it commits write-backs on its own thread) and the integrity thread's
        counters. A refused call must leave the rest as it was."""
        moving = dict.fromkeys(BACKGROUND_FIELDS, 0)
        return [dataclasses.replace(ns, **moving) for ns in self.store.stats("ns")]

    def new_sequence(self, sid, max_tokens, options, tokens, commit=True) -> int | None:
        before = self.steady_stats()
        try:
            seq, _ = self.store.allocate(sid, "ns", max_tokens, b"", options)
        except ResourceExhausted:
            assert self.steady_stats() == before
            return None
        self.sessions[sid].seqs[seq] = SeqModel(max_tokens)
        self.do_append(sid, seq, tokens, commit)
        return seq

    @rule(i=picks, share=shares, tokens=tokens_st, commit=st.booleans())
    def append(self, i, share, tokens, commit):
        """Append to a live sequence (a new one when there is none)."""
        if not self.live(i, share):
            return
        self.do_append(*pick(self.seqs(swapped=False), i), tokens, commit)

    def live(self, i: int, share: tuple[bool, int, int]) -> bool:
        """Whether a live sequence exists, allocating one (with a prompt) if none does."""
        if not self.seqs(swapped=False):
            self.allocate.hypothesis_stateful_rule.function(self, i, 0, 0, share, [1, 2, 3], True)
        return bool(self.seqs(swapped=False))

    def do_append(self, sid: int, seq: int, tokens: list[int], commit: bool) -> None:
        m = self.sessions[sid].seqs[seq]
        before = self.steady_stats()
        try:
            r = self.store.append(sid, seq, tokens)
        except (OutOfRange, ResourceExhausted):
            assert self.steady_stats() == before
            return
        m.tokens += tokens
        for index in r.dropped:
            m.written.pop(index, None)
        self.write_pages(sid, seq, r.pages)
        self.prompts.append(list(m.tokens))
        if commit:
            self.store.commit(sid, seq, len(m.tokens))
            m.committed = len(m.tokens)

    @rule(i=picks, num=st.integers(0, 14))
    def commit(self, i, num):
        if self.seqs(swapped=False):
            sid, seq = pick(self.seqs(swapped=False), i)
            m = self.sessions[sid].seqs[seq]
            num = num % (len(m.tokens) + 1)
            self.store.commit(sid, seq, num)
            m.committed = max(m.committed, num)

    @rule(i=picks, pin=st.booleans())
    def release(self, i, pin):
        pins = [(sid, p) for sid, s in self.sessions.items() for p in s.pins]
        if pin and pins:
            sid, pin_id = pick(pins, i)
            self.store.release_pin(sid, pin_id)
            del self.sessions[sid].pins[pin_id]
        elif self.seqs():
            sid, seq = pick(self.seqs(), i)
            self.store.release_sequence(sid, seq)
            del self.sessions[sid].seqs[seq]

    # ------------------------------------------------------------ preemption

    @rule(i=picks, share=shares, mode=st.sampled_from(["swap_out", "swap_out", "drop"]))
    def preempt(self, i, share, mode):
        """Swap out or drop a live sequence; drop a swapped one."""
        swapped = mode == "drop" and bool(i % 2) and bool(self.seqs(swapped=True))
        if not swapped and not self.live(i, share):
            return
        sid, seq = pick(self.seqs(swapped=swapped), i)
        m = self.sessions[sid].seqs[seq]
        self.store.preempt(sid, seq, mode)
        if mode == "drop":
            self.sessions[sid].seqs[seq] = SeqModel(m.max_tokens)
        else:
            m.swapped = True

    @rule(i=picks, share=shares, evict=st.booleans())
    def swap_in(self, i, share, evict):
        """Swap in a swapped sequence (one swapped out just now when there is none, its pages
        evicted from the pool with `evict`, so they come up from the tiers, from disk in flight)."""
        if not self.seqs(swapped=True):
            self.preempt.hypothesis_stateful_rule.function(self, i, share, "swap_out")
            if evict:
                self.store.evict_all("ns")
                self.drop_page_cache()
        if self.seqs(swapped=True):
            sid, seq = pick(self.seqs(swapped=True), i)
            reply = self.call(self.kv.SwapIn, pb.SwapInRequest(session_id=sid, sequence_id=seq))
            self.after_swap_in(sid, seq, reply)

    @rule(i=picks, share=shares, tokens=st.lists(st.integers(0, VOCAB - 1), min_size=4, max_size=8))
    def swap_in_squeezed(self, i, share, tokens):
        """Swap-in under pool pressure: the sequence's sealed pages stay resident but unpinned
        (a pin held them through the swap-out) and every free page is reserved by another
        sequence, so making room for its other pages could evict them."""
        sid = pick(list(self.sessions), i)
        seq = self.new_sequence(sid, 0, None, self.prompt(share, tokens))
        if seq is None:
            return
        m = self.sessions[sid].seqs[seq]
        pin = self.call(
            self.kv.Lookup, pb.LookupRequest(session_id=sid, namespace="ns", token_ids=m.tokens, pin=True)
        )
        self.check_served(m.tokens, pin.slots, pin.block_hashes, pin.ready_pages)
        self.store.preempt(sid, seq, "swap_out")
        m.swapped = True
        if pin.pin_id:
            self.store.release_pin(sid, pin.pin_id)
        free = len(self.ns.pages.free)
        if free:
            self.new_sequence(sid, T * free, None, [])
        reply = self.call(self.kv.SwapIn, pb.SwapInRequest(session_id=sid, sequence_id=seq))
        self.after_swap_in(sid, seq, reply)

    def after_swap_in(self, sid: int, seq: int, reply) -> None:
        event(f"swap_in: {reply.code.name if isinstance(reply, Aborted) else 'ok'}")
        m = self.sessions[sid].seqs[seq]
        q = self.store.sessions[sid].sequences[seq]
        assert q.swap_in is None, "a sequence is left 'being swapped in'"
        if isinstance(reply, Aborted):
            if reply.code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # the pool cannot hold it now
                assert q.swapped is not None, "a failed swap-in left the sequence half swapped in"
                return
            # Only a page gone from every tier may lose a sequence; the disk here never evicts.
            assert reply.code == grpc.StatusCode.DATA_LOSS and self.disk_evicted, str(reply)
            assert q.swapped is None and not q.pages
            self.sessions[sid].seqs[seq] = SeqModel(m.max_tokens)
            return
        assert q.swapped is None
        m.swapped = False
        assert reply.num_tokens == len(m.tokens) and reply.committed_tokens == m.committed
        self.check_view(sid, seq)

    # ------------------------------------------------------------ lookup and pins

    @rule(
        i=picks,
        share=shares,
        tokens=tokens_st,
        pin=st.booleans(),
        in_flight=st.booleans(),
        cold=st.booleans(),
    )
    def lookup(self, i, share, tokens, pin, in_flight, cold):
        """A lookup (pinned or not; a pin may take its pages in flight, then WaitPages; `cold`:
        the disk tier's pages are not in the page cache): every page it serves holds its hash's
        bytes, and it hits at least what is held."""
        tokens, sid = self.prompt(share, tokens), pick(list(self.sessions), i)
        if cold:
            self.drop_page_cache()
        floor = self.held_floor(tokens)
        request = pb.LookupRequest(
            session_id=sid, namespace="ns", token_ids=tokens, pin=pin, return_in_flight=pin and in_flight
        )
        c = self.tiers.counters
        threads = c["promoted_disk"] - c["promoted_disk_inline"]
        r = self.call(self.kv.Lookup, request)
        assert not isinstance(r, Aborted), str(r)
        k = self.check_served(tokens, r.slots, r.block_hashes, r.ready_pages)
        event(f"lookup: {'returned in flight' if r.ready_pages < k else 'ready'}")
        if c["promoted_disk"] - c["promoted_disk_inline"] > threads:
            event("lookup: waited for pages read from disk in flight")
        assert r.hit_tokens == k * T and k >= floor
        if not pin or not k:
            assert r.pin_id == 0
            return
        self.sessions[sid].pins[r.pin_id] = tokens[: k * T]
        if r.ready_pages < k:
            w = self.call(self.kv.WaitPages, pb.WaitPagesRequest(session_id=sid, pin_id=r.pin_id))
            assert not isinstance(w, Aborted), str(w)
            self.check_served(tokens, w.slots, r.block_hashes[: 16 * len(w.slots)], len(w.slots))
            assert w.ready_pages == w.hit_pages == len(w.slots)
        self.settle()
        if c["promoted_disk"] - c["promoted_disk_inline"] > threads:
            event("lookup: pages read from disk in flight")
        self.pin_settled(sid, r.pin_id, tokens)
        assert len(self.sessions[sid].pins[r.pin_id]) >= floor * T

    # ------------------------------------------------------------ cancellation

    @rule(
        i=picks,
        op=st.sampled_from(["lookup", "swap_in", "wait_pages", "flush"]),
        steps=st.integers(0, 3),
        share=shares,
        evict=st.booleans(),
    )
    def cancelled(self, i, op, steps, share, evict):
        """An RPC whose client goes away: cancelled after `steps` turns of the loop (before it
        starts, at its first await, or a later one). It leaves nothing behind. With `evict`,
        the pool is emptied first, so what it looks up comes from the tiers."""
        sid = pick(list(self.sessions), i)
        tokens = self.prompt((True, *share[1:]), [])  # (an earlier prompt: something to find)
        if evict:
            self.store.evict_all("ns")
        self.drop_page_cache()  # (what is on disk comes up in flight)
        # The disk tier's reader threads are kept busy until the call is cancelled: what it
        # reads from disk is still in flight then, whatever the threads' timing.
        gate = threading.Event()
        busy = [self.tiers.disk.readers.submit(gate.wait, WAIT_S) for _ in range(READERS)]
        try:
            self.cancel_at(op, steps, sid, tokens, i)
        finally:
            gate.set()
            for f in busy:
                f.result(WAIT_S)
        self.settle()
        for sid, s in self.sessions.items():  # pins whose pages were in flight
            for pin_id, held in s.pins.items():
                self.pin_settled(sid, pin_id, held)

    def cancel_at(self, op: str, steps: int, sid: int, tokens: list[int], i: int) -> None:
        if op == "swap_in" and self.seqs(swapped=True):
            sid, seq = pick(self.seqs(swapped=True), i)
            coro = self._call(self.kv.SwapIn, pb.SwapInRequest(session_id=sid, sequence_id=seq))
        elif op == "flush":
            coro = self._call(self.admin.Flush, pb.FlushRequest())
        elif op == "wait_pages":
            request = pb.LookupRequest(
                session_id=sid, namespace="ns", token_ids=tokens, pin=True, return_in_flight=True
            )
            r = self.call(self.kv.Lookup, request)
            if not r.pin_id:
                return
            self.sessions[sid].pins[r.pin_id] = tokens[: len(r.slots) * T]
            coro = self._call(self.kv.WaitPages, pb.WaitPagesRequest(session_id=sid, pin_id=r.pin_id))
        else:
            op = "lookup"
            request = pb.LookupRequest(session_id=sid, namespace="ns", token_ids=tokens, pin=True)
            coro = self._call(self.kv.Lookup, request)
        session = self.store.sessions[sid]
        pins_before, flushable = set(session.pins), self.flushable()

        async def cancel_after() -> tuple[bool, object]:
            task = asyncio.ensure_future(coro)
            for _ in range(steps):
                await asyncio.sleep(0)
            cancelled = task.cancel()
            try:
                out = await task
            except asyncio.CancelledError:
                out = None
            return cancelled, out

        cancelled, out = self.run(cancel_after())
        event(f"{op} {'cancelled' if cancelled else 'finished'}")
        if not cancelled:  # it finished first: an ordinary call
            if op == "lookup" and out.pin_id:
                self.check_served(tokens, out.slots, out.block_hashes, out.ready_pages)
                self.sessions[sid].pins[out.pin_id] = tokens[: len(out.slots) * T]
            elif op == "swap_in":
                self.after_swap_in(sid, seq, out)
            elif op == "flush":
                assert not isinstance(out, Aborted), str(out)
                self.acked |= flushable
            return
        if op == "lookup":
            assert set(session.pins) == pins_before, "a cancelled Lookup left a pin nobody can release"
        check_holders(self.store, self.ns, reads_in_flight=True)  # promotions, reads in flight
        if op == "swap_in":
            q = session.sequences[seq]
            assert q.swap_in is None, "a cancelled SwapIn left the sequence 'being swapped in'"
            if q.swapped is None:  # it got its pages before it saw the cancellation
                self.sessions[sid].seqs[seq].swapped = False
                self.check_view(sid, seq)

    # ------------------------------------------------------------ tiers

    @rule()
    def flush(self):
        flushable = self.flushable()
        r = self.call(self.admin.Flush, pb.FlushRequest())
        assert not isinstance(r, Aborted), str(r)
        self.acked |= flushable

    @rule(all_=st.booleans(), drop_cache=st.booleans())
    def evict(self, all_, drop_cache):
        """Evict (everything, or 3 pages' worth); and now and then the kernel drops the disk
        tier's pages from its page cache, so the next promotions from disk are read in flight."""
        if all_:
            self.store.evict_all("ns")
        else:
            self.store.evict_bytes("ns", 3 * PB)
        if drop_cache:
            self.drop_page_cache()

    # ------------------------------------------------------------ sessions and restarts

    @rule(
        i=picks,
        action=st.sampled_from(["open", "close", "expire"]),
        alive=st.lists(st.booleans(), min_size=3, max_size=3),
    )
    def lifecycle(self, i, action, alive):
        """Sessions come and go: opened, closed, or their lease expires (heartbeats keep some)."""
        if action == "open" and len(self.sessions) < LIMITS.max_sessions:
            self.open_session()
        elif action == "close" and self.sessions:
            sid = pick(list(self.sessions), i)
            self.store.close_session(sid)
            del self.sessions[sid]
        elif action == "expire":
            kept = [sid for sid, a in zip(self.sessions, alive, strict=False) if a]
            for _ in (0, 1):
                for sid in kept:
                    self.store.heartbeat(sid)
                self.clock.now += TTL / 2 + 0.5
            assert set(self.store.reap_expired()) == set(self.sessions) - set(kept)
            self.sessions = {sid: self.sessions[sid] for sid in kept}
        if not self.sessions:
            self.open_session()

    @rule()
    def restart(self):
        """The daemon stops and a new one starts over the same disk directory: it re-indexes
        the disk tier, deletes the swapped sequences' records, and finds every page a flush
        acknowledged, with its bytes."""
        self.store.close()
        self.sessions.clear()
        self.start()
        found, stale = reindex_disk(
            self.tiers, lambda *a: None, lambda pairs: [self.tiers.note_successor(*p) for p in pairs]
        )
        disk = self.tiers.disk
        if stale:
            disk.remove_async(stale).result(WAIT_S)
        keys = list(disk._index.entries)
        assert found == len(keys)
        for key in keys:
            assert key.namespace == "ns", f"{key} left on disk (a dead sequence's swap record)"
            assert disk.get(key) == content(key.block_hash, PB), f"disk record {key} has wrong bytes"
        lost = {k.block_hash for k in self.disk_evicted}
        for h in self.acked - lost:
            assert PageKey("ns", h) in disk, "a page a flush acknowledged is gone after a restart"
        self.open_session()
        self.open_session()

    # ------------------------------------------------------------ invariants

    @invariant()
    def core_invariants(self):
        check_pool(self.ns)
        check_holders(self.store, self.ns)
        check_host(self.tiers.host, "ns", PB, swap_keys(self.store))
        check_disk(self.tiers.disk)
        assert set(self.store.sessions) == set(self.sessions)
        for sid, s in self.sessions.items():
            session = self.store.sessions[sid]
            assert set(session.sequences) == set(s.seqs) and set(session.pins) == set(s.pins)
            for seq, m in s.seqs.items():
                assert (session.sequences[seq].swapped is not None) == m.swapped
                if not m.swapped:
                    self.check_view(sid, seq)


CoreMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("KVSTORE_MODEL_EXAMPLES", "100")),
    stateful_step_count=50,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestCoreModel = CoreMachine.TestCase


class DeviceCoreMachine(CoreMachine):
    """The same model on CI's fake device pool: the tiers move its pages only through the
    host staging path (it has no host view), and a promoted or swapped-in page must have
    landed on the "device" before anyone sees it (docs/gpu.md)."""

    spec = dataclasses.replace(SPEC, device="fake:model")


DeviceCoreMachine.TestCase.settings = settings(
    CoreMachine.TestCase.settings,
    max_examples=int(os.environ.get("KVSTORE_MODEL_DEVICE_EXAMPLES", "40")),
)
TestDeviceCoreModel = DeviceCoreMachine.TestCase
