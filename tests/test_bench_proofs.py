"""`kvstore-bench fuzz`, `soak` and `killed-clients` at --quick size (the full runs are in
BENCHMARKS.md): each runs its real daemon and client processes and says ok, and the JSON
shows the work behind each verdict was done (requests sent and answered by code, pages read
back and compared, victims killed and timed), so an `ok` cannot come from doing nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any


def bench(*argv: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    out = subprocess.run(
        [sys.executable, "-m", "kvstore_bench.cli", *argv, "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert out.stdout, out.stderr[-4000:]
    result = json.loads(out.stdout)
    failed = [k for k, v in result["checks"].items() if not v]
    assert out.returncode == 0 and result["ok"] and not failed, (failed, out.stderr[-4000:])
    return result


def test_fuzz_quick() -> None:
    r = bench("fuzz")
    assert r["auth"] and r["requests"] == sum(r["by_code"].values()) == 600
    assert r["methods"] >= 30  # every method of KVStore, Admin, health and reflection
    assert {"OK", "INVALID_ARGUMENT", "UNAUTHENTICATED"} <= set(r["by_code"])
    for cred in ("none", "wrong", "malformed"):  # refused (auth_bypassed: none answered OK but health's)
        assert r["by_credential"][cred].get("UNAUTHENTICATED", 0) > 0
    assert r["unknown_or_internal"] == r["auth_bypassed"] == r["daemon"]["internal_errors"] == 0
    assert r["daemon"]["malformed_requests"] > 0
    assert r["pages_checked_writer"] == r["pages_checked_reader"] == 24 and r["pages_mismatched"] == []


def test_killed_clients_quick() -> None:
    r = bench("killed-clients")
    ends = r["kill_to_session_end"]
    assert sum(d["n"] for d in ends.values()) == r["clients"] == 12
    assert all(d["max_s"] <= r["bound_s"] for d in ends.values())
    # Raw victims' sessions end by their lease alone: not before ~2/3 of it after the kill
    # (their last heartbeat came at most a third of a lease before it); load only delays that.
    assert ends["raw"]["min_s"] >= 0.6 * r["lease_ttl_s"]
    assert r["reader_pages_checked"] > 0 and r["wrong_bytes_served"] == []
    assert r["end"]["sessions"] == r["baseline"]["sessions"]
    assert r["end"]["pages_reserved"] == r["end"]["pages_pinned"] == 0


def test_soak_quick() -> None:
    r = bench("soak")
    assert r["ops"] > 20 and r["pages_verified"] > 0 and r["wrong_bytes"] == []
    assert r["unexpected_errors"] == {}
    assert r["rss"]["max_deviation"] <= 0.05
    assert r["fds"]["after_clients"] <= r["fds"]["baseline"] < r["fds"]["max"]
    assert r["shm"]["pool_entries_after_stop"] == 0
    assert r["daemon_end"]["sessions"] == r["daemon_end"]["reserved"] == r["daemon_end"]["pinned"] == 0
