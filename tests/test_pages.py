"""The page table and its intrusive free list (kvstore/memory/pages.py)."""

from __future__ import annotations

import pytest

from kvstore.errors import InvariantBroken
from kvstore.memory.pages import FreeList, Page, PageState, PageTable


def drain(free: FreeList) -> list[int]:
    slots = []
    while (page := free.pop()) is not None:
        slots.append(page.slot)
    return slots


def test_free_list_is_fifo_and_counts():
    pages = [Page(i) for i in range(5)]
    free = FreeList(pages)
    assert len(free) == 5
    assert free.pop() is pages[0]
    assert free.pop() is pages[1]
    assert len(free) == 3
    free.push(pages[0])  # freed pages go to the tail
    assert len(free) == 4
    assert drain(free) == [2, 3, 4, 0]
    assert len(free) == 0
    assert free.pop() is None
    assert len(free) == 0


def test_free_list_remove_from_head_middle_tail():
    pages = [Page(i) for i in range(5)]
    free = FreeList(pages)
    free.remove(pages[2])  # middle
    free.remove(pages[0])  # head
    free.remove(pages[4])  # tail
    assert len(free) == 2
    for p in (pages[0], pages[2], pages[4]):
        assert p.prev is None and p.next is None
    free.push(pages[2])
    assert drain(free) == [1, 3, 2]


def test_free_list_remove_only_element_then_reuse():
    page = Page(7)
    free = FreeList([page])
    free.remove(page)
    assert len(free) == 0
    assert free.pop() is None
    free.push(page)
    assert len(free) == 1
    assert free.pop() is page


def test_free_list_double_push_is_refused():
    page = Page(0)
    free = FreeList([page])
    with pytest.raises(InvariantBroken, match="already linked"):
        free.push(page)
    assert len(free) == 1  # the failed push changed nothing
    assert drain(free) == [0]


def test_free_list_remove_unlinked_is_refused():
    page = Page(0)
    free = FreeList([])
    with pytest.raises(InvariantBroken, match="not linked"):
        free.remove(page)
    assert len(free) == 0


def test_free_list_does_not_link_sentinels_into_pages():
    pages = [Page(i) for i in range(3)]
    FreeList(pages)
    # Each page is linked between neighbours; the ends point at sentinels (slot -1), never None.
    assert pages[0].prev is not None and pages[0].prev.slot == -1
    assert pages[2].next is not None and pages[2].next.slot == -1
    assert pages[0].next is pages[1] and pages[1].prev is pages[0]


def test_free_list_ops_are_constant_time():
    # O(1): removing one page of a large list touches only its neighbours.
    pages = [Page(i) for i in range(10_000)]
    free = FreeList(pages)
    free.remove(pages[5000])
    assert pages[4999].next is pages[5001]
    assert pages[5001].prev is pages[4999]
    assert len(free) == 9_999


def test_page_table_take_and_give_back():
    table = PageTable(3)
    assert len(table) == 3
    assert len(table.free) == 3
    assert all(p.state is PageState.FREE for p in table.pages)

    a = table.take(owner=11)
    b = table.take(owner=12)
    assert a is not None and b is not None
    assert (a.slot, b.slot) == (0, 1)
    assert a.state is PageState.RESERVED and a.owner == 11
    assert b.owner == 12
    assert len(table.free) == 1

    c = table.take(owner=13)
    assert c is not None and c.slot == 2
    assert table.take(owner=14) is None
    assert len(table.free) == 0

    # Dirty a page the way a sealed one looks, then give it back: everything is cleared.
    parent = table.pages[1]
    a.state = PageState.SEALED
    a.refcount = 3
    a.block_hash = b"x" * 16
    a.parent = parent
    a.children = {c}
    a.policy_state = 42
    table.give_back(a)
    assert a.state is PageState.FREE
    assert a.refcount == 0
    assert a.block_hash is None
    assert a.parent is None
    assert a.children is None
    assert a.owner == 0
    assert a.policy_state is None
    assert len(table.free) == 1
    assert table.take(owner=15) is a


def test_page_table_give_back_twice_is_refused():
    table = PageTable(2)
    page = table.take(owner=1)
    assert page is not None
    table.give_back(page)
    with pytest.raises(InvariantBroken):
        table.give_back(page)
    assert len(table.free) == 2


def test_page_evictable_means_sealed_unpinned_leaf():
    page, child = Page(0), Page(1)
    assert not page.evictable  # FREE
    page.state = PageState.RESERVED
    assert not page.evictable
    page.state = PageState.SEALED
    assert page.evictable and page.is_leaf
    page.refcount = 1
    assert not page.evictable
    page.refcount = 0
    page.children = {child}
    assert not page.evictable and not page.is_leaf
    page.children = set()  # emptied by evicting the last child
    assert page.evictable and page.is_leaf
