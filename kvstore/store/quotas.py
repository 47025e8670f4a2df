"""A namespace's page quota per session (NamespaceSpec.max_session_pages; docs/security.md,
"Quotas"): the pool pages one session may hold there at once, counting its sequences' pages
(reserved, sealed or shared, and those preallocated; a swapped-out sequence's, which SwapIn
brings back) and the pages its pins hold. Checked by
sequences.allocate, sequences.append and a pinned lookup before they take anything, so a
refused request changes nothing; a put's credit (store/credit.py) by `credit_room`.

The namespace's pool is its page quota as a whole (num_pages): eviction is per pool, so a
namespace at its quota evicts its own unpinned pages and never another namespace's.
"""

from __future__ import annotations

from collections.abc import Iterable

from kvstore.errors import QuotaExceeded
from kvstore.store.namespace import Namespace
from kvstore.store.sessions import Session
from kvstore.store.types import NamespaceSpec, StoreLimits


def held_pages(session: Session, ns: Namespace, credits: bool = False) -> int:
    """The pool pages of `ns` that `session` holds; its puts' unused credits only if `credits`."""
    n = 0
    for seq in session.sequences.values():
        if seq.ns is ns and (credits or not (seq.credit and not seq.pages)):
            n += seq.held + len(seq.spare)
            if seq.swapped is not None:  # what SwapIn brings back counts now: it cannot fail for it
                n += sum(e is not None for e in seq.swapped.entries) + seq.swapped.spare
    for pin in session.pins.values():
        if pin.ns is ns:
            n += len(pin.pages) + len(pin.pending)
    return n


def credit_room(session: Session, ns: Namespace) -> int | None:
    """How many pages a put's credit may take (None: no quota). A credit is the daemon reserving
    ahead for the session's next put, so it is granted only within the quota counting every
    credit, but counts against no read or write: a session's reads never fail for pages the
    daemon chose to hold for it. A session holds at most twice its quota that way."""
    quota = ns.spec.max_session_pages
    return quota - held_pages(session, ns, credits=True) if quota else None


def check_session_pages(session: Session | None, ns: Namespace, adding: int, what: str) -> None:
    """Raise QuotaExceeded (RESOURCE_EXHAUSTED) if `session` taking `adding` more pages of `ns`
    passes its quota."""
    quota = ns.spec.max_session_pages
    if not quota or adding <= 0 or session is None:
        return
    held = held_pages(session, ns)
    if held + adding > quota:
        ns.quota_refused += 1
        raise QuotaExceeded(
            "max_session_pages",
            f"namespace {ns.name!r}: session {session.id} holds {held} pages and {what} needs {adding} "
            f"more; the quota is max_session_pages={quota} (release a sequence or a pin first)",
        )


def check_pool_bytes(namespaces: Iterable[Namespace], spec: NamespaceSpec, limits: StoreLimits) -> None:
    """server.max_pool_bytes is for every pool together: the configured ones and those created
    since (Admin.CreateNamespace), not only the new one."""
    taken = sum(ns.spec.page_stride * ns.spec.num_pages for ns in namespaces)
    pool = spec.page_stride * spec.num_pages
    if taken + pool > limits.max_pool_bytes:
        raise QuotaExceeded(
            "max_pool_bytes",
            f"namespace {spec.name!r}: a pool of {pool} bytes and the pools there are ({taken} bytes) "
            f"would pass the quota max_pool_bytes={limits.max_pool_bytes}",
        )
