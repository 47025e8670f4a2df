"""A put in one call (docs/api.md, "The fast path"): the session holds a credit, a sequence
with no tokens and a few RESERVED pages, granted by its previous Seal or Put. The client
copies page i of its next put into credit slot i, then Put appends the tokens with page i in
that slot, commits, releases, and grants the next credit. The pages are the session's alone
until then (reserved, like any sequence's), so nobody else can see or take them, and they go
with the session when its client dies."""

from __future__ import annotations

import contextlib
import operator
import struct
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from itertools import repeat

from kvstore.errors import FailedPrecondition, InvalidArgument, KVStoreError, ResourceExhausted
from kvstore.memory.pages import Page
from kvstore.store import put_fused, quotas, sequences, validate, zero_ahead
from kvstore.store.namespace import Namespace
from kvstore.store.sessions import Sequence, Session
from kvstore.store.store import Store
from kvstore.store.types import AppendResult, CommitResult

_slot = operator.attrgetter("slot")

# A credit is pages the cache cannot use meanwhile: at most this share of the pool.
POOL_SHARE = 8


@dataclass(frozen=True)
class Credit:
    sequence_id: int = 0  # 0: none
    slots: tuple[int, ...] = ()
    pool_epoch: int = 0
    page_sums: bool = False  # a Put into it may give its pages' checksums (takes_sums)
    unzeroed: bool = False  # its pages were handed out as they were (grant's `unzeroed_ok`)


def grant(store: Store, session: Session, ns: Namespace, pages: int, unzeroed_ok: bool = False) -> Credit:
    """A credit of `pages` pages, made room for like any allocation (it may evict); none when
    that is over 1/POOL_SHARE of the pool or the request limit, or the pool cannot spare them
    now (a smaller one would not hold a put of that size). `unzeroed_ok`: the client writes
    every byte of each page it puts into the credit (the library's put copies whole pages),
    so freed pages not zeroed yet are handed out as they are, first, and none is zeroed for
    it (docs/security.md, "Zero on free"); a page of it the put does not seal is freed dirty."""
    T = ns.spec.page_tokens
    if not 0 < pages <= min(ns.spec.num_pages // POOL_SHARE, store.limits.max_request_tokens // T):
        return Credit()
    room = quotas.credit_room(session, ns)
    if room is not None and pages > room:
        return Credit()
    unzeroed = (
        unzeroed_ok and ns.pages.zero is not None and ns.guard is not None and ns.guard.lends_unzeroed()
    )
    if not unzeroed:  # (its pages need no zeroing: no reply waits for any)
        zero_ahead.make_room(ns, pages)
    try:
        seq_id, _ = sequences.allocate(
            session, ns, store.limits, lambda: store.table.new_id(session), pages * T, b"", None, "", unzeroed
        )
    except ResourceExhausted:
        return Credit()
    seq = session.sequences[seq_id]
    seq.credit = True
    seq.max_tokens = 0  # a put into it may be longer: its cached prefix takes no credit page
    spare = seq.spare
    # Ascending: a put copies each run of consecutive slots in one go (the client library).
    return Credit(seq_id, tuple(sorted(map(_slot, spare))), ns.pool.handle.epoch, takes_sums(ns), unzeroed)


def takes_sums(ns: Namespace) -> bool:
    """Whether a Put into `ns` may give its pages' checksums: the daemon checksums its sealed
    pages (a host pool with server.page_checksums on)."""
    return ns.guard is not None and ns.guard.takes_sums()


def given_sums(page_sums: bytes, slots: Seq[int]) -> dict[int, int] | None:
    """A Put's `page_sums` (8 bytes little-endian a slot, in the order of `slots`) by slot;
    None when it gives none."""
    if not page_sums:
        return None
    if len(page_sums) != 8 * len(slots):
        raise InvalidArgument(
            f"page_sums has {len(page_sums)} bytes; give 8 a page copied ({len(slots)} slots: "
            f"{8 * len(slots)} bytes), or none"
        )
    return dict(zip(slots, struct.unpack(f"<{len(slots)}Q", page_sums), strict=True))


def unused_credit(store: Store, sid: int, seq_id: int) -> tuple[Session, Sequence]:
    session, seq = store.table.sequence(sid, seq_id)
    if not seq.credit or seq.num_tokens or seq.pages or seq.swapped is not None:
        raise FailedPrecondition(
            f"sequence_id={seq_id} is not an unused credit (one a Seal or Put granted, not put into yet)"
        )
    return session, seq


def replace(
    store: Store, sid: int, old_id: int, ns: Namespace, pages: int, unzeroed_ok: bool = False
) -> Credit:
    """Seal's credit: release the unused credit `old_id` (0: none), grant one of `pages`."""
    session = store.session(sid)
    if old_id:
        store.release_held_sequence(*unused_credit(store, sid, old_id))
    return grant(store, session, ns, pages, unzeroed_ok)


def _claim(
    store: Store,
    sid: int,
    namespace: str,
    token_ids: Seq[int],
    extra_keys: bytes,
    model_fingerprint: str,
    credit_id: int,
    slots: Seq[int],
    skip_pages: int,
) -> tuple[Session, Sequence, bytes, dict[int, Page], list[Page]]:
    """The checks of a put into credit `credit_id`: (session, the credit, the extra keys, the
    credit pages written by page index, the credit pages left). Changes nothing."""
    store.reap_pins()
    ns = store.namespace(namespace)
    session, seq = unused_credit(store, sid, credit_id)
    if seq.ns is not ns:
        raise InvalidArgument(f"credit_sequence_id={credit_id} is a credit of namespace {seq.ns.name!r}")
    ns.check_model(model_fingerprint)
    extra = validate.extra_keys(extra_keys, store.limits)
    T = ns.spec.page_tokens
    pages = -(-len(token_ids) // T)
    if skip_pages > len(token_ids) // T:
        raise InvalidArgument(f"skip_pages={skip_pages} is more than the {len(token_ids) // T} full pages")
    if len(slots) != pages - skip_pages:
        raise InvalidArgument(
            f"slots has {len(slots)} entries; the {len(token_ids)} token ids fill {pages} pages of "
            f"{T} tokens: give one slot per page after skip_pages={skip_pages}"
        )
    if skip_pages:
        tokens = validate.token_array(
            token_ids, field="token_ids", vocab_size=ns.spec.vocab_size, limits=store.limits
        )
        cached = len(ns.index.match(tokens[: skip_pages * T].tobytes(), T, extra))
        if cached < skip_pages:
            raise FailedPrecondition(
                f"skip_pages={skip_pages} but only the first {cached} pages are cached (evicted "
                "meanwhile?): copy them too and put again"
            )
    spare = {p.slot: p for p in seq.spare}
    given = list(map(spare.pop, slots, repeat(None)))  # (one dict pop a slot, in C)
    if None in given:
        i = given.index(None)
        raise InvalidArgument(
            f"slots[{i}]={slots[i]} is not an unused page of credit {credit_id} (or is given twice)"
        )
    at: dict[int, Page] = dict(zip(range(skip_pages, skip_pages + len(given)), given, strict=True))
    return session, seq, extra, at, list(spare.values())


def put(
    store: Store,
    sid: int,
    namespace: str,
    token_ids: Seq[int],
    extra_keys: bytes,
    model_fingerprint: str,
    credit_id: int,
    slots: Seq[int],
    credit_pages: int,
    skip_pages: int = 0,
    page_sums: bytes = b"",
    unzeroed_ok: bool = False,
) -> tuple[AppendResult, CommitResult, Credit]:
    """Append `token_ids` to the credit with page skip_pages + i in `slots[i]` (the first
    `skip_pages` must be cached), seal, release, grant the next credit. Fails having changed
    nothing (the credit still held) until the append is done. `page_sums`: the checksums the
    client took as it copied the pages (given_sums), kept as the sealed pages' own.
    `unzeroed_ok`: for the next credit (grant)."""
    given_sums(page_sums, slots)  # (checked before anything changes)
    prepared = prepare_put(
        store, sid, namespace, token_ids, extra_keys, model_fingerprint, credit_id, slots, credit_pages,
        skip_pages, unzeroed_ok,
    )  # fmt: skip
    return finish_put(store, prepared, page_sums)


def _append(
    store: Store,
    session: Session,
    seq: Sequence,
    token_ids: Seq[int],
    extra: bytes,
    at: dict[int, Page],
    rest: list[Page],
) -> AppendResult:
    """The put's append to its credit (`_claim`'s pages), in put_fused's one pass where it
    applies, else stepwise: nothing committed. A failed append leaves the credit as it was."""
    old_spare, old_extra = seq.spare, seq.extra_keys
    seq.spare, seq.extra_keys = rest, extra
    try:
        # One pass over the pages where nothing but the put itself can happen to them.
        done = put_fused.put(session, seq, store.limits, token_ids, at) if put_fused.applies(seq) else None
        if done is None:
            done = sequences.append(session, seq, store.limits, token_ids, spare_at=at)
    except BaseException:
        seq.spare, seq.extra_keys = old_spare, old_extra
        raise
    seq.spare.extend(at.values())  # the credit pages of cached indices: freed with the rest
    return done


# ---------------------------------------------------------------- a put whose bytes follow


@dataclass(frozen=True)
class PreparedPut:
    """A lane Put with bytes_follow between its request and its PutWritten frame (docs/api.md,
    "A put in one round trip"): its tokens appended to the credit while the client copies,
    nothing sealed, so no other call can see its pages yet."""

    session: Session
    seq: Sequence
    appended: AppendResult
    slots: tuple[int, ...]  # the credit slots being written, in the order of the page sums
    credit_pages: int
    unzeroed_ok: bool


def prepare_put(
    store: Store,
    sid: int,
    namespace: str,
    token_ids: Seq[int],
    extra_keys: bytes,
    model_fingerprint: str,
    credit_id: int,
    slots: Seq[int],
    credit_pages: int,
    skip_pages: int = 0,
    unzeroed_ok: bool = False,
) -> PreparedPut:
    """`put`'s checks and append, before the pages are written: nothing is sealed (finish_put
    seals, abandon_put gives the credit back). Fails having changed nothing, as `put` does."""
    session, seq, extra, at, rest = _claim(
        store, sid, namespace, token_ids, extra_keys, model_fingerprint, credit_id, slots, skip_pages
    )
    appended = _append(store, session, seq, token_ids, extra, at, rest)
    return PreparedPut(session, seq, appended, tuple(slots), credit_pages, unzeroed_ok)


def finish_put(
    store: Store, p: PreparedPut, page_sums: bytes = b""
) -> tuple[AppendResult, CommitResult, Credit]:
    """The pages of a prepared put are written: seal them, release the credit, grant the next
    (as `put` ends). Raises, leaving it to abandon_put, when the credit is gone meanwhile (its
    session ended) or `page_sums` is not one checksum a page written."""
    session, seq = store.table.sequence(p.session.id, p.seq.id)
    if seq is not p.seq or seq.swapped is not None:
        raise FailedPrecondition(
            f"credit_sequence_id={p.seq.id} changed while its pages were being written: put again"
        )
    sums = given_sums(page_sums, p.slots)
    guard = seq.ns.guard if sums is not None else None
    if guard is not None:
        guard.given = sums  # (Guard.sealed takes them, as in `put`)
    try:
        committed = sequences.commit(seq, seq.num_tokens)
    finally:
        if guard is not None:
            guard.given = None
    store.release_held_sequence(session, seq)
    return p.appended, committed, grant(store, session, seq.ns, p.credit_pages, p.unzeroed_ok)


def abandon_put(store: Store, p: PreparedPut) -> None:
    """A prepared put whose pages will not be sealed (its connection closed, its PutWritten
    was bad or late, or finish_put failed): its credit released, the pages it took freed
    unsealed. Nobody saw them, and the client forgets a credit whose put failed (_put.py)."""
    with contextlib.suppress(KVStoreError):  # (released already: its session ended)
        session, seq = store.table.sequence(p.session.id, p.seq.id)
        if seq is p.seq:
            store.release_held_sequence(session, seq)
