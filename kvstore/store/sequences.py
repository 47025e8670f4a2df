"""Sequences: allocate, append, commit, view, release, drop (docs/api.md). Each function
takes the records the store facade (kvstore/store/store.py) has resolved and checked the
ownership of; loop-owned, synchronous, and each either fails having changed nothing or
cannot fail once it starts changing pages."""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import Any

from kvstore.errors import (
    FailedPrecondition,
    InvalidArgument,
    InvariantBroken,
    OutOfRange,
    PermissionDenied,
    QuotaExceeded,
)
from kvstore.hashing import BlockHash, chain, chain_hashes
from kvstore.memory.pages import RESERVED, SEALED, Page
from kvstore.store import budgets, page_runs, preempt, quotas, validate
from kvstore.store.namespace import Namespace
from kvstore.store.sessions import Sequence, Session
from kvstore.store.tiering.tiers import Tiers
from kvstore.store.types import (
    IMPORTANCE,
    SLIDING_WINDOW,
    AppendResult,
    CommitResult,
    PageRef,
    ReleaseResult,
    SequenceOptions,
    SequenceView,
    StoreLimits,
)


def allocate(
    session: Session,
    ns: Namespace,
    limits: StoreLimits,
    new_id: Callable[[], int],
    max_tokens: int,
    extra_keys: bytes,
    options: SequenceOptions | None,
    model_fingerprint: str,
    overwritten: bool = False,
) -> tuple[int, int]:
    """A new sequence in `session`, its budget's pages reserved; `new_id` is called once room
    is made (nothing can fail after it). `overwritten`: its writer writes every byte of each
    page it seals (a credit: PageTable.take_many)."""
    ns.check_model(model_fingerprint)
    if max_tokens < 0:
        raise InvalidArgument(f"max_tokens={max_tokens} is negative; it must be >= 0")
    if max_tokens > limits.max_request_tokens:
        raise QuotaExceeded(
            "max_request_tokens",
            f"max_tokens={max_tokens}: the quota is max_request_tokens={limits.max_request_tokens}",
        )
    options = options or SequenceOptions()
    validate.sequence_options(options, max_tokens, ns.spec.page_tokens)
    extra = validate.extra_keys(extra_keys, limits)
    pages_needed = -(-max_tokens // ns.spec.page_tokens)
    quotas.check_session_pages(session, ns, pages_needed, f"allocate(max_tokens={max_tokens})")
    if pages_needed:
        ns.make_room(pages_needed, f"allocate(max_tokens={max_tokens})")
    seq = Sequence(new_id(), session.id, ns, extra, max_tokens, ns.index.root, options=options)
    seq.spare = ns.reserve_many(seq.id, pages_needed, overwritten)
    session.sequences[seq.id] = seq
    ns.sequences += 1
    return seq.id, pages_needed


def token_bytes(seq: Sequence, limits: StoreLimits, token_ids: Seq[int]) -> bytes:
    """An append's token ids, checked, as the little-endian int32 bytes hashing takes."""
    return validate.token_bytes(
        token_ids, field="token_ids", vocab_size=seq.ns.spec.vocab_size, limits=limits
    )


def append(
    session: Session,
    seq: Sequence,
    limits: StoreLimits,
    token_ids: Seq[int],
    spare_at: dict[int, Page] | None = None,
) -> AppendResult:
    """`spare_at`: reserved pages of the sequence to take for given page indices (a put into a
    credit, kvstore/store/credit.py); those left unused (the index was cached) stay in it."""
    seq_id = seq.id
    spare_at = {} if spare_at is None else spare_at
    ns = seq.ns
    T = ns.spec.page_tokens
    tokens = token_bytes(seq, limits, token_ids)
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
    drops = budgets.drops(seq, seq.num_tokens + n) if budgeted else []
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
    prefix_phase = all(p is not None and p.state is SEALED for p in seq.pages)
    # The new full pages below the cut are hashed in one call (a dropped page is at or above
    # the cut, so they are the first `full` new pages).
    full = (n - into_tail) // T
    if cut is not None:
        full = max(0, min(full, cut - old_pages))
    new_hashes = chain_hashes(parent, tokens[4 * into_tail : 4 * (into_tail + full * T)], T, seq.extra_keys)
    # (index, start, count, hash, cached, dropped)
    plan: list[tuple[int, int, int, BlockHash | None, Page | None, bool]] = []
    for i, start in enumerate(range(into_tail, n, T), old_pages):
        count = min(T, n - start)
        block_hash = cached = None
        dropped = i in dropset
        if count == T and not dropped and (cut is None or i < cut):
            block_hash = new_hashes[i - old_pages]
            if prefix_phase:
                cached = ns.index.get(block_hash)
                prefix_phase = cached is not None
        else:
            prefix_phase = False
        plan.append((i, start, count, block_hash, cached, dropped))
    hits = [e[4] for e in plan if e[4] is not None]
    new_pages = sum(e[4] is None and not e[5] and e[0] not in spare_at for e in plan)
    dropped_held = sum(i < old_pages and seq.pages[i] is not None for i in drops)
    quotas.check_session_pages(
        session, ns, len(hits) + max(0, new_pages - len(seq.spare)) - dropped_held, f"append of {n} tokens"
    )
    for page in hits:  # pin the planned hits so making room cannot evict them
        ns.ref(page)
    freed = 0  # reserved pages the drops give back
    for i in drops:
        old = seq.pages[i] if i < old_pages else None
        freed += old is not None and old.state is RESERVED
    to_reserve = max(0, new_pages - len(seq.spare) - freed)
    try:
        ns.make_room(to_reserve, f"append of {n} tokens to sequence {seq_id}")
    except Exception:
        for page in hits:
            ns.unref(page)
        raise
    # Carry out the plan: nothing below can fail. Drops first, so their pages are free.
    if drops:
        budgets.drop_pages(seq, drops, cut)
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
        page = cached or spare_at.pop(i, None) or (seq.spare.pop() if seq.spare else ns.reserve(seq.id))
        if block_hash is not None:
            seq.last_hash = block_hash
            if cached is None:
                page.block_hash = block_hash
        refs.append(PageRef(i, page.slot, cached is not None, 0, count, block_hash or b"", seq.private(i)))
        seq.pages.append(page)
        seq.held += 1
    seq.num_tokens += n
    if tail_hash is not None or plan:
        _sample_append(session, seq, tail_index, tail_hash, plan)
    return AppendResult(seq.num_tokens, refs, T * len(hits), drops)


def _sample_append(
    session: Session, seq: Sequence, tail_index: int, tail_hash: BlockHash | None, plan: list[Any]
) -> None:
    hashed = [(i, h) for i, _, _, h, _, _ in plan if h is not None]
    if tail_hash is not None:
        hashed.insert(0, (tail_index, tail_hash))
    sample_hashes(session, seq, hashed)


def sample_hashes(session: Session, seq: Sequence, hashed: list[tuple[int, BlockHash]]) -> None:
    """The MRC's accesses of an append: every page it hashed ((index, hash), in order), less
    the leading pages a lookup of this session already counted for the same prompt
    (kvstore/store/live_mrc.py)."""
    if not hashed:
        return
    if hashed[0][0] == 0:  # the sequence's first page: did a lookup count this prompt?
        seq.mrc_skip = session.mrc_lookups.pop(hashed[0][1], 0)
    skip = seq.mrc_skip
    counted = [h for i, h in hashed if i >= skip]
    seq.ns.mrc.add(len(counted), counted)


def commit(seq: Sequence, num_tokens: int, written_slots: Seq[int] = ()) -> CommitResult:
    """The client wrote the first `num_tokens` tokens: seal every full page among them."""
    seq_id = seq.id
    ns = seq.ns
    if num_tokens < 0 or num_tokens > seq.num_tokens:
        raise OutOfRange(
            f"num_tokens={num_tokens} must be in [0, {seq.num_tokens}] (tokens in sequence {seq_id})"
        )
    for slot in written_slots:
        page = ns.pages.pages[slot] if 0 <= slot < len(ns.pages) else None
        if page is None or page.state is not RESERVED or page.owner != seq.id:
            raise PermissionDenied(
                f"written_slots has slot {slot}, which is not a writable page of sequence {seq_id} "
                f"in namespace {ns.name!r} (pool has {len(ns.pages)} pages)"
            )
    T = ns.spec.page_tokens
    _check_synced(seq, range(seq.committed_tokens // T, num_tokens // T))
    sealed = dedup = 0
    moved: list[PageRef] = []
    run: list[Page] = []  # consecutive pages to seal, each under the one before it
    run_at = 0  # the index of run[0]
    index_get, cut = ns.index.get, seq.cut
    for i in range(seq.committed_tokens // T, num_tokens // T):
        page = seq.pages[i]
        if page is None or page.state is SEALED or (cut is not None and i > cut):  # seq.private(i)
            if run:  # dropped; a cached page, or sealed by an earlier commit; private
                sealed += _seal(ns, seq, run, run_at)
            continue
        if page.block_hash is None:
            if run:  # (the pages before it sealed, as one at a time would leave them)
                _seal(ns, seq, run, run_at)
            raise InvariantBroken(f"sequence {seq_id}: full public page {i} has no block hash")
        existing = index_get(page.block_hash)
        if existing is None:
            if not run:
                run_at = i
            run.append(page)
            continue
        if run:
            sealed += _seal(ns, seq, run, run_at)
        # Another sequence sealed the same prefix first: share its page, free ours.
        ns.ref(existing)
        ns.touch([existing])
        ns.free_reserved(page)
        seq.pages[i] = existing
        ns.deduplicated_pages += 1
        dedup += 1
        moved.append(PageRef(i, existing.slot, True, 0, T, existing.block_hash or b""))
    if run:
        sealed += _seal(ns, seq, run, run_at)
    seq.committed_tokens = max(seq.committed_tokens, num_tokens)
    ns.pages_committed += sealed + dedup
    return CommitResult(sealed, dedup, moved)


def _seal(ns: Namespace, seq: Sequence, run: list[Page], at: int) -> int:
    """Seal `run` (pages at..at+len-1 of `seq`) under page at-1, and empty it; how many."""
    n = len(run)
    ns.seal_run(run, seq.pages[at - 1] if at else None, seq.session_id)  # below any cut: parent held
    run.clear()
    return n


def _check_synced(seq: Sequence, indices: range) -> None:
    """Seal after sync: refuse a commit of pages with device writes the client has not
    waited for (only a backend that can see them, the fake device, ever refuses)."""
    ns = seq.ns
    if not ns.pool.handle.on_device:
        return
    slots = {}
    for i in indices:
        page = seq.pages[i]
        if page is not None and page.state is RESERVED:
            slots[ns.offset(page.slot)] = page.slot
    pending = ns.pool.unsynced(list(slots))
    if pending:
        raise FailedPrecondition(
            f"sequence {seq.id}: Commit of slots {sorted(slots[o] for o in pending)} before the writes "
            "to them were synchronized; wait for an event recorded after the last write first "
            "(seal after sync, docs/gpu.md)"
        )


def view(seq: Sequence) -> SequenceView:
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
                page.state is SEALED,
                0,
                count,
                page.block_hash or b"",
                page.state is RESERVED and seq.private(i),
            )
        )
    return SequenceView(seq.ns.name, seq.num_tokens, seq.committed_tokens, refs, dropped, seq.options)


def report_importance(seq: Sequence, scores: Seq[float]) -> int:
    """Replace an IMPORTANCE sequence's page scores (scores[i] = page i); returns pages held."""
    seq_id = seq.id
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


def release(tiers: Tiers | None, seq: Sequence) -> ReleaseResult:
    """Free or unpin every page of the sequence (and what it has below the pool); the caller
    forgets it."""
    ns = seq.ns
    preempt.discard_swapped(tiers, seq)
    freed, unpinned = page_runs.let_go(ns, seq.pages + seq.spare)
    ns.sequences -= 1
    return ReleaseResult(freed, unpinned)


def drop(tiers: Tiers | None, seq: Sequence) -> int:
    """Free every page of the sequence and empty it (same id, same budget and spare pages)."""
    ns = seq.ns
    preempt.discard_swapped(tiers, seq)
    freed = sum(page_runs.let_go(ns, seq.pages))
    seq.pages, seq.held, seq.num_tokens, seq.committed_tokens = [], 0, 0, 0
    seq.tail_tokens, seq.last_hash, seq.cut, seq.window_lo, seq.scores = b"", ns.index.root, None, 0, {}
    return freed
