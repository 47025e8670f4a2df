"""The eviction policy contract: a policy proposes, the store frees.

The store tells the policy about page events; the policy keeps whatever it
needs (on `page.policy_state` or its own structures) and, when asked, names
the next victim among the pages the store has declared evictable (sealed,
unpinned, no resident child: leaf-first is the store's rule, not the
policy's). A policy never frees a page and never sees bytes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from kvstore.memory.pages import Page


class EvictionPolicy(ABC):
    name: str = ""

    def on_sealed(self, page: Page) -> None:  # noqa: B027 - optional hook
        """A page became visible to lookups (inserted into the index)."""

    def on_access(self, page: Page) -> None:  # noqa: B027 - optional hook
        """A lookup hit the page, or a sequence reused it."""

    def on_access_all(self, pages: list[Page]) -> None:
        """`on_access` of each page, in order (one lookup's hit); a policy may do it in one loop."""
        for page in pages:
            self.on_access(page)

    def on_hit(self, pages: list[Page], slots: list[int], candidates: list[Page]) -> None:
        """`on_access_all(pages)`, given what Namespace.touch's pass collected: the pages'
        `slots` and, in order, those whose `policy_state` is set (the eviction candidates)."""
        self.on_access_all(pages)

    def on_sealed_all(self, pages: list[Page]) -> None:
        """`on_sealed` of each page, in order (one request's seal); a policy may do it in one loop."""
        for page in pages:
            self.on_sealed(page)

    def on_dropped(self, page: Page) -> None:  # noqa: B027 - optional hook
        """The store is freeing the page (after on_unevictable); its block_hash is still set."""

    @abstractmethod
    def on_evictable(self, page: Page) -> None:
        """The page may now be chosen as a victim."""

    @abstractmethod
    def on_unevictable(self, page: Page) -> None:
        """The page may no longer be chosen (pinned, extended, or about to be freed)."""

    def on_evictable_all(self, pages: list[Page]) -> None:
        """`on_evictable` of each page, in order (one release's unpinned leaves)."""
        for page in pages:
            self.on_evictable(page)

    def on_unevictable_all(self, pages: list[Page]) -> None:
        """`on_unevictable` of each page, in order (one pin's newly held pages)."""
        for page in pages:
            self.on_unevictable(page)

    @abstractmethod
    def victim(self) -> Page | None:
        """The next page to evict, removed from the candidates; None when there is none."""

    @abstractmethod
    def __len__(self) -> int:
        """How many pages are candidates now."""


_REGISTRY: dict[str, Callable[[], EvictionPolicy]] = {}


def register(name: str) -> Callable[[type[EvictionPolicy]], type[EvictionPolicy]]:
    def decorate(cls: type[EvictionPolicy]) -> type[EvictionPolicy]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def make_policy(name: str) -> EvictionPolicy:
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None
    return factory()


def policy_names() -> list[str]:
    return sorted(_REGISTRY)
