"""Zero ahead for credits in a full pool (docs/security.md, "Zero on free").

A credit (kvstore/store/credit.py) granted from a full pool used to take the very pages it
had just evicted: dirty, so its reply waited for their zeroing (zero_later.py: 16 pages of
737,280 B, ~0.2-0.4 ms on 2 cores, on every Put's critical path). Before such a grant the
policy evicts one credit's worth more than the grant needs: the grant takes the free pages
that were zeroed ahead (the free list hands out zeroed pages first), and the pages evicted
now are zeroed at once on the zeroing threads (zero_later.py), while the client copies into
this credit and the next Put is on its way. So the pool keeps up to one credit of free pages
out of the cache (a credit is at most 1/8 of a pool), only while zeroing is on. A credit
whose client writes its pages whole (credit.py `unzeroed_ok`) needs none of this: its grant
takes the pages it evicts as they are.

Why the zeroing threads and not the integrity thread's batch: that batch also checksums the
pages sealed since the last one, runs at nice +10, and marks its pages clean only when all
of it is done, so in a steady stream of puts the next grant often found its pages still in
it and the reply waited for the rest of the batch (Stats `replies_waited_zeroing`;
BENCHMARKS.md, peers, "Zeroing ahead on the zeroing threads").
"""

from __future__ import annotations

from itertools import islice

from kvstore.store.namespace import Namespace

WHY = "zeroed ahead for the next credit"


def make_room(ns: Namespace, pages: int) -> None:
    """Before granting a credit of `pages`: evict (policy's choice) until two credits' worth
    are free, or nothing more can go; the grant's own room is still made by the allocation."""
    if ns.pages.zero is None or len(ns.pages.free) >= 2 * pages:
        return
    freed = ns.pages.freed  # (each page evicted now is appended to it, dirty)
    before = len(freed)
    done = ns.evict_while(lambda _: len(ns.pages.free) < 2 * pages, WHY)
    if done.pages_evicted and ns.guard is not None:
        ns.guard.zero_soon([page for _, page in islice(freed, before, None)])
