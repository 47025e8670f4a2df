"""The prefix index of one namespace: block hash -> sealed page.

Chained hashes make the index a tree without storing one: a page's hash
commits to its whole prefix, and `Page.parent`/`Page.children` link resident
pages. Loop-owned; only kvstore/store mutates it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from kvstore import hashing
from kvstore.errors import InvariantBroken
from kvstore.hashing import BlockHash
from kvstore.memory.pages import Page

if TYPE_CHECKING:  # (absent where the C module is not built: then the memo is None)
    from kvstore._chainhash import HashMemo


class PrefixIndex:
    def __init__(self, root: BlockHash) -> None:
        self.root = root  # h_0 of the namespace (salted)
        self._pages: dict[bytes, Page] = {}
        # block hash -> its sealed page, or None: the dict's own get (a C call; every page of
        # a put and a commit asks).
        self.get: Callable[[bytes], Page | None] = self._pages.get
        # The store's remembered chain steps (hashing.make_memo), shared by its namespaces: a
        # step's input holds its parent hash, so namespaces' entries never answer each other.
        self.memo: HashMemo | None = None

    def __len__(self) -> int:
        return len(self._pages)

    def insert(self, page: Page) -> None:
        if page.block_hash is None or page.block_hash in self._pages:
            raise InvariantBroken(f"indexing {page}: no block hash, or one indexed already")
        self._pages[page.block_hash] = page

    def insert_all(self, pages: list[Page]) -> None:
        """`insert` of each page."""
        indexed = self._pages
        for page in pages:
            if page.block_hash is None or page.block_hash in indexed:
                raise InvariantBroken(f"indexing {page}: no block hash, or one indexed already")
            indexed[page.block_hash] = page

    def remove(self, page: Page) -> None:
        if page.block_hash is None or self._pages.get(page.block_hash) is not page:
            raise InvariantBroken(f"unindexing {page}, which is not indexed")
        del self._pages[page.block_hash]

    def match(self, tokens_le: bytes, page_tokens: int, extra_keys: bytes) -> list[Page]:
        """The resident pages of the longest cached prefix, root first (stops at the first miss)."""
        return self.probe(tokens_le, page_tokens, extra_keys)[1]

    def probe(
        self, tokens_le: bytes, page_tokens: int, extra_keys: bytes
    ) -> tuple[list[BlockHash], list[Page]]:
        """(the block hashes of the full pages up to and including the first miss, or all of
        them; the resident pages of the longest cached prefix, root first): one call a lookup."""
        return hashing.probe(self.root, tokens_le, page_tokens, extra_keys, self._pages, self.memo)


def subtree_postorder(page: Page) -> Iterator[Page]:
    """`page` and every resident page extending it, children before parents."""
    stack: list[tuple[Page, bool]] = [(page, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded or not node.children:
            yield node
            continue
        stack.append((node, True))
        stack.extend((child, False) for child in list(node.children))
