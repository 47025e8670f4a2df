"""Checksums of sealed pool pages (docs/security.md, "Sealed pages"): the function, and the
check made before a page is copied below the pool. The store computes and scrubs them in
kvstore/store/integrity.py; this module is below it so the tiers can call `intact`.

The checksum is XXH3-64 (PyPI `xxhash`, already the tiers' record checksum): about 14 GB/s
here, and it releases the GIL for buffers of 64 KiB and more (`xxhash._xxhash._GIL_MINSIZE`),
so the integrity thread hashes pages while the loop runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import xxhash

if TYPE_CHECKING:
    from kvstore.memory.pages import Page


class _Corrupt:
    def __repr__(self) -> str:
        return "CORRUPT"


# `Page.checksum` of a page found scribbled on: never served again, never copied below.
CORRUPT = _Corrupt()


def checksum(view: memoryview | bytes) -> int:
    """The checksum of a page's bytes (64 bits)."""
    return xxhash.xxh3_64_intdigest(view)


class Guard(Protocol):
    """A namespace's integrity state, as the page table and the tiers call it."""

    # While a Put seals its pages: the checksums its client took as it copied them, by slot
    # (kvstore/store/credit.py); `sealed` keeps them instead of reading those pages again.
    given: dict[int, int] | None

    def takes_sums(self) -> bool:
        """Whether it keeps checksums of sealed pages (so a Put's own are worth sending)."""

    def lends_unzeroed(self) -> bool:
        """Whether a credit may hand out freed pages not zeroed yet (server.unzeroed_credits)."""

    def sealed(self, pages: list[Page], writer: int) -> None:
        """`pages` were sealed by session `writer` (0: promoted): checksum them (those in
        `given`: keep that checksum)."""

    def corrupt(self, page: Page, where: str) -> None:
        """`page`'s bytes no longer match its checksum: drop it, count and log it."""

    def refused(self) -> None:
        """A copy of a corrupt page below the pool was refused."""

    def zero_soon(self, pages: list[Page]) -> None:
        """`pages` were freed ahead of need (zero_ahead.py): zero them now, not at the next tick."""

    def stats(self) -> dict[str, int]:
        """Its counters, as `NamespaceStats` fields."""


def intact(guard: Guard | None, page: Page, view: memoryview) -> bool:
    """Whether `page`'s bytes (`view`) may be copied below the pool: they match the checksum
    taken when it was sealed, or it has none yet (the window after a seal, as long as the
    integrity thread is behind; counted `pages_unchecked` once the page is freed; the tier's
    record checksum covers the bytes from this copy on), or the checks are off. A mismatch
    drops the page (`Guard.corrupt`)."""
    expected = page.checksum
    if guard is None or expected is None:
        return True
    if expected is CORRUPT:
        guard.refused()
        return False
    if type(expected) is not int:  # (being computed: its bytes are what was sealed)
        return True
    if checksum(view) == expected:
        return True
    guard.corrupt(page, "before a copy below the pool")
    guard.refused()
    return False
