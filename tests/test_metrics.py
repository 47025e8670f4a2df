"""Prometheus metrics from a real daemon: the numbers follow what clients do."""

from __future__ import annotations

import socket
import time
import urllib.request

import kvstore_client
from prometheus_client.parser import text_string_to_metric_families


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_follow_the_store(daemon_factory):
    port = _free_port()
    d = daemon_factory(server={"metrics": f"127.0.0.1:{port}"}).start()
    before = _scrape(port)
    assert before[("kvstore_pages_total", (("namespace", "test"),))] == 64
    assert before[("kvstore_pages", (("namespace", "test"), ("state", "free")))] == 64

    with (
        kvstore_client.connect(d.target, client_name="metrics-test") as client,
        client.allocate("test") as seq,
    ):
        seq.append(list(range(10)))  # 2 full pages + 1 partial
        seq.commit()
        client.lookup("test", list(range(10)))
        # The daemon's loop refreshes the snapshot once a second: poll it, with a deadline.
        deadline = time.monotonic() + 10
        while True:
            after = _scrape(port)
            if after[("kvstore_pages", (("namespace", "test"), ("state", "sealed")))] == 2:
                break
            assert time.monotonic() < deadline, f"metrics never showed 2 sealed pages: {after}"
            time.sleep(0.05)
    assert after[("kvstore_pages", (("namespace", "test"), ("state", "reserved")))] == 1
    assert after[("kvstore_hit_tokens_total", (("namespace", "test"),))] == 8
    assert after[("kvstore_miss_tokens_total", (("namespace", "test"),))] == 2
    assert after[("kvstore_sessions", ())] == 1


def test_tier_metrics(daemon_factory):
    port = _free_port()
    d = daemon_factory(server={"metrics": f"127.0.0.1:{port}", "host_tier_bytes": 1 << 20}).start()
    with kvstore_client.connect(d.target) as client:
        with client.allocate("test") as seq:
            seq.append(list(range(8)))
            seq.commit()
        client.evict("test", all=True)  # 2 pages demoted to the host tier
        client.lookup("test", list(range(8)))  # and promoted back
    deadline = time.monotonic() + 10
    while (after := _scrape(port)).get(("kvstore_tier_promoted_pages_total", ())) != 2:
        assert time.monotonic() < deadline, f"metrics never showed 2 promoted pages: {after}"
        time.sleep(0.05)
    assert after[("kvstore_tier_demoted_pages_total", ())] == 2
    assert after[("kvstore_tier_capacity_bytes", (("tier", "host"),))] == 1 << 20
    assert after[("kvstore_tier_pages", (("tier", "host"),))] == 2  # inclusive: promoted pages stay in it
    assert after[("kvstore_tier_corrupt_pages_total", ())] == 0
