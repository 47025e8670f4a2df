"""Why was this a miss: for each full page of a prompt, where its block is now and, if it
is nowhere, why (Admin.Explain; docs/policies.md, "Why was this a miss").

Read-only, above the store: nothing is touched, counted, pinned or promoted. The verdicts, in the order they
are tried for one page (its block hash chained under the namespace's salt):

- `hit_pool`, `in_flight` (being promoted), `hit_host`, `hit_disk`: a lookup finds it.
- `evicted` / `dropped_corrupt`: gone from every tier; the namespace's ghost
  (`Namespace.ghost`, bounded) says when, by whom and to make room for what.
- `other_namespace`: not here, but the same tokens (chained under another namespace's
  salt, same page_tokens) are resident there. Only namespaces the caller's token may read
  are looked at (kvstore/caller.py): another tenant's is never named nor probed.
- `never_stored`: none of the above (or forgotten by the bounded ghost).

Then, over the whole prompt: a request whose model fingerprint differs from the
namespace's is refused by Lookup, so every page is `other_model`; after the first page
that is not a hit, every later page is `after_miss` (unreachable under prefix semantics).
Both keep the page's own state in `where`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from kvstore import caller
from kvstore.hashing import iter_block_hashes
from kvstore.store import validate
from kvstore.store.namespace import GoneKind, Namespace
from kvstore.store.store import Store
from kvstore.store.tiering.tiers import Tiers
from kvstore.tiers import PageKey, TierName


class Verdict(StrEnum):
    HIT_POOL = "hit_pool"
    HIT_HOST = "hit_host"
    HIT_DISK = "hit_disk"
    IN_FLIGHT = "in_flight"
    NEVER_STORED = "never_stored"
    EVICTED = "evicted"
    DROPPED_CORRUPT = "dropped_corrupt"
    OTHER_NAMESPACE = "other_namespace"
    OTHER_MODEL = "other_model"
    AFTER_MISS = "after_miss"


HITS = (Verdict.HIT_POOL, Verdict.HIT_HOST, Verdict.HIT_DISK, Verdict.IN_FLIGHT)


@dataclass
class PageExplanation:
    index: int
    token_start: int
    token_count: int
    block_hash: bytes
    verdict: Verdict
    where: Verdict | None = None  # after_miss, other_model: the page's own state in this namespace
    evicted_unix_ms: int = 0
    evicted_by: str = ""  # the policy (or tier) that evicted it
    evicted_for: str = ""  # what the eviction made room for, e.g. "append of 8 tokens to sequence 3"
    other_namespace: str = ""
    detail: str = ""


@dataclass
class Explanation:
    namespace: str
    policy: str
    model_fingerprint: str
    page_tokens: int
    num_tokens: int
    hit_tokens: int
    pages: list[PageExplanation] = field(default_factory=list)
    summary: str = ""


def ago(seconds: float) -> str:
    """12.3 -> '12s ago', 185 -> '3m 05s ago', 7300 -> '2h 01m ago'."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s ago"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s ago"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m ago"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h ago"


def explain(
    store: Store, namespace: str, token_ids: Sequence[int], extra_keys: bytes, model_fingerprint: str
) -> Explanation:
    ns = store.namespace(namespace)
    tokens = validate.token_array(
        token_ids, field="token_ids", vocab_size=ns.spec.vocab_size, limits=store.limits
    ).tobytes()
    extra = validate.extra_keys(extra_keys, store.limits)
    T = ns.spec.page_tokens
    hashes = list(iter_block_hashes(ns.index.root, tokens, T, extra))
    others = _Others(store, ns, tokens, extra)
    now = time.time()
    mine = ns.spec.model_fingerprint
    wrong_model = bool(mine and model_fingerprint and mine != model_fingerprint)
    out = Explanation(ns.name, ns.policy.name, mine, T, len(tokens) // 4, 0)
    missed = False
    for i, block_hash in enumerate(hashes):
        page = PageExplanation(i, i * T, T, block_hash, Verdict.NEVER_STORED)
        _own_state(ns, store.tiers, page, others, now)
        if wrong_model:
            page.where, page.verdict = page.verdict, Verdict.OTHER_MODEL
            page.detail = f"namespace {ns.name!r} holds model {mine}, the request is for {model_fingerprint}"
            holder = others.with_model(model_fingerprint)
            if holder:
                page.detail += f" (namespace {holder!r} is for that model)"
        elif missed:
            page.where, page.verdict = page.verdict, Verdict.AFTER_MISS
        elif page.verdict in HITS:
            out.hit_tokens += T
        else:
            missed = True
        out.pages.append(page)
    out.summary = _summary(out, ns, model_fingerprint, now)
    return out


class _Others:
    """The prompt's block hashes under each other namespace's salt (same page_tokens), lazily."""

    def __init__(self, store: Store, ns: Namespace, tokens: bytes, extra: bytes) -> None:
        self.store, self.ns, self.tokens, self.extra = store, ns, tokens, extra
        self._hashes: dict[str, list[bytes]] = {}

    def candidates(self) -> list[Namespace]:
        T = self.ns.spec.page_tokens
        return [o for o in self._visible() if o.spec.page_tokens == T]

    def _visible(self) -> list[Namespace]:
        """The other namespaces the caller may read (a tenant learns nothing of another's)."""
        return [o for o in self.store.namespaces.values() if o is not self.ns and caller.sees(o.name)]

    def holder(self, index: int) -> str:
        """A namespace where page `index` of the same tokens is resident (pool or tier), or ''."""
        for other in self.candidates():
            hashes = self._hashes.get(other.name)
            if hashes is None:
                hashes = list(
                    iter_block_hashes(other.index.root, self.tokens, other.spec.page_tokens, self.extra)
                )
                self._hashes[other.name] = hashes
            h = hashes[index]
            tiers = self.store.tiers
            if other.index.get(h) is not None or (tiers is not None and tiers.holds(other, h)):
                return other.name
        return ""

    def with_model(self, fingerprint: str) -> str:
        for other in self._visible():
            if other.spec.model_fingerprint == fingerprint:
                return other.name
        return ""


def _own_state(
    ns: Namespace, tiers: Tiers | None, page: PageExplanation, others: _Others, now: float
) -> None:
    """The page's verdict in this namespace alone (no prefix semantics, no model check)."""
    h = page.block_hash
    if ns.index.get(h) is not None:
        page.verdict = Verdict.HIT_POOL
        return
    if tiers is not None:
        if PageKey(ns.name, h) in tiers.promoting:
            page.verdict = Verdict.IN_FLIGHT
            page.detail = "being promoted into the pool"
            return
        source = tiers.holds(ns, h)
        if source is not None:
            page.verdict = Verdict.HIT_HOST if source is TierName.HOST else Verdict.HIT_DISK
            page.detail = f"in the {source} tier: a lookup promotes it"
            return
    holder = others.holder(page.index)
    gone = ns.ghost.get(h)
    if gone is not None:
        page.verdict = Verdict.DROPPED_CORRUPT if gone.kind is GoneKind.CORRUPT else Verdict.EVICTED
        page.evicted_unix_ms = int(gone.unix_s * 1000)
        page.evicted_by, page.evicted_for = gone.by, gone.why
        page.detail = _gone_phrase(page, now)
        if tiers is not None and gone.kind is GoneKind.EVICTED and not _by_a_tier(gone.by):
            page.detail += "; its copy below the pool is gone too"
        if holder:
            page.detail += f"; the same tokens are resident in namespace {holder!r}"
        return
    if holder:
        page.verdict = Verdict.OTHER_NAMESPACE
        page.other_namespace = holder
        page.detail = (
            f"not stored here; the same tokens are resident in namespace {holder!r} "
            "(another salt: its hashes differ)"
        )
        return
    page.verdict = Verdict.NEVER_STORED
    page.detail = (
        f"no sequence has sealed this prefix in namespace {ns.name!r} (or its eviction was forgotten)"
    )


def _by_a_tier(by: str) -> bool:
    """Evicted by a tier below the pool ("host tier (LRU)", "disk tier (<policy>)"), which
    means no copy is left anywhere; not by the pool's policy, which demoted it."""
    return by.startswith(("host tier (", "disk tier ("))


def _gone_phrase(page: PageExplanation, now: float) -> str:
    """'evicted 3m 05s ago by horizon to make room for append of 8 tokens to sequence 12'."""
    when = ago(now - page.evicted_unix_ms / 1000)
    if page.verdict == Verdict.DROPPED_CORRUPT:
        return f"dropped {when}: {page.evicted_for}"
    if page.evicted_for.startswith("Evict RPC"):
        return f"evicted {when} by {page.evicted_for} (policy {page.evicted_by})"
    if _by_a_tier(page.evicted_by):  # "disk tier (horizon)" -> "from the disk tier (policy horizon)"
        tier, _, policy = page.evicted_by.partition(" (")
        return f"evicted {when} from the {tier} (policy {policy.rstrip(')')}): {page.evicted_for}"
    return f"evicted {when} by {page.evicted_by} to make room for {page.evicted_for}"


def _summary(out: Explanation, ns: Namespace, model_fingerprint: str, now: float) -> str:
    n, T = out.num_tokens, out.page_tokens
    pages = out.pages
    if not pages:
        return f"{n} tokens: fewer than one page (page_tokens={T}), nothing a lookup can hit"
    head = f"{out.hit_tokens:,} hit tokens of {n:,}"
    if pages[0].verdict == Verdict.OTHER_MODEL:
        return (
            f"0 hit tokens of {n:,}: the request is for model {model_fingerprint} but namespace "
            f"{ns.name!r} holds model {out.model_fingerprint}; a lookup is refused ({pages[0].detail})"
        )
    first = next((p for p in pages if p.verdict not in HITS), None)
    if first is None:
        where = {v: sum(p.verdict == v for p in pages) for v in HITS}
        parts = [f"{c} {v.removeprefix('hit_').replace('_', ' ')}" for v, c in where.items() if c]
        return f"{head}: every full page is cached ({', '.join(parts)})"
    if first.verdict in (Verdict.EVICTED, Verdict.DROPPED_CORRUPT):
        why = f"page {first.index} was {first.detail}"
    elif first.verdict == Verdict.OTHER_NAMESPACE:
        why = f"page {first.index} is not in {ns.name!r} but in namespace {first.other_namespace!r} (another salt)"
    else:
        why = f"page {first.index} was never stored in {ns.name!r}"
    later = [p for p in pages if p.verdict == Verdict.AFTER_MISS]
    stored = sum(p.where in HITS for p in later)
    tail = ""
    if later:
        tail = f"; {len(later)} later page{'s' * (len(later) != 1)} unreachable"
        if stored:
            tail += f" ({stored} of them still stored)"
    return f"{head}: {why}{tail}"
