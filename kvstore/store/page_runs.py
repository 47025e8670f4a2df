"""A request's page moves in one pass: references taken and dropped on a whole run of pages
(a pin's hit, a put's cached prefix, a release), with the eviction policy told once with the
list (its `*_all` calls) instead of once a page. Each leaves the namespace and the policy
exactly as the Namespace's per-page calls in the same order do (tests/test_page_runs.py).
A run's seal is `Namespace.seal_run`."""

from __future__ import annotations

from kvstore.errors import InvariantBroken
from kvstore.memory.pages import RESERVED, SEALED, Page, PageState
from kvstore.store.namespace import Namespace


def py_ref_run(pages: list[Page], sealed: PageState) -> tuple[list[Page], int]:
    """Each page's refcount plus one, in order, stopping at the first page whose state is not
    `sealed`: (the pages whose refcount went from 0 to 1, that page's index or -1).
    kvstore/_pagetouch.c does the same in C; this is its fallback and its reference."""
    held: list[Page] = []
    for i, page in enumerate(pages):
        if page.state is not sealed:
            return held, i
        if page.refcount == 0:
            held.append(page)
        page.refcount += 1
    return held, -1


def py_unref_run(pages: list[Page], sealed: PageState) -> tuple[int, list[Page], int]:
    """Each page's refcount minus one, in order, stopping at the first page not `sealed` or
    not referenced: (how many reached 0, those of them with no children, that page's index or
    -1). kvstore/_pagetouch.c does the same in C; this is its fallback and its reference."""
    free: list[Page] = []
    unpinned = 0
    for i, page in enumerate(pages):
        if page.state is not sealed or page.refcount <= 0:
            return unpinned, free, i
        page.refcount -= 1
        if page.refcount == 0:
            unpinned += 1
            if not page.children:  # page.evictable: sealed, unpinned, a leaf
                free.append(page)
    return unpinned, free, -1


try:  # (absent where the extension is not built)
    from kvstore._chainhash import ref_run, unref_run
except ImportError:
    ref_run, unref_run = py_ref_run, py_unref_run


def ref_all(ns: Namespace, pages: list[Page]) -> None:
    """`ns.ref(page)` of each page."""
    held, bad = ref_run(pages, SEALED)
    if held:
        ns.pages_pinned += len(held)
        ns.policy.on_unevictable_all(held)
    if bad >= 0:
        raise InvariantBroken(f"namespace {ns.name!r}: a reference on {pages[bad]}, which is not sealed")


def unref_all(ns: Namespace, pages: list[Page]) -> None:
    """`ns.unref(page)` of each page, in order (leaves first, as a release goes)."""
    unpinned, free, bad = unref_run(pages, SEALED)
    ns.pages_pinned -= unpinned
    if free:
        ns.policy.on_evictable_all(free)
    if bad >= 0:
        raise InvariantBroken(f"namespace {ns.name!r}: releasing a reference {pages[bad]} does not have")


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
