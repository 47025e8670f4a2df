"""Zero-copy across processes: KV written by one process into its pages is read by another
through its own mapping of the pool, and is the very memory the daemon's pool holds.

Process A writes a 2,000-token prompt and keeps running (holding its session and sequence)
while process B looks the prefix up with a pin and checks every byte. Then A hands B a page
it is still writing (WRITABLE: sealed pages are immutable by contract); B writes a marker
into it and A sees the marker through its own mapping, with no RPC in between.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from daemon import DaemonProcess
from e2e_helpers import (
    Raw,
    Worker,
    page_content_bytes,
    page_tokens_of,
    prompt,
    sha256,
)

PAGE_TOKENS = 16
NAMESPACE = {
    "name": "zc",
    "num_layers": 2,
    "num_kv_heads": 2,
    "head_dim": 16,
    "dtype": "float16",
    "page_tokens": PAGE_TOKENS,
    "num_pages": 256,  # 4 KiB pages: a 1 MiB pool
}
PROMPT_TOKENS = 2000


@pytest.fixture(scope="module")
def procs() -> Iterator[tuple[DaemonProcess, Worker, Worker, Raw]]:
    """One daemon and two client processes, A and B, each with its own session and mapping,
    shared by the tests of this module (each test uses its own prompt and releases what it
    holds)."""
    with DaemonProcess(namespaces=[NAMESPACE]) as d:
        d.start()
        # Both processes start at once (each imports torch): ready in about a second.
        with Worker("A") as a, Worker("B") as b, Raw(d.target) as raw:
            a.call("connect", target=d.target, client_name="A")
            b.call("connect", target=d.target, client_name="B")
            yield d, a, b, raw


def test_a_writes_b_reads_the_same_bytes_and_the_shm_file_holds_them(procs) -> None:
    _, a, b, raw = procs
    tokens = prompt(PROMPT_TOKENS, seed=1)
    full_pages = PROMPT_TOKENS // PAGE_TOKENS
    before = raw.counts("zc")

    written = a.call("write_prompt", namespace="zc", tokens=tokens)
    assert written["states"] == ["WRITABLE"] * full_pages  # nobody had this prefix
    assert written["sealed_pages"] == full_pages
    slots = written["slots"]
    assert len(set(slots)) == full_pages

    found = b.call("lookup", namespace="zc", tokens=tokens, pin=True)
    assert a.alive(), "A must still hold its session while B reads"
    assert found["hit_tokens"] == PROMPT_TOKENS // PAGE_TOKENS * PAGE_TOKENS
    assert found["slots"] == slots, "B must get A's pages, not copies"
    assert found["pin_id"] != 0

    checked = b.call("verify", namespace="zc", tokens=tokens, slots=found["slots"])
    assert checked["mismatched"] == [], f"B read pages that differ from what A wrote: {checked}"

    # The daemon's pool holds exactly those bytes (read here with pread on a descriptor of it).
    pool = raw.pool("zc")
    for i, slot in enumerate(slots):
        on_disk = raw.read_page("zc", slot)
        want = page_content_bytes(i, page_tokens_of(tokens, i, PAGE_TOKENS), pool.page_shape)
        assert on_disk == want, f"page {i} (slot {slot}) of the pool differs"
        assert sha256(on_disk) == checked["digests"][i]

    # A's sequence and B's pin both hold the prefix: sealed and pinned, nothing reserved.
    counts = raw.counts("zc")
    assert counts["pages_sealed"] == before["pages_sealed"] + full_pages
    assert counts["pages_pinned"] == before["pages_pinned"] + full_pages
    assert counts["pages_reserved"] == before["pages_reserved"]
    assert counts["sessions"] == 2

    b.call("release_pin", pin_id=found["pin_id"])
    a.call("release", sequence_id=written["sequence_id"])
    after = raw.counts("zc")
    assert after["pages_pinned"] == before["pages_pinned"]
    assert after["pages_sealed"] == before["pages_sealed"] + full_pages  # still cached


def test_b_writes_into_a_writable_page_of_a_and_a_sees_it_in_place(procs) -> None:
    _, a, b, raw = procs
    seq = a.call("allocate", namespace="zc")
    appended = a.call("append", sequence_id=seq["sequence_id"], tokens=prompt(5, seed=2))
    assert appended["states"] == ["WRITABLE"]  # a partial page: A's, still being written
    (slot,) = appended["slots"]

    pool = raw.pool("zc")
    page_bytes = pool.page_bytes
    neighbours = {s: raw.read_page("zc", s) for s in (slot - 1, slot + 1) if 0 <= s < pool.num_pages}

    # B -> A: B writes through its mapping, A reads through its own. No RPC in between.
    marker = os.urandom(page_bytes // 2)
    b.call("write_bytes", namespace="zc", slot=slot, offset=0, data_hex=marker.hex())
    seen_by_a = a.call("read_bytes", namespace="zc", slot=slot, offset=0, n=len(marker))
    assert bytes.fromhex(seen_by_a) == marker, "A does not see B's write: the pages are not shared"

    # A -> B, into the other half of the same page.
    answer = os.urandom(page_bytes - len(marker))
    a.call("write_bytes", namespace="zc", slot=slot, offset=len(marker), data_hex=answer.hex())
    seen_by_b = b.call("read_bytes", namespace="zc", slot=slot, offset=len(marker), n=len(answer))
    assert bytes.fromhex(seen_by_b) == answer

    # The daemon's pool is that same memory, and the writes stayed inside the page.
    assert raw.read_page("zc", slot) == marker + answer
    for s, was in neighbours.items():
        assert raw.read_page("zc", s) == was, f"slot {s} next to the written page changed"

    a.call("release", sequence_id=seq["sequence_id"])
    assert raw.counts("zc")["pages_reserved"] == 0
