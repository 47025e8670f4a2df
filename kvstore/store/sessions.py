"""What a client holds: sessions (leases), their sequences and pins. Plain
records; kvstore/store/store.py is the only code that changes them."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvstore.hashing import BlockHash
from kvstore.memory.pages import Page
from kvstore.store.namespace import Namespace
from kvstore.store.types import SequenceOptions

if TYPE_CHECKING:
    from kvstore.store.preempt import SwapInTicket, Swapped
    from kvstore.store.tiering import Promotion


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

    def private(self, index: int) -> bool:
        return self.cut is not None and index > self.cut


@dataclass(eq=False)
class Pin:
    id: int
    session_id: int
    ns: Namespace
    pages: list[Page]  # sealed, in prefix order
    # Pages still coming up from a tier (kvstore/store/tiering.py), in prefix order: each
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
    sequences: dict[int, Sequence] = field(default_factory=dict)
    pins: dict[int, Pin] = field(default_factory=dict)
    # Lookups whose accesses the MRC sample has counted: first block hash -> pages counted,
    # so the append of the same prompt does not count them again (kvstore/store/live_mrc.py).
    mrc_lookups: OrderedDict[bytes, int] = field(default_factory=OrderedDict)
