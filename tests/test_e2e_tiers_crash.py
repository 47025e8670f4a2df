"""kill -9 of the daemon during write-back, in a loop: 0 corrupt pages served, 0 acknowledged
pages lost (issue 5). The loop itself is `kvstore_bench.crashloop` (`kvstore-bench crashloop`
runs it for 1,000 cycles); here it runs 50 in CI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kvstore_client
import pytest
from daemon import SMALL_NAMESPACE
from e2e_helpers import Worker, prompt
from kvstore_bench.crashloop import crash_loop

T = SMALL_NAMESPACE["page_tokens"]


@pytest.mark.slow
def test_50_kill_9_cycles_during_write_back_serve_no_corrupt_page(tmp_path: Path) -> None:
    # Each cycle: start on the same disk tier (write-through, a 16-page pool, an 8-page host
    # tier), wait for the re-index, check what earlier cycles wrote (every flush-acknowledged
    # prompt of the last cycle, a sample of older ones, the last cycle's unacknowledged ones),
    # write and flush until a timer kills the daemon at a seeded random moment. After the
    # last cycle every acknowledged prompt is checked. Pages are compared byte for byte.
    r = crash_loop(tmp_path, cycles=50, seed=5, kill_ms=(20.0, 250.0), sample=8)
    assert r["cycles"] == 50
    assert r["corrupt_served"] == 0, r["failures"]
    assert r["acknowledged_lost"] == 0, r["failures"]
    assert r["acknowledged_short_first_lookup"] == 0, r["failures"]
    assert r["prompts_acknowledged"] > 100 and r["pages_checked"] > 1000, r
    assert r["unacknowledged_hit_whole"] + r["unacknowledged_missed"] > 0, r  # kills hit unflushed work
    assert r["disk_full_events"] == 0  # nothing left the disk tier but by the crash


def test_promotion_from_a_full_host_tier_that_make_room_empties(daemon_factory: Any, tmp_path: Path) -> None:
    """The tier a page is promoted from is chosen after making room for it: the demotion that
    makes room can push the page from a full host tier to disk."""
    ns = dict(SMALL_NAMESPACE, num_pages=4)
    server = {
        "host_tier_bytes": 1024,  # one page
        "disk_tier_dir": str(tmp_path / "disk"),
        "disk_tier_bytes": 16 << 20,
    }
    d = daemon_factory(server=server, namespaces=[ns]).start()
    a = prompt(T, seed=1)
    with Worker("writer") as w, kvstore_client.connect(d.target) as client:
        w.call("connect", target=d.target)
        w.call("write_prompt", namespace="test", tokens=a, release=True)
        client.flush()  # A is on disk...
        client.evict("test", all=True)  # ...and in the host tier (its only page)
        for i in range(4):  # the pool is full of unpinned pages
            w.call("write_prompt", namespace="test", tokens=prompt(T, seed=10 + i), release=True)
        # The lookup makes room for A: one pool page is demoted into the host tier, which
        # moves A out of it (A is on disk already, so it is just removed there).
        assert client.lookup("test", a).hit_tokens == T
