"""The store: the one mutator of metadata. Sessions, sequences, pins, and the
page lifecycle FREE -> RESERVED -> SEALED -> FREE across namespaces.

Every method is synchronous and runs on the event loop, so no critical
section spans an `await`. Errors are kvstore.errors classes; the server edge
maps them to gRPC status codes.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import Any

from kvstore.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    InvariantBroken,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
)
from kvstore.hashing import BlockHash, chain, iter_block_hashes
from kvstore.memory.backend import PoolBackend
from kvstore.memory.pages import Page, PageState
from kvstore.memory.shm_pool import ShmPool
from kvstore.policy import make_policy
from kvstore.store import live_mrc, preempt, promote_walk, validate
from kvstore.store.explain import Explanation
from kvstore.store.explain import explain as explain_prompt
from kvstore.store.live_mrc import remember_lookup
from kvstore.store.namespace import Namespace
from kvstore.store.sessions import Pin, Sequence, Session
from kvstore.store.tiering import Promotion, Tiers
from kvstore.store.types import (
    IMPORTANCE,
    SLIDING_WINDOW,
    AppendResult,
    CommitResult,
    EvictResult,
    LookupResult,
    NamespaceInfo,
    NamespaceSpec,
    NamespaceStats,
    PageRef,
    ReleaseResult,
    SequenceOptions,
    SequenceView,
    SessionInfo,
    StoreLimits,
)
from kvstore.tiers import PageKey

log = logging.getLogger(__name__)

# A lease shorter than this would have the keep-alive stream and the reaper busy the one
# event loop that serves every client.
MIN_LEASE_TTL_S = 0.5
ENDED_SESSIONS_REMEMBERED = 10_000  # so a late request gets "ended (why)" rather than "unknown"


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
        self._clock = clock
        self.namespaces: dict[str, Namespace] = {}  # loop-owned
        self.sessions: dict[int, Session] = {}  # loop-owned
        self._ended: OrderedDict[int, str] = OrderedDict()  # session id -> why it ended
        self._owner: dict[int, Session] = {}  # sequence or pin id -> its session
        self._next_id = 1  # sequence and pin ids share one space
        if tiers is not None:
            tiers.on_lost = self._page_lost

    def _page_lost(self, key: PageKey, by: str, why: str, kind: str) -> None:
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

    def create_pool(self, spec: NamespaceSpec) -> PoolBackend:
        """Create and back the pool (a new epoch). Touches no metadata: may run in a thread."""
        return ShmPool.create_for(self.shm_prefix, spec.name, spec.page_stride * spec.num_pages)

    def add_namespace(self, spec: NamespaceSpec, pool: PoolBackend) -> NamespaceInfo:
        try:
            self.check_new_namespace(spec)
        except Exception:
            pool.close()
            raise
        ns = Namespace(spec, pool, make_policy(spec.policy), self.tiers)
        self.namespaces[spec.name] = ns
        log.info(
            "namespace %s: %d pages x %d bytes (%s, %d tokens/page), policy %s",
            spec.name,
            spec.num_pages,
            spec.page_bytes,
            spec.dtype,
            spec.page_tokens,
            spec.policy,
        )
        return ns.info()

    def create_namespace(self, spec: NamespaceSpec) -> NamespaceInfo:
        self.check_new_namespace(spec)
        return self.add_namespace(spec, self.create_pool(spec))

    def namespace(self, name: str) -> Namespace:
        ns = self.namespaces.get(name)
        if ns is None:
            known = ", ".join(sorted(self.namespaces)) or "(none)"
            raise NotFound(f"namespace {name!r} does not exist; known: {known}")
        return ns

    # ------------------------------------------------------------ sessions

    def open_session(self, client_name: str, lease_ttl_s: float) -> SessionInfo:
        if lease_ttl_s < 0 or 0 < lease_ttl_s < MIN_LEASE_TTL_S:
            raise InvalidArgument(
                f"lease_ttl_ms={round(lease_ttl_s * 1000)} is {'negative' if lease_ttl_s < 0 else 'too short'}: "
                f"it must be 0 (the daemon's default) or at least {round(MIN_LEASE_TTL_S * 1000)}"
            )
        ttl = min(lease_ttl_s or self.limits.lease_ttl_default_s, self.limits.lease_ttl_max_s)
        if len(self.sessions) >= self.limits.max_sessions:
            raise ResourceExhausted(
                f"{len(self.sessions)} sessions are open; the limit is max_sessions={self.limits.max_sessions}"
            )
        sid = secrets.randbits(63) or 1  # unguessable, and never reused by a restarted daemon
        now = self._clock()
        self.sessions[sid] = Session(sid, client_name[:128], ttl, now + ttl, now)
        log.info("session %d opened by %r (lease %.1fs)", sid, client_name, ttl)
        return SessionInfo(sid, client_name, ttl)

    def session(self, sid: int) -> Session:
        """The live session `sid`, its lease renewed (any request is a sign of life)."""
        session = self.sessions.get(sid)
        if session is None:
            if sid in self._ended:
                raise FailedPrecondition(f"session {sid} has ended ({self._ended[sid]}); open a new session")
            raise NotFound(f"session_id={sid} does not exist")
        now = self._clock()
        session.last_seen = now
        session.expires_at = now + session.lease_ttl_s
        return session

    def heartbeat(self, sid: int) -> float:
        """Renew the lease; returns seconds until it expires."""
        return self.session(sid).lease_ttl_s

    def attach_stream(self, sid: int) -> Session:
        session = self.session(sid)
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

    def close_session(self, sid: int, why: str = "closed by client") -> ReleaseResult:
        session = self.session(sid)
        freed = unpinned = 0
        for seq in list(session.sequences.values()):
            r = self._release_sequence(session, seq)
            freed += r.pages_freed
            unpinned += r.pages_unpinned
        for pin in list(session.pins.values()):
            unpinned += self._release_pin(session, pin).pages_unpinned
        del self.sessions[sid]
        self._ended[sid] = why
        while len(self._ended) > ENDED_SESSIONS_REMEMBERED:
            self._ended.popitem(last=False)
        log.info("session %d ended (%s): %d pages freed, %d unpinned", sid, why, freed, unpinned)
        return ReleaseResult(freed, unpinned)

    def reap_expired(self) -> list[int]:
        now = self._clock()
        expired = [s.id for s in self.sessions.values() if s.streams == 0 and now > s.expires_at]
        for sid in expired:
            self.close_session(sid, "lease expired")
        return expired

    def session_infos(self) -> list[SessionInfo]:
        now = self._clock()
        return [
            SessionInfo(
                s.id,
                s.client_name,
                s.lease_ttl_s,
                len(s.sequences),
                len(s.pins),
                now - s.last_seen,
                s.streams > 0,
            )
            for s in self.sessions.values()
        ]

    # ------------------------------------------------------------ sequences

    def _new_id(self, session: Session) -> int:
        nid = self._next_id
        self._next_id += 1
        self._owner[nid] = session
        return nid

    def _sequence(self, sid: int, seq_id: int) -> tuple[Session, Sequence]:
        session = self.session(sid)
        seq = session.sequences.get(seq_id)
        if seq is None:
            if self._owner.get(seq_id, session) is not session:
                raise PermissionDenied(f"sequence_id={seq_id} belongs to another session, not {sid}")
            raise NotFound(f"sequence_id={seq_id} does not exist in session {sid}")
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
        session = self.session(sid)
        ns = self.namespace(namespace)
        ns.check_model(model_fingerprint)
        validate.non_negative("max_tokens", max_tokens, self.limits.max_request_tokens, "max_request_tokens")
        options = options or SequenceOptions()
        validate.sequence_options(options, max_tokens, ns.spec.page_tokens)
        extra = validate.extra_keys(extra_keys, self.limits)
        pages_needed = -(-max_tokens // ns.spec.page_tokens)
        if pages_needed:
            ns.make_room(pages_needed, f"allocate(max_tokens={max_tokens})")
        seq = Sequence(self._new_id(session), sid, ns, extra, max_tokens, ns.index.root, options=options)
        seq.spare = [ns.reserve(seq.id) for _ in range(pages_needed)]
        session.sequences[seq.id] = seq
        ns.sequences += 1
        return seq.id, pages_needed

    def append(self, sid: int, seq_id: int, token_ids: Seq[int]) -> AppendResult:
        session, seq = self._live_sequence(sid, seq_id)
        ns = seq.ns
        T = ns.spec.page_tokens
        tokens = validate.token_array(
            token_ids, field="token_ids", vocab_size=ns.spec.vocab_size, limits=self.limits
        ).tobytes()
        n = len(tokens) // 4
        if seq.max_tokens and seq.num_tokens + n > seq.max_tokens:
            raise OutOfRange(
                f"append of {n} tokens to sequence {seq_id} ({seq.num_tokens} tokens) exceeds its "
                f"max_tokens={seq.max_tokens}"
            )
        fill = seq.num_tokens % T
        into_tail = min(T - fill, n) if fill else 0
        old_pages = len(seq.pages)
        tail_index = old_pages - 1
        # The budget's drops (held pages, or new ones never held), and the cut they imply:
        # pages above the lowest dropped index are private (no hash, never sealed).
        budgeted = seq.options.mode in (SLIDING_WINDOW, IMPORTANCE)
        drops = self._budget_drops(seq, seq.num_tokens + n) if budgeted else []
        dropset = set(drops)
        cut = seq.cut
        if drops and (cut is None or drops[0] < cut):
            cut = drops[0]
        # Plan without changing anything: the hash of each public page this append fills,
        # and which new full pages are already cached (only while every page so far is
        # sealed: a cached page needs a sealed parent).
        parent = seq.last_hash
        tail_hash = None
        if into_tail and fill + into_tail == T and (cut is None or tail_index < cut):
            tail_hash = parent = chain(parent, seq.tail_tokens + tokens[: 4 * into_tail], seq.extra_keys)
        prefix_phase = all(p is not None and p.state is PageState.SEALED for p in seq.pages)
        # (index, start, count, hash, cached, dropped)
        plan: list[tuple[int, int, int, BlockHash | None, Page | None, bool]] = []
        for i, start in enumerate(range(into_tail, n, T), old_pages):
            count = min(T, n - start)
            block_hash = cached = None
            dropped = i in dropset
            if count == T and not dropped and (cut is None or i < cut):
                block_hash = parent = chain(parent, tokens[4 * start : 4 * (start + T)], seq.extra_keys)
                if prefix_phase:
                    cached = ns.index.get(block_hash)
                    prefix_phase = cached is not None
            else:
                prefix_phase = False
            plan.append((i, start, count, block_hash, cached, dropped))
        hits = [e[4] for e in plan if e[4] is not None]
        for page in hits:  # pin the planned hits so making room cannot evict them
            ns.ref(page)
        new_pages = sum(e[4] is None and not e[5] for e in plan)
        freed = 0  # reserved pages the drops give back
        for i in drops:
            old = seq.pages[i] if i < old_pages else None
            freed += old is not None and old.state is PageState.RESERVED
        to_reserve = max(0, new_pages - len(seq.spare) - freed)
        try:
            ns.make_room(to_reserve, f"append of {n} tokens to sequence {seq_id}")
        except Exception:
            for page in hits:
                ns.unref(page)
            raise
        # Carry out the plan: nothing below can fail. Drops first, so their pages are free.
        if drops:
            self._drop_pages(seq, drops, cut)
        refs: list[PageRef] = []
        if into_tail:
            seq.tail_tokens += tokens[: 4 * into_tail]
            if fill + into_tail == T:
                seq.tail_tokens = b""
            page = seq.pages[tail_index]
            if page is not None:
                if tail_hash is not None:
                    page.block_hash = seq.last_hash = tail_hash
                refs.append(
                    PageRef(
                        tail_index,
                        page.slot,
                        False,
                        fill,
                        into_tail,
                        tail_hash or b"",
                        seq.private(tail_index),
                    )
                )
        if hits:
            ns.touch(hits)
        for i, start, count, block_hash, cached, dropped in plan:
            if count < T:
                seq.tail_tokens = tokens[4 * start : 4 * (start + count)]
            if dropped:
                seq.pages.append(None)
                continue
            page = cached or (seq.spare.pop() if seq.spare else ns.reserve(seq.id))
            if block_hash is not None:
                seq.last_hash = block_hash
                if cached is None:
                    page.block_hash = block_hash
            refs.append(
                PageRef(i, page.slot, cached is not None, 0, count, block_hash or b"", seq.private(i))
            )
            seq.pages.append(page)
            seq.held += 1
        seq.num_tokens += n
        if tail_hash is not None or plan:
            self._sample_append(session, seq, tail_index, tail_hash, plan)
        return AppendResult(seq.num_tokens, refs, T * len(hits), drops)

    @staticmethod
    def _sample_append(
        session: Session, seq: Sequence, tail_index: int, tail_hash: BlockHash | None, plan: list[Any]
    ) -> None:
        """The MRC's accesses of an append: every page it hashed, less the leading pages a
        lookup of this session already counted for the same prompt (kvstore/store/live_mrc.py)."""
        hashed = [(i, h) for i, _, _, h, _, _ in plan if h is not None]
        if tail_hash is not None:
            hashed.insert(0, (tail_index, tail_hash))
        if not hashed:
            return
        if hashed[0][0] == 0:  # the sequence's first page: did a lookup count this prompt?
            seq.mrc_skip = session.mrc_lookups.pop(hashed[0][1], 0)
        skip, cut = seq.mrc_skip, seq.ns.mrc.cut
        counted = [h for i, h in hashed if i >= skip]
        seq.ns.mrc.add(len(counted), [h for h in counted if h < cut])

    def _budget_drops(self, seq: Sequence, total_tokens: int) -> list[int]:
        """The page indices the sequence's budget drops when it grows to `total_tokens`."""
        o = seq.options
        T = seq.ns.spec.page_tokens
        npages = -(-total_tokens // T)
        sinks = -(-o.sink_tokens // T)
        if o.mode == SLIDING_WINDOW:
            # Every index in [max(sinks, window_lo), lo) is held or new: earlier ones are gone.
            lo = max(0, total_tokens - o.window_tokens) // T  # <= npages - 1: the last page stays
            return list(range(max(sinks, seq.window_lo), lo))
        old = len(seq.pages)
        candidates = [i for i, p in enumerate(seq.pages) if p is not None]
        candidates.extend(range(old, npages))
        excess = len(candidates) - o.budget_pages
        if excess <= 0:
            return []
        # Never a sink, never the last page; unscored pages rank highest; ties: oldest first.
        # budget_pages >= sinks + 1 guarantees enough candidates.
        pool = [i for i in candidates if sinks <= i < npages - 1]
        pool.sort(key=lambda i: (seq.scores.get(i, math.inf), i))
        return sorted(pool[:excess])

    def _drop_pages(self, seq: Sequence, drops: list[int], cut: int) -> None:
        """Release the held pages among `drops` and make the pages above `cut` private."""
        ns = seq.ns
        for i in reversed(drops):  # leaves first
            if i < len(seq.pages):
                page = seq.pages[i]
                if page is not None:
                    if page.state is PageState.RESERVED:
                        ns.free_reserved(page)
                    else:
                        ns.unref(page)  # stays cached for others
                    seq.pages[i] = None
                    seq.held -= 1
            seq.scores.pop(i, None)
        ns.budget_dropped_pages += len(drops)
        if seq.options.mode == SLIDING_WINDOW:
            seq.window_lo = max(seq.window_lo, drops[-1] + 1)
        # Reserved pages above the new cut lose their hash: they can never be sealed. Those
        # above an older cut lost it then.
        upper = len(seq.pages) if seq.cut is None else seq.cut
        for i in range(cut + 1, upper):
            page = seq.pages[i]
            if page is not None and page.state is PageState.RESERVED:
                page.block_hash = None
        seq.cut = cut

    def commit(self, sid: int, seq_id: int, num_tokens: int, written_slots: Seq[int] = ()) -> CommitResult:
        """The client wrote the first `num_tokens` tokens: seal every full page among them."""
        _, seq = self._live_sequence(sid, seq_id)
        ns = seq.ns
        if num_tokens < 0 or num_tokens > seq.num_tokens:
            raise OutOfRange(
                f"num_tokens={num_tokens} must be in [0, {seq.num_tokens}] (tokens in sequence {seq_id})"
            )
        for slot in written_slots:
            page = ns.pages.pages[slot] if 0 <= slot < len(ns.pages) else None
            if page is None or page.state is not PageState.RESERVED or page.owner != seq.id:
                raise PermissionDenied(
                    f"written_slots has slot {slot}, which is not a writable page of sequence {seq_id} "
                    f"in namespace {ns.name!r} (pool has {len(ns.pages)} pages)"
                )
        T = ns.spec.page_tokens
        sealed = dedup = 0
        moved: list[PageRef] = []
        for i in range(seq.committed_tokens // T, num_tokens // T):
            page = seq.pages[i]
            if page is None or page.state is PageState.SEALED or seq.private(i):
                continue  # dropped; a cached page, or sealed by an earlier commit; private
            if page.block_hash is None:
                raise InvariantBroken(f"sequence {seq_id}: full public page {i} has no block hash")
            existing = ns.index.get(page.block_hash)
            if existing is not None:
                # Another sequence sealed the same prefix first: share its page, free ours.
                ns.ref(existing)
                ns.touch([existing])
                ns.free_reserved(page)
                seq.pages[i] = existing
                ns.deduplicated_pages += 1
                dedup += 1
                moved.append(PageRef(i, existing.slot, True, 0, T, existing.block_hash or b""))
            else:
                ns.seal(page, seq.pages[i - 1] if i else None)  # below any cut: parent held
                sealed += 1
        seq.committed_tokens = max(seq.committed_tokens, num_tokens)
        return CommitResult(sealed, dedup, moved)

    def sequence_view(self, sid: int, seq_id: int) -> SequenceView:
        _, seq = self._sequence(sid, seq_id)
        T = seq.ns.spec.page_tokens
        refs = []
        dropped = []
        for i, page in enumerate(seq.pages):
            if page is None:
                dropped.append(i)
                continue
            count = min(T, seq.num_tokens - i * T)
            refs.append(
                PageRef(
                    i,
                    page.slot,
                    page.state is PageState.SEALED,
                    0,
                    count,
                    page.block_hash or b"",
                    page.state is PageState.RESERVED and seq.private(i),
                )
            )
        return SequenceView(seq.ns.name, seq.num_tokens, seq.committed_tokens, refs, dropped, seq.options)

    def report_importance(self, sid: int, seq_id: int, scores: Seq[float]) -> int:
        """Replace an IMPORTANCE sequence's page scores (scores[i] = page i); returns pages held."""
        _, seq = self._live_sequence(sid, seq_id)
        if seq.options.mode != IMPORTANCE:
            raise FailedPrecondition(
                f"sequence {seq_id} has options.mode={seq.options.mode}: importance is only taken by "
                f"sequences allocated with options.mode={IMPORTANCE}"
            )
        if len(scores) != len(seq.pages):
            raise InvalidArgument(
                f"scores has {len(scores)} values but sequence {seq_id} has {len(seq.pages)} pages "
                f"({seq.num_tokens} tokens): give one score per page index, dropped pages included"
            )
        for i, score in enumerate(scores):
            if not math.isfinite(score):
                raise InvalidArgument(f"scores[{i}]={score} is not a finite number")
        seq.scores = {i: float(v) for i, v in enumerate(scores) if seq.pages[i] is not None}
        return seq.held

    def release_sequence(self, sid: int, seq_id: int) -> ReleaseResult:
        session, seq = self._sequence(sid, seq_id)
        return self._release_sequence(session, seq)

    def _release_sequence(self, session: Session, seq: Sequence) -> ReleaseResult:
        ns = seq.ns
        preempt.discard_swapped(seq)
        freed = unpinned = 0
        for page in reversed(seq.pages + seq.spare):  # leaves first
            if page is None:
                continue
            if page.state is PageState.RESERVED:
                ns.free_reserved(page)
                freed += 1
            else:
                ns.unref(page)
                unpinned += 1
        del session.sequences[seq.id]
        del self._owner[seq.id]
        ns.sequences -= 1
        return ReleaseResult(freed, unpinned)

    # ------------------------------------------------------------ preemption

    def _live_sequence(self, sid: int, seq_id: int) -> tuple[Session, Sequence]:
        session, seq = self._sequence(sid, seq_id)
        if seq.swapped is not None:
            raise FailedPrecondition(f"sequence {seq_id} is swapped out; SwapIn first")
        return session, seq

    def preempt(self, sid: int, seq_id: int, mode: str) -> tuple[int, int]:
        """mode "swap_out" or "drop": (pages below the pool for it now, pool pages freed)."""
        _, seq = self._sequence(sid, seq_id)
        if mode == "swap_out":
            seq.ns.evicting_for = f"swap_out of sequence {seq_id}"
            try:
                return preempt.swap_out(seq)
            finally:
                seq.ns.evicting_for = ""
        if mode == "drop":
            return 0, self._drop(seq)
        raise InvalidArgument(f"mode={mode!r} is not a preemption; give PREEMPT_SWAP_OUT or PREEMPT_DROP")

    def _drop(self, seq: Sequence) -> int:
        """Free every page of the sequence and empty it (same id, same budget and spare pages)."""
        ns = seq.ns
        preempt.discard_swapped(seq)
        freed = 0
        for page in reversed(seq.pages):
            if page is None:
                continue
            if page.state is PageState.RESERVED:
                ns.free_reserved(page)
            else:
                ns.unref(page)
            freed += 1
        seq.pages, seq.held, seq.num_tokens, seq.committed_tokens = [], 0, 0, 0
        seq.tail_tokens, seq.last_hash, seq.cut, seq.window_lo, seq.scores = b"", ns.index.root, None, 0, {}
        return freed

    def begin_swap_in(self, sid: int, seq_id: int) -> preempt.SwapInTicket:
        _, seq = self._sequence(sid, seq_id)
        try:
            return preempt.begin_swap_in(seq)
        except DataLoss:
            self._drop(seq)
            raise

    def finish_swap_in(self, ticket: preempt.SwapInTicket) -> SequenceView:
        try:
            preempt.finish_swap_in(ticket)
        except DataLoss:
            self._drop(ticket.seq)
            raise
        return self.sequence_view(ticket.seq.session_id, ticket.seq.id)

    def abort_swap_in(self, ticket: preempt.SwapInTicket) -> None:
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
        session = self.session(sid) if sid else None
        ns = self.namespace(namespace)
        ns.check_model(model_fingerprint)
        tokens = validate.token_array(
            token_ids, field="token_ids", vocab_size=ns.spec.vocab_size, limits=self.limits
        )
        extra = validate.extra_keys(extra_keys, self.limits)
        T = ns.spec.page_tokens
        hashes = iter_block_hashes(ns.index.root, tokens.tobytes(), T, extra)
        pages: list[Page] = []
        first_miss = None
        cut = ns.mrc.cut
        sampled: list[bytes] = []  # for the MRC: the blocks this lookup touches under the cut
        for block_hash in hashes:
            if block_hash < cut:
                sampled.append(block_hash)
            page = ns.index.get(block_hash)
            if page is None:
                first_miss = block_hash
                break
            pages.append(page)
        touched = len(pages) + (first_miss is not None)
        if touched:
            ns.mrc.add(touched, sampled)
            if session is not None:
                first = pages[0].block_hash if pages else first_miss
                remember_lookup(session.mrc_lookups, first or b"", touched)
        # A pin's references on the resident pages are taken first: they also keep those
        # pages from being evicted while promotions make room (no second hold to take and
        # drop, each a trip through the policy).
        pinning = pin and bool(pages)
        if pinning:
            for page in pages:
                ns.ref(page)
        proms: list[Promotion] = []
        up: list[Page] = []
        if ns.tiers is not None:
            try:
                up, proms = promote_walk.promote(ns, pages, first_miss, hashes, held_already=pinning)
            except BaseException:
                if pinning:
                    for page in pages:
                        ns.unref(page)
                raise
            if up:  # sealed from a tier just now: resident pages of the hit from here on
                pages += up
                if not pin:
                    for page in up:
                        ns.unref(page)  # (the reference _promote handed over; a pin keeps it)
        hit = (len(pages) + len(proms)) * T
        ns.lookups += 1
        ns.hit_tokens += hit
        ns.miss_tokens += len(tokens) - hit
        if pages:
            ns.touch(pages)
        ready = len(pages)
        for prom in proms:
            if not prom.ok:
                break
            ready += 1
        pin_id = 0
        if pin and hit:
            if session is None:
                raise InvariantBroken("a pin without a session")
            pinned = Pin(self._new_id(session), session.id, ns, list(pages))
            for prom in proms:
                if prom.sealed is not None:  # settled since it started
                    ns.ref(prom.sealed)
                    pinned.pages.append(prom.sealed)
                else:  # in flight: joins pinned.pages when sealed (Pin.settled)
                    prom.pins.append(pinned)
                    pinned.pending.append(prom)
            pin_id = pinned.id
            session.pins[pin_id] = pinned
        slots = [p.slot for p in pages] + [(p.sealed or p.page).slot for p in proms]
        block_hashes = [p.block_hash or b"" for p in pages] + [p.key.block_hash for p in proms]
        return LookupResult(hit, slots, block_hashes, pin_id, ready, proms, ns.name)

    def settle_lookup(self, r: LookupResult) -> LookupResult:
        """The lookup once its promotions have settled: the hit ends before the first that
        failed (a page whose bytes did not verify is never served). A pin's hit counters
        were corrected as they failed (Pin.settled)."""
        ns = self.namespace(r.namespace)
        n = len(r.slots) - len(r.promotions)
        slots, hashes = r.slots[:n], r.block_hashes[:n]
        for prom in r.promotions:
            if not prom.ok:
                break
            slots.append(prom.sealed.slot)
            hashes.append(prom.key.block_hash)
        lost = (len(r.slots) - len(slots)) * ns.spec.page_tokens
        if not r.pin_id:
            ns.hit_tokens -= lost
            ns.miss_tokens += lost
        return LookupResult(r.hit_tokens - lost, slots, hashes, r.pin_id, len(slots), [], r.namespace)

    def pin_progress(self, sid: int, pin_id: int) -> tuple[list[int], int, Promotion | None]:
        """(slots of the pages ready, pages in the pin, the first page still in flight or None)."""
        _, pin = self._pin(sid, pin_id)
        first = pin.pending[0] if pin.pending else None
        return [p.slot for p in pin.pages], len(pin.pages) + len(pin.pending), first

    def release_pin(self, sid: int, pin_id: int) -> ReleaseResult:
        return self._release_pin(*self._pin(sid, pin_id))

    def _pin(self, sid: int, pin_id: int) -> tuple[Session, Pin]:
        session = self.session(sid)
        pin = session.pins.get(pin_id)
        if pin is None:
            if self._owner.get(pin_id, session) is not session:
                raise PermissionDenied(f"pin_id={pin_id} belongs to another session, not {sid}")
            raise NotFound(f"pin_id={pin_id} does not exist in session {sid}")
        return session, pin

    def _release_pin(self, session: Session, pin: Pin) -> ReleaseResult:
        for prom in pin.pending:
            prom.pins.remove(pin)  # it is sealed unpinned, or freed, when it settles
        pin.pending.clear()
        for page in reversed(pin.pages):
            pin.ns.unref(page)
        del session.pins[pin.id]
        del self._owner[pin.id]
        return ReleaseResult(0, len(pin.pages))

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

    # ------------------------------------------------------------ explain and mrc

    def explain(
        self, namespace: str, token_ids: Seq[int], extra_keys: bytes, model_fingerprint: str = ""
    ) -> Explanation:
        """Each full page of a prompt: hit (which tier), or why not (kvstore/store/explain.py)."""
        return explain_prompt(self, namespace, token_ids, extra_keys, model_fingerprint)

    def mrc_snapshot(
        self, namespace: str, pages: Seq[int], fractions: Seq[float]
    ) -> Callable[[], live_mrc.MrcResult]:
        """Checks the request and copies the namespace's sample; the returned function
        computes the curve (slow: run it off the loop)."""
        ns = self.namespace(namespace)
        caps = live_mrc.capacities(ns.spec.num_pages, pages, fractions)
        snap = ns.mrc.snapshot()
        spec = ns.spec
        return lambda: live_mrc.curve(ns.name, ns.policy.name, spec.num_pages, spec.page_bytes, snap, caps)

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
        finally:
            try:
                if self.tiers is not None:
                    self.tiers.close()  # the disk writer commits and fsyncs what is queued
            finally:
                for ns in self.namespaces.values():  # whatever went wrong above, leave no segment behind
                    ns.pool.close()
