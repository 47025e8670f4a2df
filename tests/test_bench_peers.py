"""`kvstore-bench peers` at tiny sizes: kvstore's side against its own daemon and the memcpy
baseline, the peers skipped for want of their venv (a reason each, null ratios, never a
number), both orders, and the JSON keys the issue names."""

from __future__ import annotations

import json

import kvstore_client
import pytest
from kvstore_bench.cli import main
from kvstore_bench.harness import BenchDaemon
from kvstore_bench.peers_kvstore import GEOMETRY, PAGE_BYTES, KvstoreSide, namespace_spec, page_data


def test_page_geometry_is_one_smollm2_page():
    g = GEOMETRY
    assert (
        g["num_layers"] * 2 * g["page_tokens"] * g["num_kv_heads"] * g["head_dim"] * 4
        == PAGE_BYTES
        == 737_280
    )


def test_tiny_run_measures_kvstore_and_memcpy_and_skips_missing_peers(tmp_path, capsys):
    missing = tmp_path / "no-venv" / "bin" / "python"
    argv = ["peers", "--json", "--pages", "4", "--sizes", "1,4", "--repeat", "1", "--rounds", "2"]
    assert main([*argv, "--peers-python", str(missing)]) == 0
    r = json.loads(capsys.readouterr().out)

    for key in ("put_vs_mooncake_1", "get_vs_mooncake_1", "put_vs_mooncake_16", "get_vs_mooncake_16"):
        assert key in r and r[key] is None
    assert r["vs_redis_min"] is None
    assert r["goals"]["vs_redis_min"]["met"] is None
    for peer in ("mooncake", "mooncake-standalone", "redis-unix", "redis-tcp", "lmcache"):
        assert r["systems"][peer]["available"] is False
        assert str(missing) in r["systems"][peer]["reason"]
    kv, memcpy = r["systems"]["kvstore"], r["systems"]["memcpy"]
    off = r["systems"]["kvstore-integrity-off"]  # (its own daemon, checksums and zeroing off)
    for size in ("1", "4"):
        assert memcpy["copy_gbps"][size] > 0
        for op in ("put_gbps", "get_gbps", "get_zero_copy_gbps"):
            assert kv[op][size] > 0 and off[op][size] > 0
    assert r["integrity_off"]["put_vs_mooncake_16"] is None and r["integrity_off"]["vs_redis_min"] is None
    # The guarded daemon took checksums (or counted those it missed); the other did not. (Each
    # pass evicts the last one's pages, but the next pass's credits take them back within
    # server.zero_freed_after_s, whole: a run this short may zero none.)
    guarded, bare = r["integrity_counts"]["kvstore"], r["integrity_counts"]["kvstore-integrity-off"]
    assert guarded["pages_checksummed"] + guarded["pages_unchecked"] > 0
    assert bare == dict.fromkeys(guarded, 0)
    assert [o["order"][:2] for o in r["by_order"]] == [
        ["kvstore", "kvstore-integrity-off"],
        ["mooncake", "mooncake-standalone"],
    ]
    assert r["by_order"][1]["order"][-2:] == ["kvstore-integrity-off", "kvstore"]
    for o in r["by_order"]:  # each round's own GB/s, of the systems that ran (none skipped)
        assert set(o["gbps"]) == {"memcpy", "kvstore", "kvstore-integrity-off"}
        assert o["gbps"]["kvstore"]["put_gbps"]["4"] > 0 and o["gbps"]["memcpy"]["copy_gbps"]["4"] > 0
    per_round = [o["gbps"]["kvstore"]["put_gbps"]["4"] for o in r["by_order"]]
    assert kv["put_gbps"]["4"] == pytest.approx(sum(per_round) / 2, abs=0.002)  # (the mean's parts)
    assert r["config"]["page_bytes"] == 737_280


def test_profile_splits_a_request_per_side(capsys):
    # 64 pages of 4 a request: the pool is sized by the pages (64 + 3 x 4), not by the credit
    # share (8 x 4), so every page must survive its pass beside the credit and the credit's
    # worth a full pool keeps zeroed ahead (with room for only two credits, gets missed).
    argv = ["peers-profile", "--json", "--pages", "64", "--sizes", "4", "--repeat", "1"]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    put, get = r["sizes"]["4"]["put"], r["sizes"]["4"]["get"]
    for row in (put, get):
        assert row["wall_ms"] > 0 and row["copy_ms"] > 0 and row["daemon_cpu_ms"] > 0
        assert row["copy_ms"] + row["client_cpu_ms"] <= row["wall_ms"] * 1.05
        assert row["daemon_main_ms"] <= row["daemon_cpu_ms"]
    every, main_thread = r["daemon_cpu_s"]  # (the whole run: at least its two passes' share)
    assert every >= main_thread > 0 and every * 1000 >= (put["daemon_cpu_ms"] + get["daemon_cpu_ms"]) * 16
    assert r["daemon_minor_faults"] >= 0


def test_the_kvstore_sides_put_of_the_largest_size_is_one_put_into_a_credit():
    """The first put of a size is Reserve + Seal (granting a credit), the next ones one Put:
    the bench's pool is big enough for a credit of its largest request (a credit is at most
    1/8 of the pool), as the put it reports is meant to be."""
    pages, k = 8, 4
    src = page_data(0, pages)
    daemon = BenchDaemon([namespace_spec(pages, k)], server={"max_pool_bytes": "1GiB"})
    with daemon, kvstore_client.connect(daemon.target, client_name="bench-credit") as kv:
        side = KvstoreSide(kv)
        for i in range(pages // k):
            side.put(list(range(i * 1000, i * 1000 + k * 16)), src[i * k : (i + 1) * k])
        calls = {c.method: c.calls for c in kv.stats().rpc_calls if c.code == "OK"}
    assert calls.get("KVStore/Reserve") == 1 and calls.get("KVStore/Put") == 1, calls
