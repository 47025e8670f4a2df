"""`kvstore-admin` run as an operator would: a separate process against a real daemon
(tests/daemon.py). Numbers are checked before and after a real client commits pages."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import kvstore_client
import pytest
from daemon import SMALL_NAMESPACE, DaemonProcess
from e2e_helpers import wait_until
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb
from kvstore_proto.kvstore.v1 import kvstore_pb2_grpc as pb_grpc

import kvstore

STATS_KEYS = {
    "max_session_pages",
    "session_pages_refused",
    *("tier_share", "share_evictions", "host_bytes", "disk_bytes"),
    "pages_total",
    "pages_free",
    "pages_free_unzeroed",
    "pages_reserved",
    "pages_sealed",
    "pages_pinned",
    "hit_tokens",
    "miss_tokens",
    "evictions",
    "lookups",
    "deduplicated_pages",
    "sequences",
    "page_bytes",
    "policy",
    "hit_rate",
    "committed_bytes",
    "hit_bytes",
    *("pages_checksummed", "pages_sums_given", "pages_scrubbed", "pages_corrupt", "copies_refused"),
    *("pages_unchecked", "pages_zeroed", "pages_zeroed_inline", "replies_waited_zeroing"),
}
PAGE_TOKENS = SMALL_NAMESPACE["page_tokens"]


def _admin_argv() -> list[str]:
    script = Path(sys.executable).with_name("kvstore-admin")  # the installed entry point
    return [str(script)] if script.exists() else [sys.executable, "-m", "kvstore_client.cli.admin"]


def _env(**extra: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")} | extra


def admin(*args: str, target: str | None = None, env: dict[str, str] | None = None):
    argv = [*_admin_argv(), *(["--target", target] if target else []), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env or _env())


def stats_json(daemon: DaemonProcess) -> dict:
    r = admin("stats", "--json", target=daemon.target)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # the whole output is exactly one JSON document


def commit_pages(kv: kvstore_client.Client, pages: int, first_token: int = 0) -> list[int]:
    """A client's real work: append, write the KV in place, commit. The token ids."""
    tokens = list(range(first_token, first_token + pages * PAGE_TOKENS))
    with kv.allocate("test") as seq:
        res = seq.append(tokens)
        for view in seq.views(res.writable_pages):
            view.fill_(1.0)
        assert seq.commit().sealed_pages == pages
    return tokens


def test_stats_json_is_one_object_whose_numbers_follow_a_commit(daemon: DaemonProcess) -> None:
    before = stats_json(daemon)
    assert set(before) == {
        "version",
        "uptime_s",
        "sessions",
        "internal_errors",
        "malformed_requests",
        "namespaces",
        "quotas",
        "build",
        "rpc_calls",
        "pool_socket",
        "lane",
    }
    assert before["quotas"]["max_sessions_per_client"] == 1024 and before["quotas"]["refused"] == {}
    assert before["pool_socket"]["refused"]["used_ticket"] == 0
    assert before["internal_errors"] == before["malformed_requests"] == 0
    assert set(before["namespaces"]) == {"test"}
    ns = before["namespaces"]["test"]
    assert set(ns) == STATS_KEYS
    assert ns["pages_total"] == ns["pages_free"] == SMALL_NAMESPACE["num_pages"]
    assert ns["pages_sealed"] == ns["lookups"] == 0
    assert ns["hit_rate"] is None  # nothing looked up yet: no rate, not a made-up 0
    assert before["sessions"] == 0  # the admin tool itself opens no session
    assert before["version"] == kvstore.__version__ and before["uptime_s"] > 0

    with kvstore_client.connect(daemon.target, client_name="stats-test") as kv:
        tokens = commit_pages(kv, 3)
        assert kv.lookup("test", [*tokens, 7, 7]).hit_tokens == len(tokens)
        during = stats_json(daemon)
    assert during["sessions"] == 1

    after = stats_json(daemon)["namespaces"]["test"]
    assert after["pages_sealed"] == 3
    assert after["pages_free"] == ns["pages_free"] - 3
    assert after["lookups"] == 1
    assert (after["hit_tokens"], after["miss_tokens"]) == (len(tokens), 2)
    assert after["hit_rate"] == pytest.approx(len(tokens) / (len(tokens) + 2))
    assert after["page_bytes"] == 1024 and after["policy"] == "horizon"


def test_stats_table_shows_each_namespace(daemon: DaemonProcess) -> None:
    with kvstore_client.connect(daemon.target) as kv:
        commit_pages(kv, 2)
    r = admin("stats", target=daemon.target)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "namespace test" in out
    assert "up " in out and "0 sessions" in out
    assert "1 KiB" in out  # page size in human units
    assert "64 total: 62 free, 0 reserved, 2 sealed (0 pinned)" in out
    assert re.search(r"^  used +3\.1%", out, re.M)
    assert re.search(r"^  hit rate +- ", out, re.M)  # no lookups yet
    # The integrity thread checksums the two sealed pages off the loop: then the row says so.
    wait_until(
        lambda: stats_json(daemon)["namespaces"]["test"]["pages_checksummed"],
        lambda n: n == 2,
        timeout=10,
        what="the checksums",
    )
    out = admin("stats", target=daemon.target).stdout
    assert re.search(
        r"^  integrity +2 pages checksummed at seal, 0 by their writers, 0 left unchecked; ", out, re.M
    )
    assert "0 corrupt (0 copies below refused)" in out


def test_stats_of_one_namespace_and_an_unknown_one(daemon: DaemonProcess) -> None:
    r = admin("stats", "--namespace", "test", "--json", target=daemon.target)
    assert r.returncode == 0 and set(json.loads(r.stdout)["namespaces"]) == {"test"}

    r = admin("stats", "--namespace", "nope", target=daemon.target)
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.startswith("error: NOT_FOUND: ") and "nope" in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_namespaces_lists_geometry_and_the_pool(daemon: DaemonProcess) -> None:
    r = admin("namespaces", target=daemon.target)
    assert r.returncode == 0, r.stderr
    with grpc.insecure_channel(daemon.target) as ch:
        epoch = pb_grpc.KVStoreStub(ch).GetNamespace(pb.GetNamespaceRequest(namespace="test")).pool.pool_epoch
    header, row = r.stdout.splitlines()[:2]
    assert header.split()[:2] == ["NAMESPACE", "LAYERSxHEADSxDIM"]
    assert row.split()[:4] == ["test", "2x2x16", "float16", "4"]
    assert f"cpu {epoch:016x}" in row and "horizon" in row

    info = json.loads(admin("namespaces", "--json", target=daemon.target).stdout)["namespaces"]["test"]
    assert info["num_pages"] == 64 and info["page_bytes"] == 1024 and info["pool_bytes"] == 64 * 4096
    assert info["pool_epoch"] == f"{epoch:016x}" and info["device"] == "cpu"
    assert info["page_shape"] == [2, 2, 4, 2, 16] and info["layout"] == "layer,kv,token,head,dim"


def test_sessions_lists_connected_clients(daemon: DaemonProcess) -> None:
    assert admin("sessions", target=daemon.target).stdout.strip() == "no sessions"
    with kvstore_client.connect(daemon.target, client_name="worker-7") as kv, kv.allocate("test"):
        r = admin("sessions", target=daemon.target)
        assert r.returncode == 0, r.stderr
        assert "worker-7" in r.stdout and str(kv.session_id) in r.stdout
        (s,) = json.loads(admin("sessions", "--json", target=daemon.target).stdout)["sessions"]
        assert s["session_id"] == kv.session_id and s["client_name"] == "worker-7"
        assert s["sequences"] == 1 and s["stream_attached"] is True
    assert json.loads(admin("sessions", "--json", target=daemon.target).stdout) == {"sessions": []}


def test_evict_all_empties_the_cache(daemon: DaemonProcess) -> None:
    with kvstore_client.connect(daemon.target) as kv:
        commit_pages(kv, 5)
    assert stats_json(daemon)["namespaces"]["test"]["pages_sealed"] == 5

    r = admin("evict", "--namespace", "test", "--all", target=daemon.target)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("evicted 5 pages (5 KiB) from namespace test")

    ns = stats_json(daemon)["namespaces"]["test"]
    assert (ns["pages_sealed"], ns["pages_free"], ns["evictions"]) == (0, 64, 5)


def test_evict_by_bytes_and_by_prefix(daemon: DaemonProcess) -> None:
    with kvstore_client.connect(daemon.target) as kv:
        first = commit_pages(kv, 4)
        commit_pages(kv, 4, first_token=1000)

        r = admin("evict", "--namespace", "test", "--bytes", "2KiB", "--json", target=daemon.target)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["bytes_freed"] >= 2048

        # The prefix's second page and every page after it; the first page stays.
        prefix = ",".join(map(str, first[: 2 * PAGE_TOKENS]))
        before = stats_json(daemon)["namespaces"]["test"]["pages_sealed"]
        r = admin("evict", "--namespace", "test", "--prefix-tokens", prefix, target=daemon.target)
        assert r.returncode == 0, r.stderr
        evicted = before - stats_json(daemon)["namespaces"]["test"]["pages_sealed"]
        assert r.stdout.startswith(f"evicted {evicted} pages")
        assert kv.lookup("test", first).hit_tokens <= PAGE_TOKENS


def test_evict_usage_errors_exit_2(daemon: DaemonProcess) -> None:
    for args in (["--all", "--bytes", "1"], ["--bytes", "lots"], ["--prefix-tokens", "1,x"]):
        r = admin("evict", "--namespace", "test", *args, target=daemon.target)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr


def test_evict_in_an_unknown_namespace_is_not_found(daemon: DaemonProcess) -> None:
    r = admin("evict", "--namespace", "nope", "--all", target=daemon.target)
    assert r.returncode == 1
    assert r.stderr.startswith("error: NOT_FOUND: namespace 'nope' does not exist")


def test_health_serving_exits_0_and_honours_kvstore_socket(daemon: DaemonProcess) -> None:
    r = admin("health", target=daemon.target)
    assert (r.returncode, r.stdout) == (0, "SERVING\n")
    # No --target: the default comes from $KVSTORE_SOCKET, as for every client.
    r = admin("health", env=_env(KVSTORE_SOCKET=str(daemon.socket_path)))
    assert (r.returncode, r.stdout) == (0, "SERVING\n")


def test_no_target_finds_the_socket_in_the_daemons_config_file(daemon: DaemonProcess, tmp_path: Path) -> None:
    """KVSTORE_CONFIG (the daemon's config file, here the test daemon's own) sets the socket for
    `kvstore-admin` too; KVSTORE_SOCKET wins over it, as it does for the daemon."""
    r = admin("health", env=_env(KVSTORE_CONFIG=str(daemon.config_path)))
    assert (r.returncode, r.stdout) == (0, "SERVING\n"), r.stderr
    elsewhere = _env(KVSTORE_CONFIG=str(daemon.config_path), KVSTORE_SOCKET=str(tmp_path / "none.sock"))
    r = admin("health", env=elsewhere)
    assert r.returncode == 1 and f"no kvstore daemon answered at unix:{tmp_path}/none.sock" in r.stderr
    r = admin("health", env=_env(KVSTORE_CONFIG=str(tmp_path / "missing.toml")))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert (
        r.stderr
        == f"error: where is the daemon? config file {tmp_path}/missing.toml: No such file or directory\n"
    )


def test_version_names_the_package_and_the_wire_api() -> None:
    want = f"{kvstore.__version__} (wire API kvstore.v1)\n"
    r = admin("--version")
    assert (r.returncode, r.stdout) == (0, f"kvstore-admin {want}")
    script = Path(sys.executable).with_name("kvstore")  # the installed entry point
    serve = [str(script)] if script.exists() else [sys.executable, "-m", "kvstore"]
    r = subprocess.run([*serve, "--version"], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, f"kvstore {want}")


def test_no_daemon_is_one_line_and_exit_1(tmp_path: Path) -> None:
    target = f"unix:{tmp_path}/none.sock"
    for command in (["health"], ["evict", "--namespace", "x", "--all"]):
        r = admin(*command, target=target)
        assert r.returncode == 1, command
        assert r.stdout == ""
        assert r.stderr.startswith(f"error: no kvstore daemon answered at {target}"), r.stderr
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_health_of_a_stopped_daemon_exits_1(daemon: DaemonProcess) -> None:
    assert daemon.terminate() == 0
    r = admin("health", target=daemon.target)
    assert r.returncode == 1
    assert r.stderr.startswith(f"error: no kvstore daemon answered at {daemon.target}")


@contextlib.contextmanager
def watching(daemon: DaemonProcess, *args: str) -> Iterator[tuple[subprocess.Popen, queue.Queue[str]]]:
    """`stats --json --watch ...` running, and a queue of its lines as they come."""
    argv = [*_admin_argv(), "--target", daemon.target, "stats", "--json", "--watch", *args]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=_env())
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        yield proc, lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_stats_watch_prints_until_interrupted(daemon: DaemonProcess) -> None:
    with watching(daemon, "0.1") as (proc, lines):
        # Two refreshes, each one JSON object on its own line.
        snapshots = [json.loads(lines.get(timeout=30)) for _ in range(2)]
        assert all(s["namespaces"]["test"]["pages_total"] == 64 for s in snapshots)
        assert snapshots[1]["uptime_s"] > snapshots[0]["uptime_s"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


def test_flush_and_tier_stats(daemon_factory, tmp_path: Path) -> None:
    """With a host and a disk tier: evicted pages are demoted (stats show them below the pool),
    `flush` puts every sealed page on disk and says how many; the table has a tiers block."""
    server = {"host_tier_bytes": "1MiB", "disk_tier_dir": str(tmp_path / "disk"), "disk_tier_bytes": "16MiB"}
    d = daemon_factory(server=server).start()
    with kvstore_client.connect(d.target) as kv:
        commit_pages(kv, 3)
        kv.evict("test", all=True)  # 3 pages to the host tier
        commit_pages(kv, 2, first_token=1000)  # 2 pages in the pool
    r = admin("flush", "--json", target=d.target)
    assert r.returncode == 0, r.stderr
    flushed = json.loads(r.stdout)
    assert (flushed["pages_written"], flushed["disk_pages"]) == (5, 5)
    tiers = stats_json(d)["tiers"]
    assert tiers["demoted_pages"] == 3 and tiers["host_pages"] == 3 and tiers["disk_pages"] == 5
    assert tiers["host_capacity_bytes"] == 1 << 20 and tiers["corrupt_pages"] == 0
    table = admin("stats", target=d.target).stdout
    assert re.search(r"host tier\s+1 MiB: .*3 pages", table), table
    assert re.search(r"disk tier\s+16 MiB: .*5 pages", table), table
    again = admin("flush", target=d.target)
    assert again.returncode == 0 and "0 pages written, 5 pages on disk" in again.stdout


def test_flush_without_a_disk_tier_says_so(daemon: DaemonProcess) -> None:
    r = admin("flush", target=daemon.target)
    assert r.returncode == 1
    assert "FAILED_PRECONDITION" in r.stderr and "no disk tier" in r.stderr
    assert "tiers" not in stats_json(daemon)


def test_delete_namespace_refuses_a_held_one_then_deletes_it(daemon: DaemonProcess) -> None:
    with kvstore_client.connect(daemon.target) as kv:
        kv.allocate("test", max_tokens=4)
        r = admin("delete-namespace", "test", target=daemon.target)
        assert r.returncode == 1
        assert r.stderr.startswith("error: FAILED_PRECONDITION: namespace 'test' has 1 live sequence(s)")
        r = admin("delete-namespace", "test", "--force", "--json", target=daemon.target)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {"namespace": "test", "sequences_released": 1, "pins_released": 0}
        assert "closed pool memfd" in daemon.stderr_text() and daemon.shm_segments() == []
        assert admin("namespaces", target=daemon.target).stdout.strip() == "no namespaces"


def test_stats_watch_rates_are_the_work_done_between_readings(daemon: DaemonProcess) -> None:
    """Known work between two readings of `stats --watch --json`: the counts it prints add up
    to that work exactly, and each rate is its count over the daemon's own interval."""
    lookups, puts, pages_each, not_found = 6, 2, 2, 3
    with watching(daemon, "0.3", "--count", "200") as (proc, lines):
        first = json.loads(lines.get(timeout=30))
        assert "rates" not in first  # one reading: no interval yet
        page_bytes = first["namespaces"]["test"]["page_bytes"]
        with kvstore_client.connect(daemon.target) as kv:
            for i in range(puts):
                tokens = commit_pages(kv, pages_each, first_token=1000 * i)
            for _ in range(lookups):  # 2 pages hit, 1 missed: a hit rate of 2/3
                assert kv.lookup("test", [*tokens, *range(90, 90 + PAGE_TOKENS)]).hit_tokens == len(tokens)
            for _ in range(not_found):
                with pytest.raises(kvstore_client.errors.NotFound):
                    kv.stats("nope")
            done_at = kv.stats().uptime_s
        # Every reading after `first`, up to the first one taken after the work was done.
        after = [json.loads(lines.get(timeout=30))]
        while after[-1]["uptime_s"] < done_at:
            after.append(json.loads(lines.get(timeout=30)))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    total = {k: sum(r["rates"]["counts"][k] for r in after) for k in ("lookups", "puts", "committed_bytes")}
    assert total == {"lookups": lookups, "puts": puts, "committed_bytes": puts * pages_each * page_bytes}
    assert sum(r["rates"]["counts"]["hit_bytes"] for r in after) == lookups * pages_each * page_bytes
    assert sum(r["rates"]["counts"]["rpc_errors"].get("NOT_FOUND", 0) for r in after) == not_found
    for r in after:
        rates, interval = r["rates"], r["rates"]["interval_s"]
        assert 0.2 < interval < 30
        assert rates["lookups_per_s"] == pytest.approx(rates["counts"]["lookups"] / interval, rel=1e-4)
        assert rates["puts_per_s"] == pytest.approx(rates["counts"]["puts"] / interval, rel=1e-4)
        for code, n in rates["counts"]["rpc_errors"].items():
            assert rates["rpc_errors_per_s"][code] == pytest.approx(n / interval, rel=1e-4)
        if rates["counts"]["lookups"]:
            assert rates["hit_rate"] == pytest.approx(2 / 3)


def test_stats_watch_count_prints_rates_and_exits_0(daemon: DaemonProcess) -> None:
    r = admin("stats", "--watch", "0.2", "--count", "2", target=daemon.target)
    assert r.returncode == 0, r.stderr
    assert "rates: from the next reading on" in r.stdout
    assert r.stdout.count("rates over the last") == 1
    for label in ("lookups", "hit rate", "puts", "bytes", "evictions", "RPC errors"):
        assert re.search(rf"^  {label}\s+\S", r.stdout, re.M), (label, r.stdout)
    assert "build: commit " in r.stdout
    one = admin(
        "stats", "--json", "--namespace", "test", "--watch", "0.2", "--count", "2", target=daemon.target
    )
    rates = json.loads(one.stdout.splitlines()[1])["rates"]  # a namespace's reply has no rpc_calls:
    assert rates["puts_per_s"] is None and rates["rpc_errors_per_s"] is None  # unknown, not 0
    assert rates["lookups_per_s"] == 0
    usage = admin("stats", "--count", "2", target=daemon.target)
    assert usage.returncode == 2 and "--count needs --watch" in usage.stderr
