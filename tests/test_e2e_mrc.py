"""Admin.Mrc through a real daemon: a synthetic workload (Zipf-popular documents, some with a
private last page) is driven the way an engine does it (lookup, then append and commit);
the curve the daemon estimates from its sampled accesses must be non-decreasing, count each
block access once, and agree (loosely) with the hit rate the daemon actually had."""

from __future__ import annotations

import itertools
import json
import random
from typing import Any

import grpc
import kvstore_client
import pytest
from daemon import SMALL_NAMESPACE
from e2e_helpers import assert_status, prompt
from kvstore_client.errors import KVStoreClientError

T = SMALL_NAMESPACE["page_tokens"]
POOL = 64
NS = dict(SMALL_NAMESPACE, num_pages=POOL, policy="lru")


def workload(requests: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    docs = [prompt(rng.randint(3, 10) * T, seed=1000 + i) for i in range(40)]
    weights = [1 / (i + 1) for i in range(len(docs))]
    out = []
    for r in range(requests):
        tokens = list(rng.choices(docs, weights)[0])
        if rng.random() < 0.5:
            tokens += prompt(T, seed=50_000 + r)  # a page nobody asks for again
        out.append(tokens)
    return out


def serve(kv: kvstore_client.Client, tokens: list[int], lookup: bool = True) -> None:
    """One request as an engine runs it: look the prompt up, append it, commit, release."""
    if lookup:
        kv.lookup("test", tokens)
    with kv.allocate("test") as seq:
        seq.append(tokens)
        seq.commit()


@pytest.fixture
def kv(daemon_factory: Any) -> Any:
    d = daemon_factory(namespaces=[NS]).start()
    with kvstore_client.connect(d.target, client_name="mrc") as client:
        yield client


def test_mrc_matches_the_daemons_own_hit_rate(kv: Any) -> None:
    prompts = workload(400)
    for tokens in prompts:
        serve(kv, tokens)
    r = kv.mrc("test")
    assert r.pool_pages == POOL and r.sample_rate == 1.0 and r.policy == "lru"
    # Lookup then append of the same prompt counts each block once.
    assert r.accesses == r.sampled_accesses == sum(len(t) // T for t in prompts)
    caps = [p.capacity_pages for p in r.points]
    rates = [p.hit_rate for p in r.points]
    assert caps == sorted(caps) and POOL in caps and [p.current for p in r.points].count(True) == 1
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(rates)), rates
    assert rates[0] < rates[-1]
    s = kv.stats("test").namespaces[0]
    observed = s.hit_tokens / (s.hit_tokens + s.miss_tokens)
    estimate = next(p.hit_rate for p in r.points if p.current)
    assert abs(estimate - observed) < 0.1, (estimate, observed, list(zip(caps, rates, strict=True)))
    # Big enough for every block: only first accesses miss.
    distinct = len({(i, tuple(t[: (i + 1) * T])) for t in prompts for i in range(len(t) // T)})
    top = kv.mrc("test", capacities=[10 * distinct]).points[-1]
    assert top.hit_rate == pytest.approx(1 - distinct / r.accesses, abs=1e-9)


def test_appends_alone_and_in_chunks_count_every_page_once(kv: Any) -> None:
    a, b = prompt(6 * T, seed=1), prompt(5 * T, seed=2)
    serve(kv, a, lookup=False)  # append only: 6 accesses
    kv.lookup("test", b)  # lookup: page 0 misses (1 access) ...
    with kv.allocate("test") as seq:  # ... then a chunked prefill of b: the other 4
        seq.append(b[: 2 * T])
        seq.append(b[2 * T :])
        seq.commit()
    kv.lookup("test", a)  # 6 hits
    r = kv.mrc("test", capacities=[1, 100])
    assert r.accesses == 6 + 5 + 6
    assert [p.capacity_pages for p in r.points] == [1, POOL, 100]
    assert r.points[-1].hit_rate == pytest.approx(6 / 17)


def test_bad_requests(kv: Any) -> None:
    for kwargs, code, text in (
        ({"capacities": [0]}, grpc.StatusCode.INVALID_ARGUMENT, "capacities[0]=0 must be in [1, "),
        (
            {"fractions": [0.5, -1.0]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "fractions[1]=-1.0 must be a number > 0",
        ),
        ({"fractions": [float("nan")]}, grpc.StatusCode.INVALID_ARGUMENT, "fractions[0]=nan"),
    ):
        with pytest.raises(KVStoreClientError) as e:
            kv.mrc("test", **kwargs)
        assert_status(e.value, code, text)
    with pytest.raises(KVStoreClientError) as e:
        kv.mrc("nope")
    assert_status(e.value, grpc.StatusCode.NOT_FOUND, "namespace 'nope' does not exist")
    r = kv.mrc("test")  # no accesses yet: zeros, not an error
    assert r.accesses == 0 and all(p.hit_rate == 0 for p in r.points)


def test_cli_mrc_table_json_and_plot(kv: Any, tmp_path: Any, capsys: Any) -> None:
    from kvstore_client.cli.admin import main

    for tokens in workload(60, seed=1):
        serve(kv, tokens)
    assert main(["--target", kv.target, "mrc", "--namespace", "test", "--fractions", "0.5,1,2"]) == 0
    out = capsys.readouterr().out
    assert "CAPACITY PAGES" in out and "<- the pool now" in out and "observed hit rate" in out
    png = tmp_path / "mrc.png"
    argv = ["--target", kv.target, "mrc", "--namespace", "test", "--capacities", "8,16", "--json"]
    assert main([*argv, "--plot", str(png)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [p["capacity_pages"] for p in got["points"]] == [8, 16, POOL]
    assert got["accesses"] > 0 and 0 <= got["observed_hit_rate"] <= 1
    pytest.importorskip("matplotlib")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
