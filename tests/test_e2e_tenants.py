"""Isolation between tenants (issue 19, item 4), end to end: a real daemon with a tokens file,
two tenants' tokens, real gRPC. What one tenant's calls answer never tells it anything about
the other's namespace: lookups, their timing, Explain, Stats, the admin views, error messages."""

from __future__ import annotations

import math
import random
import statistics
import time

import grpc
import kvstore_client
import pytest
from auth_helpers import call, write_tokens
from daemon import SMALL_NAMESPACE, DaemonProcess
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

KV, AD = "/kvstore.v1.KVStore/", "/kvstore.v1.Admin/"
T = SMALL_NAMESPACE["page_tokens"]
A_SECRET = "tenant-a-secret-0123456789"
B_SECRET = "tenant-b-secret-0123456789"
OPS = "ops-secret-0123456789-ops"
C_SECRET = "tenant-c-secret-0123456789"  # scopes on "c" only, a namespace that does not exist
TOKENS = {
    "tenant-a": (A_SECRET, {"a": ["read", "write", "admin"]}),
    "tenant-b": (B_SECRET, {"b": ["read", "write", "admin"]}),
    "ops": (OPS, {"*": ["read", "write", "admin"]}),
    "tenant-c": (C_SECRET, {"c": ["read", "admin"]}),
}
PAGES = 8
STORED_IN_A = list(range(1000, 1000 + PAGES * T))  # only tenant A stored it
STORED_IN_BOTH = list(range(5000, 5000 + PAGES * T))  # each tenant stored it in its own namespace
NEVER = list(range(9000, 9000 + PAGES * T))  # nobody stored it


@pytest.fixture(scope="module")
def tenants(tmp_path_factory):
    """One daemon for the module (each test leaves it as it found it): namespaces "a" and "b"
    (same geometry, so the same prompt fits both) and a host tier."""
    tokens = write_tokens(tmp_path_factory.mktemp("tenants") / "tokens.toml", TOKENS)
    namespaces = [SMALL_NAMESPACE | {"name": "a"}, SMALL_NAMESPACE | {"name": "b"}]
    server = {"tokens_file": tokens, "host_tier_bytes": "1MiB"}
    with (
        DaemonProcess(server=server, namespaces=namespaces).start() as d,
        kvstore_client.connect(d.target, token=A_SECRET, client_name="a") as a,
        kvstore_client.connect(d.target, token=B_SECRET, client_name="b") as b,
    ):
        page = a.namespace("a").pool.page_bytes
        data = bytes((i * 13 + 5) % 251 for i in range(page * PAGES))
        a.put("a", STORED_IN_A, data)
        a.put("a", STORED_IN_BOTH, data)
        b.put("b", STORED_IN_BOTH, data)
        yield d, a, b, data


def _mann_whitney_p(x: list[int], y: list[int]) -> float:
    """Two-sided p-value of the Mann-Whitney U test (normal approximation, ties corrected)."""
    both = sorted([(v, 0) for v in x] + [(v, 1) for v in y])
    n1, n2, n = len(x), len(y), len(both)
    rank_x = 0.0
    ties = 0.0
    i = 0
    while i < n:
        j = i
        while j + 1 < n and both[j + 1][0] == both[i][0]:
            j += 1
        rank = (i + j) / 2 + 1
        rank_x += rank * sum(1 for k in range(i, j + 1) if both[k][1] == 0)
        t = j - i + 1
        ties += t**3 - t
        i = j + 1
    u = rank_x - n1 * (n1 + 1) / 2
    sigma = math.sqrt(n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1))))
    z = (u - n1 * n2 / 2) / sigma
    return math.erfc(abs(z) / math.sqrt(2))


def test_the_same_prompt_in_two_tenants_and_a_lookup_cannot_tell_the_other_has_it(tenants) -> None:
    d, a, b, data = tenants
    # Each tenant hits what it stored itself, with its own bytes.
    assert a.lookup("a", STORED_IN_BOTH).hit_tokens == PAGES * T
    assert b.lookup("b", STORED_IN_BOTH).hit_tokens == PAGES * T
    assert bytes(b.get("b", STORED_IN_BOTH).data.numpy()) == data
    # B's lookup of what only A stored misses, as does one of what nobody stored.
    assert a.lookup("a", STORED_IN_A).hit_tokens == PAGES * T
    assert b.lookup("b", STORED_IN_A).hit_tokens == 0
    with grpc.insecure_channel(d.target) as ch:
        lookup = ch.unary_unary(KV + "Lookup", request_serializer=pb.LookupRequest.SerializeToString)
        metadata = (("authorization", f"Bearer {B_SECRET}"),)
        requests = {
            "elsewhere": pb.LookupRequest(namespace="b", token_ids=STORED_IN_A),
            "never": pb.LookupRequest(namespace="b", token_ids=NEVER),
        }
        times: dict[str, list[int]] = {"elsewhere": [], "never": []}
        replies: dict[str, set[bytes]] = {"elsewhere": set(), "never": set()}
        order = [k for k in requests for _ in range(300)]
        random.Random(19).shuffle(order)
        for kind in ["elsewhere", "never"] * 30:  # warm up: connection, code paths
            lookup(requests[kind], metadata=metadata, timeout=10)
        for kind in order:  # interleaved, so the machine's load falls on both alike
            t0 = time.perf_counter_ns()
            raw = lookup(requests[kind], metadata=metadata, timeout=10)
            times[kind].append(time.perf_counter_ns() - t0)
            replies[kind].add(raw)
    # Byte for byte the same miss, whichever prompt it was.
    assert len(replies["elsewhere"]) == 1 and replies["elsewhere"] == replies["never"]
    assert pb.LookupResponse.FromString(replies["never"].pop()).hit_tokens == 0
    # And no timing difference: the two distributions are indistinguishable.
    p = _mann_whitney_p(times["elsewhere"], times["never"])
    m_else, m_never = statistics.median(times["elsewhere"]), statistics.median(times["never"])
    summary = f"p={p:.3g}, medians {m_else / 1000:.0f} vs {m_never / 1000:.0f} us"
    assert p > 1e-3, summary
    assert abs(m_else - m_never) <= 0.25 * min(m_else, m_never) + 20_000, summary
    # A's pages were never touched by it: still all there, same bytes.
    assert bytes(a.get("a", STORED_IN_A).data.numpy()) == data


def test_explain_names_no_namespace_the_caller_cannot_read(tenants) -> None:
    d, _, b, _ = tenants
    mine = b.explain("b", STORED_IN_A)
    assert [p.verdict for p in mine.pages] == [pb.NEVER_STORED] + [pb.AFTER_MISS] * (PAGES - 1)
    assert all(p.other_namespace == "" for p in mine.pages)
    assert "'a'" not in str(mine), str(mine)
    # An operator who may read both is still told where the prompt is.
    with kvstore_client.connect(d.target, token=OPS) as ops:
        theirs = ops.explain("b", STORED_IN_A)
    assert theirs.pages[0].verdict == pb.OTHER_NAMESPACE and theirs.pages[0].other_namespace == "a"


def test_stats_and_the_admin_views_show_only_the_callers_share(tenants) -> None:
    d, _, b, _ = tenants
    with kvstore_client.connect(d.target, token=B_SECRET, client_name="b2") as b2:
        mine = b.stats()
        assert [ns.name for ns in mine.namespaces] == ["b"]
        assert mine.sessions == 2  # tenant B's own two sessions, not A's
        assert mine.tiers is None  # the tiers below hold every namespace's pages
        assert mine.rpc_calls == []  # every tenant's calls
        assert {s.session_id for s in b.list_sessions()} == {b.session_id, b2.session_id}
        assert [ns.name for ns in b.list_namespaces()] == ["b"]
        with kvstore_client.connect(d.target, token=OPS) as ops:
            everything = ops.stats()
            assert [ns.name for ns in everything.namespaces] == ["a", "b"]
            assert everything.sessions == 4 and everything.tiers is not None
            assert everything.rpc_calls
            assert len(ops.list_sessions()) == 4
            assert [ns.name for ns in ops.list_namespaces()] == ["a", "b"]
    # The kvstore-admin views are these calls: `stats` as tenant B lists namespace b only.
    with grpc.insecure_channel(d.target) as ch:
        code, details = call(ch, KV + "Stats", pb.StatsRequest(namespace="a"), B_SECRET)
        assert code == grpc.StatusCode.PERMISSION_DENIED and "namespace 'a'" in details


def test_errors_name_no_namespace_the_caller_cannot_read(tenants) -> None:
    d, *_ = tenants
    with grpc.insecure_channel(d.target) as ch:
        for path, request in {
            KV + "Stats": pb.StatsRequest(namespace="c"),
            KV + "GetNamespace": pb.GetNamespaceRequest(namespace="c"),
            KV + "Lookup": pb.LookupRequest(namespace="c", token_ids=STORED_IN_A),
            AD + "Explain": pb.ExplainRequest(namespace="c", token_ids=STORED_IN_A),
            AD + "Mrc": pb.MrcRequest(namespace="c"),
        }.items():
            code, details = call(ch, path, request, C_SECRET)
            assert code == grpc.StatusCode.NOT_FOUND, (path, code, details)
            assert details == "namespace 'c' does not exist; known: (none)", (path, details)
        assert call(ch, AD + "ListNamespaces", pb.ListNamespacesRequest(), C_SECRET) == (
            grpc.StatusCode.OK,
            "",
        )
        # The operator is told what exists.
        code, details = call(ch, KV + "GetNamespace", pb.GetNamespaceRequest(namespace="c"), OPS)
        assert details == "namespace 'c' does not exist; known: a, b"
