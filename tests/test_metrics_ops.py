"""Operators' metrics from a real daemon, scraped over real HTTP after real gRPC calls: RPC
latency histograms and calls by method and status code, build info, and the disk tier's
re-index progress after a restart (docs/observability.md)."""

from __future__ import annotations

import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import kvstore_client
import pytest
from e2e_helpers import Raw, wait_until
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb
from prometheus_client.parser import text_string_to_metric_families

import kvstore

REPO = Path(__file__).resolve().parent.parent
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int, headers: dict[str, str] | None = None) -> Samples:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers or {})
    text = urllib.request.urlopen(request, timeout=5).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def calls(m: Samples, method: str, code: str) -> float:
    return m.get(("kvstore_rpc_calls_total", (("code", code), ("method", method))), 0.0)


def timed(m: Samples, method: str) -> float:
    return m.get(("kvstore_rpc_duration_seconds_count", (("method", method),)), 0.0)


def test_rpc_calls_and_latency_are_counted_exactly_by_method_and_code(daemon_factory: Any) -> None:
    port = free_port()
    d = daemon_factory(server={"metrics": f"127.0.0.1:{port}"}).start()
    stats_ok, not_found, invalid, malformed = 7, 3, 2, 4
    with Raw(d.target) as raw:
        for _ in range(stats_ok):
            raw.kv.Stats(pb.StatsRequest(), timeout=10)
        for _ in range(not_found):
            err = raw.error("GetNamespace", pb.GetNamespaceRequest(namespace="nope"))
            assert err.code() == grpc.StatusCode.NOT_FOUND
        for _ in range(invalid):
            err = raw.error("Evict", pb.EvictRequest(namespace="test"))  # no target
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        lookup = raw.channel.unary_unary("/kvstore.v1.KVStore/Lookup")  # raw bytes, no serializer
        for _ in range(malformed):
            try:
                lookup(b"\xff\xff\xff", timeout=10)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
            else:
                raise AssertionError("bytes that do not parse were answered")
        # The Stats reply counts the calls before it (itself is counted once it has answered).
        reply = raw.kv.Stats(pb.StatsRequest(), timeout=10)
        one = raw.kv.Stats(pb.StatsRequest(namespace="test"), timeout=10)
    counted = {(c.method, c.code): c.calls for c in reply.rpc_calls}
    assert counted[("KVStore/Stats", "OK")] == stats_ok
    assert counted[("KVStore/GetNamespace", "NOT_FOUND")] == not_found
    assert counted[("KVStore/Evict", "INVALID_ARGUMENT")] == invalid
    assert counted[("KVStore/Lookup", "INVALID_ARGUMENT")] == malformed
    assert ("KVStore/Lookup", "OK") not in counted  # only pairs with calls
    assert len(one.rpc_calls) == 0  # a namespace's stats do not show every tenant's calls

    m = scrape(port)  # the RPC metrics are live, not the loop's once-a-second snapshot
    assert calls(m, "KVStore/Stats", "OK") == stats_ok + 2
    assert calls(m, "KVStore/GetNamespace", "NOT_FOUND") == not_found
    assert calls(m, "KVStore/GetNamespace", "OK") == 0  # bound in advance: present, at 0
    assert calls(m, "KVStore/Evict", "INVALID_ARGUMENT") == invalid
    assert calls(m, "KVStore/Lookup", "INVALID_ARGUMENT") == malformed
    # Every unary call is timed once, whatever its status.
    assert timed(m, "KVStore/Stats") == stats_ok + 2
    assert timed(m, "KVStore/GetNamespace") == not_found
    assert timed(m, "KVStore/Evict") == invalid
    assert timed(m, "KVStore/Lookup") == malformed
    inf = m[("kvstore_rpc_duration_seconds_bucket", (("le", "+Inf"), ("method", "KVStore/Stats")))]
    assert inf == stats_ok + 2
    assert 0 < m[("kvstore_rpc_duration_seconds_sum", (("method", "KVStore/Stats"),))] < 10
    # A stream is counted when it ends, not timed: a KeepAlive lasts its session.
    assert ("kvstore_rpc_duration_seconds_count", (("method", "KVStore/KeepAlive"),)) not in m
    assert calls(m, "KVStore/KeepAlive", "OK") == 0


def test_build_info_in_metrics_and_stats(daemon_factory: Any) -> None:
    port = free_port()
    d = daemon_factory(server={"metrics": f"127.0.0.1:{port}"}).start()
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    with kvstore_client.connect(d.target) as kv:
        build = kv.stats().build
    assert build is not None
    assert (build.version, build.git_commit, build.grpc, build.backend) == (
        kvstore.__version__,
        commit,
        grpc.__version__,
        "cpu_memfd",
    )
    assert build.python.split()[0].count(".") == 2
    (info,) = [v for (name, labels), v in scrape(port).items() if name == "kvstore_build_info"]
    labels = next(dict(lb) for (name, lb) in scrape(port) if name == "kvstore_build_info")
    assert info == 1
    assert labels == {
        "version": build.version,
        "git_commit": commit,
        "python": build.python,
        "grpc": build.grpc,
        "backend": "cpu_memfd",
    }


def test_reindex_progress_reaches_the_total_after_a_restart(daemon_factory: Any, tmp_path: Path) -> None:
    port = free_port()
    server = {
        "metrics": f"127.0.0.1:{port}",
        "disk_tier_dir": str(tmp_path / "disk"),
        "disk_tier_bytes": 16 << 20,
    }
    d = daemon_factory(server=server).start()
    pages = 6
    with kvstore_client.connect(d.target) as kv:
        with kv.allocate("test") as seq:
            written = seq.append(list(range(pages * 4)))  # 4 tokens a page
            for view in seq.views(written.writable_pages):
                view.fill_(1.0)
            assert seq.commit().sealed_pages == pages
        assert kv.flush().disk_pages == pages
        page_bytes = kv.stats().namespaces[0].page_bytes
    assert d.terminate() == 0
    d.start()
    with kvstore_client.connect(d.target) as kv:
        t = wait_until(
            lambda: kv.stats().tiers,
            lambda t: t is not None and not t.reindex_running and t.reindex_total == pages,
            timeout=30,
            what="the re-index after the restart",
        )
    assert (t.reindex_done, t.reindex_total) == (pages, pages)
    assert t.reindex_bytes_done == t.reindex_bytes_total == pages * page_bytes
    m = wait_until(  # the loop publishes the snapshot once a second
        lambda: scrape(port),
        lambda m: m.get(("kvstore_disk_reindex_pages_done", ())) == pages,
        timeout=10,
        what="the re-index in the metrics",
    )
    assert m[("kvstore_disk_reindex_pages_total", ())] == pages
    assert m[("kvstore_disk_reindex_bytes_done", ())] == pages * page_bytes
    assert m[("kvstore_disk_reindex_bytes_total", ())] == pages * page_bytes
    assert m[("kvstore_disk_reindex_running", ())] == 0
    assert f"re-index of the disk tier: {pages} / {pages} pages" in d.stderr_text()


def test_with_tokens_the_metrics_need_a_token_with_read_on_every_namespace(
    daemon_factory: Any, tmp_path: Path
) -> None:
    from auth_helpers import ADMIN, NAMESPACES, READER, TOKENS, write_tokens

    scraper = "scraper-secret-0123456789"
    tokens = write_tokens(tmp_path / "tokens.toml", TOKENS | {"scraper": (scraper, {"*": ["read"]})})
    port = free_port()
    d = daemon_factory(
        server={"tokens_file": tokens, "metrics": f"127.0.0.1:{port}"}, namespaces=NAMESPACES
    ).start()

    def refused(headers: dict[str, str]) -> tuple[int, str, str]:
        try:
            scrape(port, headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(), e.headers.get("WWW-Authenticate", "")
        raise AssertionError(f"the metrics were served with {list(headers)}")

    for headers in ({}, {"Authorization": "Bearer not-a-token-0123456789"}, {"Authorization": scraper}):
        code, body, challenge = refused(headers)
        assert (code, challenge) == (401, 'Bearer realm="kvstore metrics"'), body
        assert "kvstore_" not in body and "valid bearer token" in body
    code, body, _ = refused({"Authorization": f"Bearer {READER}"})  # read on "a" only
    assert code == 403 and "token 'reader'" in body and "kvstore_" not in body
    with Raw(d.target) as raw:  # calls the token check refuses are counted with their codes
        for _ in range(2):
            assert raw.error("Stats", pb.StatsRequest()).code() == grpc.StatusCode.UNAUTHENTICATED
        reader = [("authorization", f"Bearer {READER}")]  # reads "a" only
        with pytest.raises(grpc.RpcError) as denied:
            raw.kv.Stats(pb.StatsRequest(namespace="b"), metadata=reader, timeout=10)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    for secret in (scraper, ADMIN):
        # grpc.aio sends an aborted call's status before the abort returns to the edge that
        # counts it, and a scrape does not wait for the loop: the count may land just after.
        m = wait_until(
            lambda s=secret: scrape(port, {"Authorization": f"Bearer {s}"}),
            lambda m: calls(m, "KVStore/Stats", "PERMISSION_DENIED") > 0,
            timeout=10,
            what="the refused call in the metrics",
        )
        assert m[("kvstore_pages_total", (("namespace", "a"),))] == 64
        assert calls(m, "KVStore/Stats", "UNAUTHENTICATED") == 2
        assert calls(m, "KVStore/Stats", "PERMISSION_DENIED") == 1
    assert scraper not in d.stderr_text() and READER not in d.stderr_text()


def test_gc_pauses_are_counted_by_generation(daemon_factory: Any) -> None:
    """The daemon's cyclic-GC collections (each one stops the loop) are counted and timed as
    they happen, by generation."""
    port = free_port()
    d = daemon_factory(server={"metrics": f"127.0.0.1:{port}"}).start()

    def pauses(m: Samples, what: str, g: int) -> float:
        return m[(f"kvstore_gc_{what}", (("generation", str(g)),))]

    before = scrape(port)
    assert {pauses(before, "pause_max_seconds", g) >= 0 for g in (0, 1, 2)} == {True}
    with Raw(d.target) as raw:  # calls make objects, objects make young collections
        after = wait_until(
            lambda: [raw.kv.Stats(pb.StatsRequest(), timeout=10) for _ in range(50)] and scrape(port),
            lambda m: pauses(m, "pauses_total", 0) > pauses(before, "pauses_total", 0),
            timeout=60,
            what="a young collection in the daemon",
        )
    assert pauses(after, "pause_seconds_total", 0) > pauses(before, "pause_seconds_total", 0)
    assert 0 < pauses(after, "pause_max_seconds", 0) <= pauses(after, "pause_seconds_total", 0)
