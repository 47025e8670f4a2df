"""Prefix sharing through the daemon: a sequence that starts with a sealed prefix gets the
same pages (CACHED, same slots, same bytes) instead of new ones, and two sequences that
write the same prefix at once end up sharing one copy after commit (deduplication).

Two clients = two sessions over the real socket; page counts come from Stats."""

from __future__ import annotations

import kvstore_client
import pytest
import torch
from e2e_helpers import Raw, page_content, page_tokens_of, prompt
from kvstore_client import PageState

NS = "test"  # tests/daemon.py: 4 tokens a page, 64 pages
T = 4
TOTAL = 64


def write(seq: kvstore_client.Sequence, tokens: list[int], pages) -> None:
    """Write page_content into `pages` of `seq` through the client's mapping."""
    ns = seq.namespace
    for page in pages:
        ns.page(page.slot).copy_(
            page_content(page.index, page_tokens_of(tokens, page.index, T), ns.page_shape)
        )


@pytest.fixture
def two_clients(daemon):
    with (
        kvstore_client.connect(daemon.target, client_name="first") as c1,
        kvstore_client.connect(daemon.target, client_name="second") as c2,
        Raw(daemon.target) as raw,
    ):
        yield c1, c2, raw


def test_a_second_sequence_gets_the_sealed_prefix_as_cached_pages(two_clients) -> None:
    c1, c2, raw = two_clients
    shared = prompt(8, seed=10)  # two full pages
    first_tokens = [*shared, *prompt(2, seed=11)]  # + a partial page
    second_tokens = [*shared, *prompt(6, seed=12)]  # + one full page and a partial one of its own

    seq1 = c1.allocate(NS)
    res1 = seq1.append(first_tokens)
    assert [p.state for p in res1.pages] == [PageState.WRITABLE] * 3
    write(seq1, first_tokens, res1.writable_pages)
    assert seq1.commit().sealed_pages == 2
    assert raw.counts(NS) == {
        "pages_total": TOTAL,
        "pages_free": TOTAL - 3,
        "pages_reserved": 1,  # the partial page
        "pages_sealed": 2,
        "pages_pinned": 2,  # held by seq1
        "sequences": 1,
        "sessions": 2,
    }

    seq2 = c2.allocate(NS)
    res2 = seq2.append(second_tokens)
    assert [p.state for p in res2.pages] == [
        PageState.CACHED,
        PageState.CACHED,
        PageState.WRITABLE,
        PageState.WRITABLE,
    ]
    assert res2.cached_tokens == 8
    assert seq2.slots[:2] == seq1.slots[:2], "the shared prefix must be the same pages"
    assert set(seq2.slots[2:]).isdisjoint(seq1.slots)
    # The bytes are there already: seq2 reads what seq1 wrote, through its own client's mapping.
    for i, view in enumerate(seq2.views(res2.cached_pages)):
        assert torch.equal(view, page_content(i, page_tokens_of(shared, i, T), view.shape))

    # No extra page for the shared part: only seq2's own two pages were taken.
    counts = raw.counts(NS)
    assert counts["pages_free"] == TOTAL - 5
    assert counts["pages_sealed"] == 2
    assert counts["pages_reserved"] == 3
    assert counts["pages_pinned"] == 2  # the same two pages, held by both sequences

    write(seq2, second_tokens, res2.writable_pages)
    assert seq2.commit().sealed_pages == 1  # only its own full page is new
    assert raw.counts(NS)["pages_sealed"] == 3

    # A lookup from a third party sees the longest prefix of each.
    with c1.lookup(NS, second_tokens) as found:
        assert found.hit_tokens == 12
        assert found.slots == seq2.slots[:3]

    # Releasing one holder leaves the shared pages pinned by the other; then all unpinned.
    seq1.release()
    counts = raw.counts(NS)
    assert (counts["pages_pinned"], counts["pages_sealed"], counts["pages_reserved"]) == (3, 3, 1)
    seq2.release()
    counts = raw.counts(NS)
    assert (counts["pages_pinned"], counts["pages_sealed"], counts["pages_reserved"]) == (0, 3, 0)
    assert counts["pages_free"] == TOTAL - 3


@pytest.mark.parametrize("shared_pages", [1, 3])
def test_concurrent_writers_of_the_same_prefix_are_deduplicated_at_commit(
    two_clients, shared_pages: int
) -> None:
    """Both append before either commits, so both get WRITABLE pages; the second commit
    finds the hashes sealed, frees its own copies and moves to the first one's slots."""
    c1, c2, raw = two_clients
    common = prompt(shared_pages * T, seed=20)
    tokens1 = [*common, *prompt((3 - shared_pages) * T, seed=21)]
    tokens2 = [*common, *prompt((3 - shared_pages) * T, seed=22)]
    seq1, seq2 = c1.allocate(NS), c2.allocate(NS)
    res1, res2 = seq1.append(tokens1), seq2.append(tokens2)
    assert res1.cached_tokens == res2.cached_tokens == 0
    assert set(seq1.slots).isdisjoint(seq2.slots)
    assert raw.counts(NS)["pages_reserved"] == 6
    write(seq1, tokens1, res1.writable_pages)
    write(seq2, tokens2, res2.writable_pages)
    before = raw.stats(NS)[0]

    first = seq1.commit()
    assert (first.sealed_pages, first.deduplicated_pages) == (3, 0)
    second_slots = seq2.slots
    second = seq2.commit()
    assert (second.sealed_pages, second.deduplicated_pages) == (3 - shared_pages, shared_pages)
    assert [p.index for p in second.moved] == list(range(shared_pages))
    assert seq2.slots[:shared_pages] == seq1.slots[:shared_pages]
    assert seq2.slots[shared_pages:] == second_slots[shared_pages:]

    stats = raw.stats(NS)[0]
    assert stats.deduplicated_pages - before.deduplicated_pages == shared_pages
    assert stats.pages_sealed == 3 + (3 - shared_pages)
    assert stats.pages_reserved == 0
    assert stats.pages_free == TOTAL - stats.pages_sealed  # seq2's duplicate pages went back
    # The freed duplicates are not reachable: the shared prefix resolves to seq1's pages.
    with c2.lookup(NS, tokens2) as found:
        assert found.hit_tokens == 3 * T
        assert found.slots == seq2.slots
        assert found.slots[:shared_pages] == seq1.slots[:shared_pages]
    seq1.release()
    seq2.release()
    assert raw.counts(NS)["pages_pinned"] == 0
