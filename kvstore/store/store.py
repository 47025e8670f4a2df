"""The store: the one mutator of metadata, as a facade. Each call resolves and checks what
the request names (session, namespace, sequence, pin, ownership) and hands the records to
the module that does the work:

- session_table.py: sessions, leases, ids and who owns them
- sequences.py (budgets.py): allocate, append, commit, view, release, drop
- lookup.py: lookup and pins; tiering/walk.py continues a lookup below the pool
- preempt.py: swap-out, swap-in, drop of a live sequence
- namespace.py: one pool's page table (page lifecycle FREE -> RESERVED -> SEALED -> FREE,
  references, eviction); tiering/ is what is below the pools

Every method is synchronous and runs on the event loop, so no critical section spans an
`await` (the calls that wait are in waits.py and namespaces.py). Errors are kvstore.errors
classes; the server edge maps them to gRPC status codes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq

from kvstore import caller
from kvstore.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    InvariantBroken,
    NotFound,
)
from kvstore.hashing import make_memo
from kvstore.memory.backend import PoolBackend
from kvstore.memory.make_pool import make_pool
from kvstore.policy import make_policy
from kvstore.store import lookup as lookups
from kvstore.store import preempt, quotas, sequences, validate
from kvstore.store.namespace import GoneKind, Namespace
from kvstore.store.pin_deadlines import PinDeadlines
from kvstore.store.quarantine import CLOSED_BY_CLIENT, Quarantine, watch_pid
from kvstore.store.session_table import SessionTable
from kvstore.store.sessions import Pin, Sequence, Session, SwapInTicket
from kvstore.store.tiering.promotion import Promotion
from kvstore.store.tiering.tiers import Tiers
from kvstore.store.types import (
    AppendResult,
    CommitResult,
    EvictResult,
    LookupResult,
    NamespaceInfo,
    NamespaceSpec,
    NamespaceStats,
    PreemptMode,
    ReleaseResult,
    SequenceOptions,
    SequenceView,
    SessionInfo,
    StoreLimits,
)
from kvstore.tiers import PageKey

log = logging.getLogger(__name__)


class Store:
    def __init__(
        self,
        limits: StoreLimits,
        shm_prefix: str,
        clock: Callable[[], float] = time.monotonic,
        tiers: Tiers | None = None,
    ):
        self.limits = limits
        self.tiers = tiers  # host DRAM / LMDB below every pool; None: evicted pages are gone
        self.shm_prefix = shm_prefix
        self.namespaces: dict[str, Namespace] = {}  # loop-owned
        self.table = SessionTable(limits, clock)
        self.sessions = self.table.sessions  # loop-owned: session id -> Session
        self.pin_deadlines = PinDeadlines()  # pins that end by themselves (LookupRequest.pin_ttl_ms)
        self.quarantine = Quarantine(clock, limits.quarantine_grace_s)  # a dead client's device pages
        if tiers is not None:
            tiers.on_lost = self._page_lost
        self.attach: Callable[[Namespace], None] = lambda ns: None  # integrity (store/integrity.py)
        self.hash_memo = make_memo(limits.hash_memo_entries, limits.hash_memo_bytes)  # lookups' hashes

    def _page_lost(self, key: PageKey, by: str, why: str, kind: GoneKind) -> None:
        """A tier below the pool lost a page for good (full, or corrupt): Explain's ghost."""
        ns = self.namespaces.get(key.namespace)
        if ns is not None:
            ns.remember_gone(key.block_hash, by, why, kind)

    @property
    def lease_check_interval_s(self) -> float:
        return max(0.05, min(1.0, self.limits.lease_ttl_default_s / 4))

    # ------------------------------------------------------------ namespaces

    def check_new_namespace(self, spec: NamespaceSpec) -> None:
        validate.namespace_spec(spec, self.limits)
        if spec.name in self.namespaces:
            raise AlreadyExists(f"namespace {spec.name!r} already exists")
        quotas.check_pool_bytes(self.namespaces.values(), spec, self.limits)

    def create_pool(self, spec: NamespaceSpec) -> PoolBackend:
        """Create and back the pool (a new epoch). Touches no metadata: may run in a thread."""
        return make_pool(
            self.shm_prefix,
            spec.name,
            spec.device,
            spec.page_stride,
            spec.num_pages,
            self.limits.device_staging_bytes,
        )

    def add_namespace(self, spec: NamespaceSpec, pool: PoolBackend) -> NamespaceInfo:
        try:
            self.check_new_namespace(spec)
        except Exception:
            pool.close()
            raise
        ns = self.namespaces[spec.name] = Namespace(spec, pool, make_policy(spec.policy), self.tiers)
        ns.index.memo = self.hash_memo
        self.attach(ns)
        log.info(
            "namespace %s: %d pages x %d bytes (%s, %d tokens/page), policy %s",
            *(spec.name, spec.num_pages, spec.page_bytes, spec.dtype, spec.page_tokens, spec.policy),
        )
        return ns.info()

    def create_namespace(self, spec: NamespaceSpec) -> NamespaceInfo:
        self.check_new_namespace(spec)
        return self.add_namespace(spec, self.create_pool(spec))

    def namespace(self, name: str) -> Namespace:
        ns = self.namespaces.get(name)
        if ns is None:
            known = ", ".join(sorted(n for n in self.namespaces if caller.sees(n))) or "(none)"
            raise NotFound(f"namespace {name!r} does not exist; known: {known}")
        return ns

    # ------------------------------------------------------------ sessions

    def open_session(
        self, client_name: str, lease_ttl_s: float, pid: int = 0, pid_ns: int = 0
    ) -> SessionInfo:
        info = self.table.open(client_name, lease_ttl_s, caller.client_key(client_name, pid, pid_ns))
        self.sessions[info.session_id].pidfd = watch_pid(pid, pid_ns)
        return info

    def session(self, sid: int) -> Session:
        """The live session `sid`, its lease renewed (any request is a sign of life)."""
        return self.table.get(sid)

    def heartbeat(self, sid: int) -> float:
        """Renew the lease; returns seconds until it expires."""
        return self.table.get(sid).lease_ttl_s

    def attach_stream(self, sid: int) -> Session:
        session = self.table.get(sid)
        session.streams += 1
        return session

    def detach_stream(self, sid: int) -> None:
        """A keep-alive stream ended. The last one ending means the client is gone."""
        session = self.sessions.get(sid)
        if session is None or session.streams == 0:
            return
        session.streams -= 1
        if session.streams == 0:
            self.close_session(sid, "keep-alive stream broke")

    def close_session(self, sid: int, why: str = CLOSED_BY_CLIENT) -> ReleaseResult:
        session = self.table.get(sid)
        freed = unpinned = 0
        self.quarantine.session_ends(session, clean=why == CLOSED_BY_CLIENT)
        for seq in list(session.sequences.values()):
            r = self.release_held_sequence(session, seq)
            freed += r.pages_freed
            unpinned += r.pages_unpinned
        for pin in list(session.pins.values()):
            unpinned += self.release_held_pin(session, pin).pages_unpinned
        self.table.end(session, why)
        log.info("session %d ended (%s): %d pages freed, %d unpinned", sid, why, freed, unpinned)
        return ReleaseResult(freed, unpinned)

    def reap_expired(self) -> list[int]:
        self.reap_pins()
        self.quarantine.reap(self.namespaces)
        expired = self.table.expired()
        for sid in expired:
            self.close_session(sid, "lease expired")
        return expired

    def reap_pins(self) -> int:
        """Release the pins whose deadline has passed (run by the reaper's tick, and first by
        every call that may need room); how many."""
        n = 0
        for sid, pin_id in self.pin_deadlines.due():
            session = self.sessions.get(sid)
            pin = session.pins.get(pin_id) if session is not None else None
            if pin is not None:  # (else released already, or with its session)
                self.release_held_pin(session, pin)
                n += 1
        self.pin_deadlines.expired += n
        return n

    def session_infos(self) -> list[SessionInfo]:
        return self.table.infos()

    # ------------------------------------------------------------ sequences

    def _live_sequence(self, sid: int, seq_id: int) -> tuple[Session, Sequence]:
        session, seq = self.table.sequence(sid, seq_id)
        if seq.swapped is not None:
            raise FailedPrecondition(f"sequence {seq_id} is swapped out; SwapIn first")
        return session, seq

    def allocate(
        self,
        sid: int,
        namespace: str,
        max_tokens: int,
        extra_keys: bytes,
        options: SequenceOptions | None = None,
        model_fingerprint: str = "",
    ) -> tuple[int, int]:
        self.reap_pins()
        session = self.table.get(sid)
        ns = self.namespace(namespace)
        return sequences.allocate(
            session,
            ns,
            self.limits,
            lambda: self.table.new_id(session),
            max_tokens,
            extra_keys,
            options,
            model_fingerprint,
        )

    def append(self, sid: int, seq_id: int, token_ids: Seq[int]) -> AppendResult:
        self.reap_pins()
        session, seq = self._live_sequence(sid, seq_id)
        return sequences.append(session, seq, self.limits, token_ids)

    def commit(self, sid: int, seq_id: int, num_tokens: int, written_slots: Seq[int] = ()) -> CommitResult:
        """The client wrote the first `num_tokens` tokens: seal every full page among them."""
        _, seq = self._live_sequence(sid, seq_id)
        return sequences.commit(seq, num_tokens, written_slots)

    def sequence_view(self, sid: int, seq_id: int) -> SequenceView:
        _, seq = self.table.sequence(sid, seq_id)
        return sequences.view(seq)

    def report_importance(self, sid: int, seq_id: int, scores: Seq[float]) -> int:
        """Replace an IMPORTANCE sequence's page scores (scores[i] = page i); returns pages held."""
        _, seq = self._live_sequence(sid, seq_id)
        return sequences.report_importance(seq, scores)

    def release_sequence(self, sid: int, seq_id: int) -> ReleaseResult:
        return self.release_held_sequence(*self.table.sequence(sid, seq_id))

    def release_held_sequence(self, session: Session, seq: Sequence) -> ReleaseResult:
        """Release a sequence the caller has found in `session` (its pages, its id)."""
        r = sequences.release(self.tiers, seq)
        del session.sequences[seq.id]
        self.table.forget_id(seq.id)
        return r

    # ------------------------------------------------------------ preemption

    def preempt(self, sid: int, seq_id: int, mode: PreemptMode) -> tuple[int, int]:
        """(pages below the pool for it now, pool pages freed)."""
        _, seq = self.table.sequence(sid, seq_id)
        try:
            mode = PreemptMode(mode)
        except ValueError:
            raise InvalidArgument(
                f"mode={mode!r} is not a preemption; give PREEMPT_SWAP_OUT or PREEMPT_DROP"
            ) from None
        if mode is PreemptMode.SWAP_OUT:
            seq.ns.evicting_for = f"swap_out of sequence {seq_id}"
            try:
                return preempt.swap_out(self.tiers, seq)
            finally:
                seq.ns.evicting_for = ""
        return 0, sequences.drop(self.tiers, seq)

    def begin_swap_in(self, sid: int, seq_id: int) -> SwapInTicket:
        _, seq = self.table.sequence(sid, seq_id)
        try:
            return preempt.begin_swap_in(self.tiers, seq)
        except DataLoss:
            sequences.drop(self.tiers, seq)
            raise

    def finish_swap_in(self, ticket: SwapInTicket) -> SequenceView:
        try:
            preempt.finish_swap_in(self.tiers, ticket)
        except DataLoss:
            sequences.drop(self.tiers, ticket.seq)
            raise
        return self.sequence_view(ticket.seq.session_id, ticket.seq.id)

    def abort_swap_in(self, ticket: SwapInTicket) -> None:
        """The SwapIn call went away (cancelled): the sequence stays swapped out, as it was."""
        preempt.abort_swap_in(ticket)

    # ------------------------------------------------------------ lookup and pins

    def lookup(
        self,
        sid: int,
        namespace: str,
        token_ids: Seq[int],
        extra_keys: bytes,
        pin: bool,
        model_fingerprint: str = "",
        return_in_flight: bool = False,
    ) -> LookupResult:
        if pin and not sid:
            raise InvalidArgument("pin=true needs a session_id: pins are held by a session")
        if return_in_flight and not pin:
            raise InvalidArgument(
                "return_in_flight=true needs pin=true: an unpinned page may be evicted before it is read"
            )
        self.reap_pins()  # (promotions may need room)
        session = self.table.get(sid) if sid else None
        ns = self.namespace(namespace)
        ns.check_model(model_fingerprint)

        def new_id() -> int:
            if session is None:
                raise InvariantBroken("a pin without a session")
            return self.table.new_id(session)

        return lookups.lookup(session, ns, self.tiers, self.limits, new_id, token_ids, extra_keys, pin)

    def settle_lookup(self, r: LookupResult) -> LookupResult:
        """The lookup once its promotions have settled: the hit ends before the first that
        failed (a page whose bytes did not verify is never served). A pin's hit counters
        were corrected as they failed (Pin.settled)."""
        return lookups.settle(self.namespace(r.namespace), r)

    def pin_progress(self, sid: int, pin_id: int) -> tuple[list[int], int, Promotion | None]:
        """(slots of the pages ready, pages in the pin, the first page still in flight or None)."""
        _, pin = self.table.pin(sid, pin_id)
        return lookups.pin_progress(pin)

    def release_pin(self, sid: int, pin_id: int) -> ReleaseResult:
        return self.release_held_pin(*self.table.pin(sid, pin_id))

    def release_held_pin(self, session: Session, pin: Pin) -> ReleaseResult:
        """Release a pin the caller has found in `session` (its references, its id)."""
        r = lookups.release_pin(pin)
        del session.pins[pin.id]
        self.table.forget_id(pin.id)
        return r

    # ------------------------------------------------------------ eviction

    def evict_all(self, namespace: str) -> EvictResult:
        return self.namespace(namespace).evict_while(lambda freed: True, "Evict RPC (all)")

    def evict_bytes(self, namespace: str, nbytes: int) -> EvictResult:
        ns = self.namespace(namespace)
        limit = ns.spec.page_bytes * len(ns.pages)
        validate.non_negative(
            "bytes", nbytes, limit, f"KV bytes of namespace {namespace!r} (num_pages x page_bytes)"
        )
        return ns.evict_while(lambda freed: freed < nbytes, f"Evict RPC (bytes={nbytes})")

    def evict_prefix(self, namespace: str, token_ids: Seq[int], extra_keys: bytes) -> EvictResult:
        """The page ending the prefix's last full page, and every page that extends it."""
        ns = self.namespace(namespace)
        tokens = validate.token_array(
            token_ids, field="prefix.token_ids", vocab_size=ns.spec.vocab_size, limits=self.limits
        )
        extra = validate.extra_keys(extra_keys, self.limits)
        path = ns.index.match(tokens.tobytes(), ns.spec.page_tokens, extra)
        if not path or len(path) < len(tokens) // ns.spec.page_tokens:
            return EvictResult()  # the prefix's last full page is not resident
        return ns.evict_subtree(path[-1], f"Evict RPC (prefix of {len(tokens)} tokens)")

    # ------------------------------------------------------------ stats and shutdown

    def stats(self, namespace: str = "") -> list[NamespaceStats]:
        if namespace:
            return [self.namespace(namespace).stats()]
        return [ns.stats() for ns in self.namespaces.values()]

    def close(self) -> None:
        """End every session and unlink every pool segment. Idempotent."""
        try:
            for sid in list(self.sessions):
                self.close_session(sid, "daemon shut down")
            self.quarantine.close()
        finally:
            try:
                if self.tiers is not None:
                    self.tiers.close()  # the disk writer commits and fsyncs what is queued
            finally:
                for ns in self.namespaces.values():  # whatever went wrong above, leave no segment behind
                    ns.pool.close()
