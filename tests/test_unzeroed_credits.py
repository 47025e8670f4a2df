"""Credits of freed pages not zeroed yet (docs/security.md, "Unzeroed credits";
kvstore/memory/pages.py take_many, kvstore/store/credit.py grant). A credit whose client writes
every byte of each page it puts (`unzeroed_ok`: the library's put) takes the dirty free pages
no zeroing job holds as they are, first, and zeroes none, so in a full pool, where each grant
evicts, the pages it evicts go to the next put without a zeroing write; the pages of such a
credit a put does not seal go back dirty; everyone else still gets zeroed pages (a page
committed without being written reads zeros), and `server.unzeroed_credits = false` hands out
zeroed credits only. The count of dirty free pages stays exact throughout.
In process: a real Store with a memfd pool of 128 pages of 1 MiB and its Integrity; and the
real daemon with the client library."""

from __future__ import annotations

import time
import uuid

import kvstore_client
import numpy as np
from e2e_helpers import Worker, prompt, read_page
from test_integrity_put_path import _fill, _filled

from kvstore.memory.pages import FREE
from kvstore.store import credit
from kvstore.store.integrity import Integrity, IntegrityConfig
from kvstore.store.store import Store
from kvstore.store.types import NamespaceSpec, StoreLimits

NUM_PAGES = 128
T = 16  # tokens a page
JOB = 32  # pages one zeroing job holds (32 MiB of 1 MiB pages)


def _store() -> tuple[Store, Integrity, object]:
    store = Store(StoreLimits(), shm_prefix=f"kvtest-uz-{uuid.uuid4().hex[:12]}-")
    integrity = Integrity(IntegrityConfig(scrub_bytes_per_s=0, zero_after_s=0), lambda: store.sessions)
    store.attach = integrity.attach
    store.create_namespace(NamespaceSpec("ns", 8, 2, 1024, "float16", T, NUM_PAGES))
    ns = store.namespaces["ns"]
    assert ns.spec.page_bytes == 1 << 20
    return store, integrity, ns


def _free(ns, dirty: bool) -> list[int]:
    return [p.slot for p in ns.pages.pages if p.state is FREE and p.dirty == dirty]


def _check_count(ns) -> None:
    assert ns.pages.dirty_free == len(_free(ns, dirty=True))


async def test_an_unzeroed_credit_takes_dirty_pages_as_they_are_and_zeroes_none() -> None:
    store, integrity, ns = _store()
    try:
        pages = ns.reserve_many(1, NUM_PAGES)  # every page filled and freed: all dirty
        for page in pages:
            _fill(ns, page.slot, 0xA5)
        for page in pages:
            ns.free_reserved(page)
        _check_count(ns)
        await integrity._one_job(ns.guard, lambda: store.namespaces)  # one job: zeroes JOB of them
        clean_before = set(_free(ns, dirty=False))
        assert len(clean_before) == JOB and all(_filled(ns, s, 0) for s in clean_before)
        _check_count(ns)
        zeroed = dict(ns.guard.counts)
        sid = store.open_session("unzeroed", 600).session_id
        grant = credit.grant(store, store.session(sid), ns, 8, unzeroed_ok=True)
        assert grant.sequence_id and grant.unzeroed
        assert not clean_before & set(grant.slots), "the dirty pages, not the zeroed ones"
        assert all(_filled(ns, s, 0xA5) for s in grant.slots), "handed out as they were"
        assert ns.guard.counts == zeroed, "nothing zeroed for it"
        _check_count(ns)
        # The put writes 6 pages of the 8 (every byte of each); the next credit as unzeroed.
        for slot in grant.slots[:6]:
            _fill(ns, slot, 0x11)
        tokens = [(7 * j) % 1000 for j in range(6 * T)]
        _, committed, nxt = credit.put(
            store, sid, "ns", tokens, b"", "", grant.sequence_id, grant.slots[:6], 8, unzeroed_ok=True
        )
        assert committed.sealed_pages == 6 and nxt.unzeroed
        assert all(_filled(ns, s, 0x11) for s in grant.slots[:6])
        # The unused two went back dirty, and the next credit took them again as they were.
        assert set(grant.slots[6:]) <= set(_free(ns, dirty=True)) | set(nxt.slots)
        assert all(_filled(ns, s, 0xA5) for s in grant.slots[6:]), "not zeroed"
        assert ns.guard.counts == zeroed
        _check_count(ns)
        # A credit without unzeroed_ok (another client's) gets zeroed pages, as before.
        plain = credit.grant(store, store.session(store.open_session("plain", 600).session_id), ns, 8)
        assert not plain.unzeroed and all(_filled(ns, s, 0) for s in plain.slots)
        _check_count(ns)
    finally:
        integrity.close()
        store.close()


# One page: 32 layers x 2 x 8 tokens x 4 heads x 256 dims x 2 B = 1 MiB; 128 pages: a zeroing
# job holds 32, so 32 are zeroed ahead, at most.
BIG = {"name": "big", "num_layers": 32, "num_kv_heads": 4, "head_dim": 256, "dtype": "float16",
       "page_tokens": 8, "num_pages": 128}  # fmt: skip
PUT = 12  # pages a put


def test_the_librarys_puts_take_unzeroed_credits_and_an_unwritten_commit_still_reads_zeros(
    daemon_factory,
) -> None:
    """In a full pool each grant evicts: the pages it evicts are its own next put's, dirty,
    and no zeroing write is spent on them."""
    daemon = daemon_factory(namespaces=[BIG]).start()
    with kvstore_client.connect(daemon.target, client_name="putter") as kv:
        size = kv.namespace("big").pool.page_bytes
        assert size == 1 << 20
        prompts = [prompt(PUT * 8, seed=1000 + i) for i in range(30)]  # 360 pages through 128
        for i, tokens in enumerate(prompts):
            kv.put("big", tokens, np.full(PUT * size, i, dtype=np.uint8))
            (held,) = kv._credits._held["big"]
            assert held.unzeroed, "the library asks for unzeroed credits"
        for i, tokens in enumerate(prompts[-4:], start=len(prompts) - 4):
            out = np.zeros(PUT * size, dtype=np.uint8)
            assert kv.get("big", tokens, out).pages == PUT and (out == i).all()
        s = kv.stats("big").namespaces[0]
        assert s.evictions >= 200, s
        # (zeroed credits zero every page their grants evict: the test below)
        assert s.pages_zeroed + s.pages_zeroed_inline <= s.evictions // 4, s
    # Another client's pages committed without being written, from this pool.
    with Worker("lazy") as lazy:
        lazy.call("connect", target=daemon.target, client_name="lazy")
        seq = lazy.call("allocate", namespace="big")["sequence_id"]
        slots = lazy.call("append", sequence_id=seq, tokens=prompt(60 * 8, seed=9))["slots"]
        lazy.call("commit", sequence_id=seq)  # nothing written
        for slot in slots[::7]:
            got = lazy.call("read_bytes", namespace="big", slot=slot, offset=size - 4096, n=4096)
            assert got == "00" * 4096, f"slot {slot}: old bytes"


def test_a_daemon_with_unzeroed_credits_off_hands_out_zeroed_pages_only(daemon_factory) -> None:
    """`server.unzeroed_credits = false`: the library's puts get zeroed credits, as before."""
    daemon = daemon_factory(namespaces=[BIG], server={"unzeroed_credits": False}).start()
    with kvstore_client.connect(daemon.target, client_name="careful") as kv:
        size = kv.namespace("big").pool.page_bytes
        for i in range(30):
            kv.put("big", prompt(PUT * 8, seed=1000 + i), np.full(PUT * size, 0xA5, dtype=np.uint8))
            (held,) = kv._credits._held["big"]
            assert not held.unzeroed
            for slot in held.slots[::5]:  # (read through the pool's fd, before any write)
                assert read_page(daemon.target, "big", slot)[-4096:] == bytes(4096), f"slot {slot}"
        s = kv.stats("big").namespaces[0]
        assert s.evictions >= 200, s
        assert s.pages_zeroed + s.pages_zeroed_inline >= s.evictions - 2 * PUT, s


def test_freed_pages_stay_unzeroed_for_zero_freed_after_s_counted_in_stats(daemon_factory) -> None:
    """After `evict --all` the freed pages wait `server.zero_freed_after_s` before the thread
    zeroes them (Stats `pages_free_unzeroed` counts them meanwhile); a taker that does not write
    them whole still gets zeros (zeroed as they are taken)."""
    daemon = daemon_factory(namespaces=[BIG], server={"zero_freed_after_s": 3600}).start()
    with kvstore_client.connect(daemon.target, client_name="putter") as kv:  # (its credit held throughout)
        size = kv.namespace("big").pool.page_bytes
        for i in range(4):
            kv.put("big", prompt(PUT * 8, seed=2000 + i), np.full(PUT * size, 0xA5, dtype=np.uint8))
        before = kv.stats("big").namespaces[0]
        evicted = kv.evict("big", all=True).pages_evicted
        assert evicted == 4 * PUT
        s = kv.stats("big").namespaces[0]
        assert s.pages_free_unzeroed == before.pages_free_unzeroed + evicted, s
        assert s.pages_zeroed == before.pages_zeroed, s  # none zeroed in the background
        clean = s.pages_free - s.pages_free_unzeroed
        with Worker("lazy") as lazy:  # takes every clean free page, then 8 dirty ones
            lazy.call("connect", target=daemon.target, client_name="lazy")
            seq = lazy.call("allocate", namespace="big")["sequence_id"]
            slots = lazy.call("append", sequence_id=seq, tokens=prompt((clean + 8) * 8, seed=9))["slots"]
            lazy.call("commit", sequence_id=seq)  # nothing written
            for slot in slots[-8:]:
                got = lazy.call("read_bytes", namespace="big", slot=slot, offset=size - 4096, n=4096)
                assert got == "00" * 4096, f"slot {slot}: old bytes"
            after = kv.stats("big").namespaces[0]
        assert after.pages_free_unzeroed == s.pages_free_unzeroed - 8, after
        assert after.pages_zeroed_inline == s.pages_zeroed_inline + 8, after


def test_the_daemon_zeroes_freed_pages_once_they_have_waited_zero_freed_after_s(daemon_factory) -> None:
    daemon = daemon_factory(namespaces=[BIG], server={"zero_freed_after_s": 0.3}).start()
    with kvstore_client.connect(daemon.target, client_name="putter") as kv:
        size = kv.namespace("big").pool.page_bytes
        for i in range(4):
            kv.put("big", prompt(PUT * 8, seed=3000 + i), np.full(PUT * size, 0xA5, dtype=np.uint8))
        zeroed = kv.stats("big").namespaces[0].pages_zeroed
        evicted_at = time.monotonic()
        evicted = kv.evict("big", all=True).pages_evicted
        while (s := kv.stats("big").namespaces[0]).pages_free_unzeroed:
            assert time.monotonic() - evicted_at < 30, f"freed pages not zeroed in 30 s: {s}"
            time.sleep(0.02)
        assert time.monotonic() - evicted_at >= 0.3  # not before they had waited that long
        assert s.pages_zeroed == zeroed + evicted, s
        # Read from this process through the pool's descriptor: every page but the held
        # credit's (taken as it was, for the next put to overwrite) is zeros now.
        (credit,) = kv._credits._held["big"]
        for slot in sorted(set(range(BIG["num_pages"])) - set(credit.slots)):
            assert read_page(daemon.target, "big", slot) == bytes(size), f"slot {slot}: old bytes"
