"""What a client holds: sessions (leases), their sequences and pins, and where a swapped-out
sequence's pages went. Plain records; the store's modules (session_table, sequences, lookup,
preempt) change them, called by kvstore/store/store.py."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field

from kvstore.hashing import BlockHash
from kvstore.memory.pages import Page
from kvstore.store.namespace import Namespace
from kvstore.store.tiering.promotion import Promotion
from kvstore.store.types import SequenceOptions
from kvstore.tiers import PageKey


@dataclass(eq=False)
class Sequence:
    id: int
    session_id: int
    ns: Namespace
    extra_keys: bytes
    max_tokens: int  # 0 = unconstrained
    last_hash: BlockHash  # hash of the last full page (the namespace root before the first)
    pages: list[Page | None] = field(default_factory=list)  # page i of the sequence; None = dropped
    spare: list[Page] = field(default_factory=list)  # preallocated RESERVED pages not yet used
    tail_tokens: bytes = b""  # little-endian int32 ids of the partial last page
    num_tokens: int = 0
    committed_tokens: int = 0
    options: SequenceOptions = field(default_factory=SequenceOptions)
    # Lowest page index a budget has dropped (None: nothing dropped). A held RESERVED page
    # above it is private: its KV is not that of its token prefix, so it is never sealed.
    cut: int | None = None
    window_lo: int = 0  # sliding_window: every index in [sink pages, window_lo) is dropped
    scores: dict[int, float] = field(default_factory=dict)  # importance: page index -> last score
    held: int = 0  # pages held (not None)
    swapped: Swapped | None = None  # swapped out (kvstore/store/preempt.py): its pages are below the pool
    swap_in: SwapInTicket | None = None  # a SwapIn under way
    mrc_skip: int = 0  # leading pages a lookup of this session already sampled (kvstore/store/live_mrc.py)
    credit: bool = False  # reserved for the session's next put (kvstore/store/credit.py)

    def private(self, index: int) -> bool:
        return self.cut is not None and index > self.cut


@dataclass(eq=False)
class Pin:
    id: int
    session_id: int
    ns: Namespace
    pages: list[Page]  # sealed, in prefix order
    # Pages still coming up from a tier (kvstore/store/tiering/promote.py), in prefix order: each
    # joins `pages` when it is sealed, or leaves (with every later one) when it fails.
    pending: list[Promotion] = field(default_factory=list)
    counted: bool = True  # its pages are counted in the namespace's hit_tokens (a lookup's pin)

    def settled(self, prom: Promotion, sealed: Page | None) -> None:
        """`prom`, one of `pending`, settled: its page (`sealed`, already referenced for this
        pin) joins `pages`; or it failed, and the hit ends before it: it and every later
        pending page leave the pin (they extend a page that will not be there), and the
        namespace's hit counters lose them."""
        i = self.pending.index(prom)
        if sealed is not None:
            del self.pending[i]
            self.pages.append(sealed)
            return
        lost = self.pending[i:]
        del self.pending[i:]
        for later in lost[1:]:
            later.pins.remove(self)
        if self.counted:
            tokens = len(lost) * self.ns.spec.page_tokens
            self.ns.hit_tokens -= tokens
            self.ns.miss_tokens += tokens


@dataclass(eq=False)
class Session:
    id: int
    client_name: str
    lease_ttl_s: float
    expires_at: float  # monotonic; ignored while a keep-alive stream is attached
    last_seen: float
    streams: int = 0
    pidfd: int = -1  # the client's process (device pools' quarantine; kvstore/store/quarantine.py)
    client: str = ""  # whom it counts against for max_sessions_per_client (kvstore/caller.py client_key)
    sequences: dict[int, Sequence] = field(default_factory=dict)
    pins: dict[int, Pin] = field(default_factory=dict)
    # Lookups whose accesses the MRC sample has counted: first block hash -> pages counted,
    # so the append of the same prompt does not count them again (kvstore/store/live_mrc.py).
    mrc_lookups: OrderedDict[bytes, int] = field(default_factory=OrderedDict)


@dataclass(frozen=True, slots=True)
class SealedEntry:
    """A sealed page: shared, found again by its hash (in the pool, or promoted)."""

    block_hash: bytes


@dataclass(frozen=True, slots=True)
class PrivateEntry:
    """An unsealed page, copied below the pool under a key of its own."""

    key: PageKey
    block_hash: bytes | None  # the hash a full page will be sealed under (None: none yet)


@dataclass
class Swapped:
    """Where a swapped-out sequence's pages went, by page index (None: dropped by its budget)."""

    entries: list[SealedEntry | PrivateEntry | None]
    spare: int  # preallocated pages it held (static budget): reserved again at swap-in


@dataclass(eq=False, slots=True)
class PrivateRead:
    """A private page being read back from disk on a reader thread into `page` (RESERVED,
    the sequence's): its slot is not given back before `done` is, whatever happens."""

    page: Page
    done: asyncio.Future[bool]


@dataclass
class SwapInTicket:
    """A swap-in under way. pages[i] is a Page (resident and referenced, or a RESERVED private
    page read back), a PrivateRead, a Promotion (in flight, held through `holder`) or None
    (dropped by the budget); `spare` are the static budget's pages, reserved."""

    seq: Sequence
    holder: Pin
    pages: list[Page | PrivateRead | Promotion | None] = field(default_factory=list)
    spare: list[Page] = field(default_factory=list)
    aborted: bool = False

    def waits(self) -> list[asyncio.Future[bool]]:
        """What to wait for before `finish_swap_in`: futures that are never cancelled by
        the waiter going away (asyncio.wait them)."""
        out = [item.done for item in self.pages if isinstance(item, PrivateRead)]
        out += [prom.future() for prom in self.holder.pending]
        return out
