"""A put into an unused credit (kvstore/store/credit.py) without the append's per-page plan:
what sequences.append does to a fresh sequence with no budget, each page's hash, cache probe
and slot taken in one pass (the plan, its tuples and PageRefs were half a put's store time);
the caller commits (credit.finish_put). The same end state page for page and in the same order (policy calls,
counters, the free list, the MRC sample): tests/test_store_put_fused.py runs both on twin
stores and compares them after every step."""

from __future__ import annotations

from collections.abc import Sequence as Seq

from kvstore.hashing import chain_hashes
from kvstore.memory.pages import Page
from kvstore.store import page_runs, sequences
from kvstore.store.sessions import Sequence, Session
from kvstore.store.types import IMPORTANCE, SLIDING_WINDOW, AppendResult, StoreLimits


def applies(seq: Sequence) -> bool:
    """A fresh sequence with no budget and no max_tokens (an unused credit)."""
    return (
        not seq.pages
        and not seq.num_tokens
        and not seq.max_tokens
        and seq.cut is None
        and seq.options.mode not in (SLIDING_WINDOW, IMPORTANCE)
    )


def put(
    session: Session,
    seq: Sequence,
    limits: StoreLimits,
    token_ids: Seq[int],
    at: dict[int, Page],
) -> AppendResult | None:
    """Append `token_ids` to `seq` (`applies`) with page i in at[i]; the caller commits them
    (credit.finish_put: at once, or once a lane put's bytes have come). None, having changed nothing, when a page is neither cached nor in `at` (the stepwise append
    reserves one for it). The AppendResult names no pages (a Put's reply has none)."""
    ns = seq.ns
    T = ns.spec.page_tokens
    tokens = sequences.token_bytes(seq, limits, token_ids)
    n = len(tokens) // 4
    full, pages = n // T, -(-n // T)
    hashes = chain_hashes(seq.last_hash, tokens[: 4 * full * T], T, seq.extra_keys)
    index_get = ns.index.get
    hits: list[Page] = []
    for h in hashes:  # the cached prefix: every page before it is sealed
        page = index_get(h)
        if page is None:
            break
        hits.append(page)
    cached = len(hits)
    if any(i not in at for i in range(cached, pages)):
        return None
    page_runs.ref_all(ns, hits)  # (the append pins its hits before making room; it needs none here)
    if hits:
        ns.touch(hits)
    new = [at.pop(i) for i in range(cached, pages)]
    for page, h in zip(new, hashes[cached:], strict=False):  # (the partial last page has none)
        page.block_hash = h
    seq.pages += hits
    seq.pages += new
    if full:
        seq.last_hash = hashes[-1]
    if n % T:
        seq.tail_tokens = tokens[4 * full * T :]
    seq.held += pages
    seq.num_tokens = n
    if hashes:
        sequences.sample_hashes(session, seq, list(enumerate(hashes)))
    return AppendResult(n, [], T * cached, [])
