"""A page on its way up from a tier into a pool, as the lookups, pins and swap-ins that
wait for it see it (kvstore/store/tiering/promote.py brings it up and settles it)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, NamedTuple, Protocol

from kvstore.memory.pages import Page
from kvstore.tiers import PageKey, PageMeta, TierName

if TYPE_CHECKING:
    from kvstore.store.namespace import Namespace

PROMOTING_OWNER = -1  # owner of a RESERVED pool page being filled from a tier


class NotNow(Enum):
    """Why a read from a tier brought no page up (promote.promote_now, and each read)."""

    WAIT = "wait"  # it has to wait (a write not yet committed, bytes not in the page cache)
    FAILED = "failed"  # its record failed verification or is gone: the hit ends there


# A read's outcome: what the bytes verified against, or why there are none.
Read = tuple[PageMeta, int] | NotNow


class Verified(NamedTuple):
    """What a promoted page's bytes verified against (kept on the sealed page: `Page.verified`),
    and whether they came from disk through the OS page cache (read on the loop)."""

    meta: PageMeta
    checksum: int
    in_page_cache: bool


class Waiter(Protocol):
    """What holds a promotion in flight (a lookup's pin, a swap-in's holder): told once it
    settles, with the sealed page (already referenced for it) or None if it failed."""

    def settled(self, prom: Promotion, sealed: Page | None) -> None: ...


@dataclass(eq=False, slots=True)
class Promotion:
    """One page on its way up: `page` is RESERVED (owner PROMOTING_OWNER) until it settles."""

    ns: Namespace
    key: PageKey
    page: Page
    parent_page: Page | None  # resident parent (we hold a ref on it); None: root or in flight
    parent: Promotion | None  # in-flight parent
    source: TierName
    pins: list[Waiter] = field(default_factory=list)
    children: list[Promotion] = field(default_factory=list)  # in flight, waiting on us
    read_ok: bool | None = None  # None: the read has not finished
    verified: Verified | None = None  # the record the copy verified against
    ok: bool | None = None  # None: not settled
    sealed: Page | None = None  # once settled ok: the sealed page (ours, or an equal one)
    _waiters: list[asyncio.Future[bool]] = field(default_factory=list)

    async def wait(self) -> bool:
        return bool(await self.future())

    def future(self) -> asyncio.Future[bool]:
        """Resolved (with `ok`) when the promotion settles; cancelling it cancels nothing else."""
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if self.ok is None:
            self._waiters.append(fut)
        else:
            fut.set_result(self.ok)
        return fut

    def resolve(self, ok: bool) -> None:
        """Settled: wake everything waiting on `future()`."""
        self.ok = ok
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(ok)
