"""`kvstore-bench replay` and kvstore.mrc on small traces: hand-computed hit rates, the
reference bounds (every policy <= Belady <= infinite cache), the command's JSON lines,
and the sampled miss-ratio curve against exact LRU replays."""

from __future__ import annotations

import json
import random

import pytest
from kvstore_bench import replay_store
from kvstore_bench.cli import main
from kvstore_bench.synth_trace import synthesize
from kvstore_bench.trace import Trace, belady_hits, ceiling_hits, parse_trace

from kvstore.mrc import MrcSampler
from kvstore.policy import policy_names

# Capacity 3, LRU leaf-first, by hand:
#   [1,2] miss miss          cache 1 2
#   [1,2] hit hit            (2 hits)
#   [1,3] hit miss           cache 1 2 3 (1 hit)
#   [4]   miss               leaves 2 (touched in request 2) and 3 (sealed in 3): 2 goes
#   [1,2] hit miss           1 pinned; leaves 3, 4: 3 is older and goes (1 hit)
# LRU: 4 hits of 9. Belady: at [4], 3 and 4 are never used again, 3 (deeper) goes, so the
# last request hits both: 5. Infinite cache: 2 + 1 + 2 = 5.
TINY = [[1, 2], [1, 2], [1, 3], [4], [1, 2]]


def lines(requests: list[list[int]]) -> list[str]:
    return [
        json.dumps({"timestamp": i, "input_length": 512 * len(r), "hash_ids": r, "extra": "x"})
        for i, r in enumerate(requests)
    ]


def test_tiny_trace_by_hand():
    trace = parse_trace(lines(TINY))
    assert (trace.accesses, trace.distinct) == (9, 4)
    hits, truncated, _ = replay_store.replay_store(trace, "lru", 3)
    assert hits == [0, 2, 1, 0, 1] and truncated == 0
    assert belady_hits(trace, 3) == [0, 2, 1, 0, 2]
    assert ceiling_hits(trace) == [0, 2, 1, 0, 2]


def test_block_keys_are_whole_prefixes():
    # id 7 after 5 and id 7 after 6 are different blocks, even if a trace reuses ids.
    trace = parse_trace(lines([[5, 7], [6, 7], [5, 7]]))
    assert trace.distinct == 4
    assert ceiling_hits(trace) == [0, 0, 2]


def test_request_longer_than_the_cache_caches_what_fits():
    trace = parse_trace(lines([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]]))
    hits, truncated, _ = replay_store.replay_store(trace, "lru", 3)
    assert truncated == 2 and hits == [0, 3]  # the first 3 blocks stay, root first


def synthetic(n: int = 600, seed: int = 0) -> Trace:
    rng = random.Random(seed)
    sizes = [(float(i), rng.randint(64, 2048), rng.randint(1, 200)) for i in range(n)]
    reqs = synthesize(sizes, n, block_tokens=128, documents=20, doc_blocks=(1, 6), seed=seed)
    return parse_trace(json.dumps(r) for r in reqs)


@pytest.mark.parametrize("capacity", [8, 40, 150])
def test_belady_bounds_every_policy_and_the_ceiling_bounds_belady(capacity):
    trace = synthetic()
    belady = sum(belady_hits(trace, capacity))
    ceiling = sum(ceiling_hits(trace))
    assert belady <= ceiling
    for policy in policy_names():
        hits, _, _ = replay_store.replay_store(trace, policy, capacity)
        assert 0 < sum(hits) <= belady, policy


def test_belady_with_room_for_everything_is_the_ceiling():
    trace = synthetic(200)
    assert belady_hits(trace, trace.distinct) == ceiling_hits(trace)


def test_command_prints_one_json_object_per_run(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines(TINY)) + "\n")
    assert (
        main(["replay", "--trace", str(path), "--capacity-blocks", "3", "--policy", "lru,horizon", "--json"])
        == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["policy"], r["capacity_blocks"]) for r in rows] == [("lru", 3), ("horizon", 3)]
    lru = rows[0]
    assert (lru["hit_rate"], lru["belady_hit_rate"], lru["ceiling"]) == pytest.approx((4 / 9, 5 / 9, 5 / 9))
    assert lru["ratio_to_belady"] == pytest.approx(0.8)
    # compute_saved: cost(i) = i + 1 + C, C = 6 * 4096 / 512 = 48; hits at positions 0,1 | 0 | 0.
    total = 4 * (49 + 50) + 49
    assert lru["compute_saved"] == pytest.approx((49 + 50 + 49 + 49) / total)
    assert lru["accesses_per_s"] > 0


def test_command_capacity_fractions_policies_and_errors(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines(TINY)))
    assert (
        main(["replay", "--trace", str(path), "--capacity-frac", "0.5,1.0", "--policy", "all", "--json"]) == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["capacity_blocks"] for r in rows} == {2, 4}
    assert {r["policy"] for r in rows} == set(policy_names())
    assert all(r["hit_rate"] <= r["belady_hit_rate"] <= r["ceiling"] for r in rows)
    assert main(["replay", "--trace", str(path), "--policy", "nope"]) == 1
    assert "unknown policy 'nope'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_length": 3}\n')
    assert main(["replay", "--trace", str(bad)]) == 1
    assert "bad.jsonl:1: not a request with hash_ids" in capsys.readouterr().err


def test_mrc_distances_and_curve_are_exact_without_sampling():
    s = MrcSampler(rate=1.0)
    for block in [b"a", b"b", b"c", b"a", b"b", b"b"]:
        s.record(block)
    assert s.distances() == [-1, -1, -1, 2, 2, 0]
    # LRU of 1 block: the last b hits; of 3: a, b, b hit.
    assert s.curve([1, 2, 3]) == [
        (1, pytest.approx(1 / 6)),
        (2, pytest.approx(1 / 6)),
        (3, pytest.approx(3 / 6)),
    ]


def test_mrc_keeps_a_bounded_sample():
    s = MrcSampler(rate=1.0, max_keys=64)
    for i in range(5000):
        s.record(i.to_bytes(8, "little"))
    assert s.rate < 1.0 and len(set(s._log)) <= 64


def test_mrc_estimate_is_close_to_exact_lru_replays():
    trace = synthetic(2000, seed=3)
    s = MrcSampler(rate=0.5)
    for chain in trace.requests:
        s.record_request(trace.keys[n] for n in chain)
    caps = [max(1, round(f * trace.distinct)) for f in (0.01, 0.05, 0.1, 0.25)]
    for cap, est in s.curve(caps):
        exact = sum(replay_store.replay_store(trace, "lru", cap)[0]) / trace.accesses
        assert abs(est - exact) <= 0.03, (cap, est, exact)


def test_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines(TINY)))
    png = tmp_path / "mrc.png"
    assert (
        main(
            [
                "replay",
                "--trace",
                str(path),
                "--capacity-blocks",
                "2,3",
                "--policy",
                "lru",
                "--plot",
                str(png),
            ]
        )
        == 0
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_policy_default_is_the_configured_default(tmp_path, capsys):
    from kvstore.config import ServerConfig

    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines(TINY)))
    assert main(["replay", "--trace", str(path), "--capacity-blocks", "3", "--json"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["policy"] == ServerConfig().default_policy


def test_a_quantized_host_tier_holds_more_pages_and_reaches_a_higher_hit_rate(tmp_path, capsys):
    """`--host-tier-bytes`: the pool's evictions go to a host tier of fixed bytes; at int8 and
    int4 its records (measured with the daemon's codec) are smaller, so it holds more pages and
    more lookups hit. With a host tier too small for one page, the hit rate is the pool's alone."""
    rng = random.Random(7)
    requests = [[rng.randrange(12), 100 + rng.randrange(30)] for _ in range(300)]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines(requests)) + "\n")
    base = ["replay", "--trace", str(path), "--capacity-blocks", "4", "--policy", "lru", "--json"]
    tiny = ["--block-size", "16", "--kv-geometry", "2,2,64,float16"]  # 16 KiB pages
    assert main([*base, *tiny, "--host-tier-bytes", "100"]) == 0
    alone = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out.splitlines()[0])
    assert [r["host_hits"] for r in alone] == [0, 0, 0]
    assert {r["hit_rate"] for r in alone} == {plain["hit_rate"]}

    assert main([*base, *tiny, "--host-tier-bytes", "256KiB"]) == 0
    rows = {r["tier_dtype"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    fp, int8, int4 = rows["fp"], rows["int8"], rows["int4"]
    assert fp["host_pages"] == 16 and fp["compression"] == 1.0
    assert int8["compression"] > 1.5 and int4["compression"] > 2.5
    assert fp["host_pages"] < int8["host_pages"] < int4["host_pages"]
    assert plain["hit_rate"] < fp["hit_rate"] < int8["hit_rate"] <= int4["hit_rate"]
    assert all(r["hits"] == r["pool_hits"] + r["host_hits"] for r in rows.values())
