"""What twin-store tests compare (tests/test_store_put_fused.py, tests/test_page_runs.py): a
namespace's pages, free list, index and counters, and its policy's fields, as plain values."""

from __future__ import annotations

from kvstore.store.namespace import Namespace


def pages_state(ns: Namespace) -> tuple:
    """Every page (state, references, hash, parent, children, recency, policy state), the free
    list's order, the index and the page counters."""

    def slot(p):
        return None if p is None else p.slot

    pages = [
        (p.state, p.refcount, p.block_hash, p.owner, slot(p.parent), sorted(map(slot, p.children or ())),
         p.last_access, p.policy_state)
        for p in ns.pages.pages
    ]  # fmt: skip
    free, node = [], ns.pages.free._head.next
    while node is not ns.pages.free._tail:
        free.append(node.slot)
        node = node.next
    index = sorted((h, p.slot) for h, p in ns.index._pages.items())
    counters = (ns.pages_reserved, ns.pages_pinned, ns.clock, ns.evictions, len(ns.pages.free))
    return pages, free, index, counters


def policy_state(policy: object) -> list:
    """A policy's fields, comparable across twins: each heap as its live entries."""
    return sorted((k, _plain(v)) for k, v in vars(policy).items())


def _plain(v: object) -> object:
    if hasattr(v, "entries"):
        return sorted(e[:3] for e in v.entries if e[3].policy_state == e[2])
    if isinstance(v, tuple | list) and v and hasattr(v[0], "entries"):
        return [_plain(x) for x in v]
    return repr(v)
