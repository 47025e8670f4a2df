"""The fast path (docs/api.md, "The fast path"): a put in two calls (Reserve = allocate +
append, Seal = commit + release) and a get in one (a lookup whose pin ends by itself at a
deadline, kvstore/store/pin_deadlines.py). Compositions of the store's own calls, so their
semantics and errors are the store's."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence as Seq

from kvstore.errors import InvalidArgument, KVStoreError, OutOfRange
from kvstore.store import credit as credits
from kvstore.store import validate
from kvstore.store.store import Store
from kvstore.store.types import AppendResult, CommitResult, LookupResult, ReleaseResult, SequenceOptions


def release_pins(store: Store, sid: int, pin_ids: Seq[int]) -> None:
    """A client's earlier pins it is done with, released on its next call. An id the session
    does not hold (expired meanwhile, or never its own) is skipped: it holds nothing of ours."""
    if not pin_ids or not sid:
        return
    session = store.session(sid)
    for pin_id in pin_ids:
        pin = session.pins.get(pin_id)
        if pin is not None:
            store.release_held_pin(session, pin)


def begin_lookup(
    store: Store,
    sid: int,
    namespace: str,
    token_ids: Seq[int],
    extra_keys: bytes,
    pin: bool,
    model_fingerprint: str,
    return_in_flight: bool,
    pin_ttl_ms: int,
) -> LookupResult:
    """A get's first step (the Lookup RPC's, kvstore/server/fast_servicer.py `lookup_reply`):
    the request's flags checked, then the store's lookup, pinned when `pin_ttl_ms` is. Its
    promotions, if any, are still under way (`waits.settled` awaits them); then its pin ends
    by itself `pin_ttl_ms` (capped) after the reply is ready (`pin_deadline`), so a slow
    promotion never eats the reader's time."""
    if pin_ttl_ms < 0:
        raise InvalidArgument(f"pin_ttl_ms={pin_ttl_ms} is negative: give 0 (no deadline) or a lifetime")
    if pin_ttl_ms and not sid:
        raise InvalidArgument(f"pin_ttl_ms={pin_ttl_ms} needs a session_id: pins are held by a session")
    if pin_ttl_ms and return_in_flight:
        raise InvalidArgument(
            "return_in_flight=true with pin_ttl_ms: a pin with a deadline is for pages ready now; "
            "use an explicit pin (pin=true) to wait for pages in flight"
        )
    return store.lookup(
        sid, namespace, token_ids, extra_keys, pin or pin_ttl_ms > 0, model_fingerprint, return_in_flight
    )


def pin_deadline(store: Store, sid: int, pin_id: int, pin_ttl_ms: int) -> tuple[int, int]:
    """The lookup's pin `pin_id` ends by itself `pin_ttl_ms` (capped) from now: (granted ttl
    ms, deadline ns). Called once the pages are ready."""
    ttl_ms = min(pin_ttl_ms, round(store.limits.pin_ttl_max_s * 1000))
    return ttl_ms, store.pin_deadlines.add(sid, pin_id, ttl_ms * 1_000_000)


def reserve(
    store: Store,
    sid: int,
    namespace: str,
    token_ids: Seq[int],
    extra_keys: bytes,
    max_tokens: int,
    options: SequenceOptions | None,
    model_fingerprint: str,
) -> tuple[int, int, AppendResult]:
    """Allocate, then append `token_ids`: (sequence id, pages preallocated, the append). If the
    append fails the sequence is released, so nothing is left behind."""
    if max_tokens > 0:
        # Preallocation may evict to make room: refuse what the append would refuse first.
        ns = store.namespace(namespace)
        validate.token_array(token_ids, field="token_ids", vocab_size=ns.spec.vocab_size, limits=store.limits)
        if len(token_ids) > max_tokens:
            raise OutOfRange(f"token_ids has {len(token_ids)} ids, past max_tokens={max_tokens}")
    seq_id, reserved = store.allocate(sid, namespace, max_tokens, extra_keys, options, model_fingerprint)
    try:
        appended = store.append(sid, seq_id, token_ids)
    except BaseException:
        with contextlib.suppress(KVStoreError):  # (the session ended meanwhile: released already)
            store.release_sequence(sid, seq_id)
        raise
    return seq_id, reserved, appended


def seal(
    store: Store,
    sid: int,
    seq_id: int,
    num_tokens: int,
    written_slots: Seq[int],
    release: bool,
    credit_pages: int = 0,
    credit_id: int = 0,
    unzeroed_ok: bool = False,
) -> tuple[CommitResult, ReleaseResult, credits.Credit]:
    """Commit, then release the sequence if asked, then replace the session's credit
    (`credit_id`, 0: none) with one of `credit_pages` (kvstore/store/credit.py). A failed
    commit changes nothing (the sequence is still held: release it, or fix the request and
    seal again); so does a `credit_id` that is not an unused credit, checked first."""
    ns = store.table.sequence(sid, seq_id)[1].ns
    if credit_id:
        if credit_id == seq_id:
            raise InvalidArgument(f"credit_sequence_id={credit_id} is the sequence being sealed")
        credits.unused_credit(store, sid, credit_id)
    committed = store.commit(sid, seq_id, num_tokens, written_slots)
    released = store.release_sequence(sid, seq_id) if release else ReleaseResult()
    credit = (
        credits.replace(store, sid, credit_id, ns, credit_pages, unzeroed_ok)
        if credit_id or credit_pages
        else credits.Credit()
    )
    return committed, released, credit
