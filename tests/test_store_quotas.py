"""A namespace's page quota per session (kvstore/store/quotas.py) on a real store with a host
tier: what a swapped-out sequence will bring back counts, so SwapIn never passes the quota."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from pathlib import Path

import pytest
from store_helpers import SPEC, T, write

from kvstore.errors import ResourceExhausted
from kvstore.store import waits
from kvstore.store.store import Store
from kvstore.store.tiering.tiers import Tiers
from kvstore.store.types import StoreLimits
from kvstore.tiers import HostTier


def test_a_swapped_out_sequence_counts_against_its_sessions_quota(tmp_path: Path) -> None:
    store = Store(
        StoreLimits(), f"kvt-{uuid.uuid4().hex[:8]}-", tiers=Tiers(HostTier(64 * SPEC.page_bytes), None)
    )
    try:
        store.create_namespace(dataclasses.replace(SPEC, max_session_pages=4))
        sid = store.open_session("q", 60).session_id
        seq = write(store, sid, list(range(3 * T)))
        assert store.preempt(sid, seq, "swap_out") == (3, 3)
        # Its 3 pages are below the pool now, but SwapIn would bring them back.
        with pytest.raises(
            ResourceExhausted,
            match=r"holds 3 pages and allocate.* needs 2 more; the quota is max_session_pages=4",
        ):
            store.allocate(sid, "t", 2 * T, b"")
        other, _ = store.allocate(sid, "t", T, b"")
        view = asyncio.run(waits.swap_in(store, sid, seq))
        assert len(view.pages) == 3
        assert store.stats("t")[0].session_pages_refused == 1
        store.release_sequence(sid, other)
    finally:
        store.close()
