"""A request's page moves in one pass: references taken and dropped on a whole run of pages
(a pin's hit, a put's cached prefix, a release), with the eviction policy told once with the
list (its `*_all` calls) instead of once a page. Each leaves the namespace and the policy
exactly as the Namespace's per-page calls in the same order do (tests/test_page_runs.py).
A run's seal is `Namespace.seal_run`."""

from __future__ import annotations

from kvstore.errors import InvariantBroken
from kvstore.memory.pages import RESERVED, SEALED, Page
from kvstore.store.namespace import Namespace


def ref_all(ns: Namespace, pages: list[Page]) -> None:
    """`ns.ref(page)` of each page."""
    held: list[Page] = []
    try:
        for page in pages:
            if page.state is not SEALED:
                raise InvariantBroken(f"namespace {ns.name!r}: a reference on {page}, which is not sealed")
            if page.refcount == 0:
                held.append(page)
            page.refcount += 1
    finally:
        if held:
            ns.pages_pinned += len(held)
            ns.policy.on_unevictable_all(held)


def unref_all(ns: Namespace, pages: list[Page]) -> None:
    """`ns.unref(page)` of each page, in order (leaves first, as a release goes)."""
    free: list[Page] = []
    unpinned = 0
    try:
        for page in pages:
            if page.state is not SEALED or page.refcount <= 0:
                raise InvariantBroken(f"namespace {ns.name!r}: releasing a reference {page} does not have")
            page.refcount -= 1
            if page.refcount == 0:
                unpinned += 1
                if not page.children:  # page.evictable: sealed, unpinned, a leaf
                    free.append(page)
    finally:
        ns.pages_pinned -= unpinned
        if free:
            ns.policy.on_evictable_all(free)


def let_go(ns: Namespace, pages: list[Page | None]) -> tuple[int, int]:
    """A holder gives up its `pages` (parents before children; None = dropped): reserved
    ones are freed, sealed ones unpinned and left cached. Leaves first, so a parent never
    becomes evictable while a child of this holder still holds it. (freed, unpinned)."""
    freed = 0
    held: list[Page] = []
    for page in reversed(pages):
        if page is None:
            continue
        if page.state is RESERVED:
            ns.free_reserved(page)
            freed += 1
        else:
            held.append(page)
    unref_all(ns, held)
    return freed, len(held)
