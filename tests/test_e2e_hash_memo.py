"""The lookups' remembered page hashes on a real daemon (docs/hashing.md, "Remembered
hashes"): a Lookup answered from them is the Lookup a daemon without them answers, the
counters in Stats and the metrics move by the pages remembered, and the bounds hold under
many distinct prompts. The memo itself: tests/test_hash_memo.py."""

from __future__ import annotations

from typing import Any

import kvstore_client
import numpy as np
from e2e_helpers import Raw, page_content_bytes, page_tokens_of, prompt
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb
from test_metrics_ops import free_port, scrape

NS = "test"  # tests/daemon.py: 4 tokens a page, 64 pages
T = 4
PAGES = 12


def lookup(raw: Raw, tokens: list[int], extra: bytes = b"") -> pb.LookupResponse:
    ids = np.asarray(tokens, dtype="<u4").tobytes()
    return raw.kv.Lookup(pb.LookupRequest(namespace=NS, token_ids_u32=ids, extra_keys=extra), timeout=10)


def memo(raw: Raw) -> pb.HashMemoStats:
    return raw.kv.Stats(pb.StatsRequest(), timeout=10).hash_memo


def answer(r: pb.LookupResponse) -> tuple:
    return r.hit_tokens, list(r.slots), r.block_hashes


def store(target: str, tokens: list[int]) -> None:
    with kvstore_client.connect(target, client_name="memo") as kv:
        shape = kv.namespace(NS).page_shape
        data = b"".join(
            page_content_bytes(i, page_tokens_of(tokens, i, T), shape) for i in range(-(-len(tokens) // T))
        )
        kv.put(NS, tokens, data)


def test_a_lookup_from_remembered_hashes_answers_what_a_daemon_without_them_does(
    daemon_factory: Any,
) -> None:
    tokens = prompt(PAGES * T + 3, seed=5)  # 12 full pages and a partial one
    changed = list(tokens)
    changed[7 * T + 1] += 1  # page 8 differs: the hit ends after page 7
    port = free_port()
    answers: dict[str, list[tuple]] = {}
    for name, server in (("memo", {"metrics": f"127.0.0.1:{port}"}), ("off", {"hash_memo_entries": 0})):
        d = daemon_factory(server=server).start()
        store(d.target, tokens)
        with Raw(d.target) as raw:
            first = lookup(raw, tokens)
            before = memo(raw)
            again = lookup(raw, tokens)  # every page remembered (the lookup before hashed them)
            after = memo(raw)
            other = lookup(raw, changed)
            last = memo(raw)
        assert first.hit_tokens == PAGES * T and other.hit_tokens == 7 * T
        assert answer(again) == answer(first)
        answers[name] = [answer(first), answer(other)]
        if name == "memo":
            assert (after.hits - before.hits, after.misses - before.misses) == (PAGES, 0)
            # The changed prompt: pages 1-7 remembered, page 8 hashed (its first miss).
            assert (last.hits - after.hits, last.misses - after.misses) == (7, 1)
            assert 0 < last.entries <= last.max_entries and last.bytes <= last.max_bytes
            m = scrape(port)
            assert m[("kvstore_hash_memo_hits_total", ())] >= last.hits
            assert m[("kvstore_hash_memo_max_entries", ())] == last.max_entries > 0
        else:
            assert (last.hits, last.misses, last.max_entries) == (0, 0, 0)
    # Hashes, hits and slots alike (both daemons stored the prompt the same way).
    assert answers["memo"] == answers["off"]


def test_the_daemons_memo_stays_within_its_bounds(daemon_factory: Any) -> None:
    d = daemon_factory(server={"hash_memo_entries": 64, "hash_memo_bytes": 32 << 10}).start()
    with Raw(d.target) as raw:
        # 200 distinct prompts (nothing stored: each lookup hashes its first page and stops).
        for i in range(200):
            assert lookup(raw, prompt(2 * T, seed=100 + i)).hit_tokens == 0
        m = memo(raw)
        assert (m.max_entries, m.max_bytes) == (64, 32 << 10)
        assert m.misses == 200 and m.entries <= 64 and m.evictions >= 200 - 64
        # 1,000-byte extra keys: the byte bound binds first.
        for i in range(100):
            lookup(raw, prompt(2 * T, seed=1), extra=bytes([i % 256]) * 1000)
        m = memo(raw)
        assert m.misses == 300 and m.bytes <= 32 << 10 and m.entries < 32
        # A namespace's Stats do not carry it (every tenant's lookups).
        assert not raw.kv.Stats(pb.StatsRequest(namespace=NS), timeout=10).HasField("hash_memo")
