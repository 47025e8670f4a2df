"""A batch call is one request (issue 19, item 5 "tokens per request"): server.max_request_tokens
bounds the token ids of a BatchLookup or BatchReserve's items together, not each item alone.
A real daemon, the real client: a batch whose items are each under the quota but whose sum
is over it is refused whole (RESOURCE_EXHAUSTED naming the quota and the limit, counted in
Stats), nothing stored changes; a batch at the quota works, its bytes read back identical."""

from __future__ import annotations

from typing import Any

import grpc
import kvstore_client
import pytest
from daemon import SMALL_NAMESPACE
from e2e_helpers import Raw, prompt_bytes
from kvstore_client.errors import ResourceExhausted
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

NS = "test"
T = SMALL_NAMESPACE["page_tokens"]
QUOTA = 16 * T  # 64 token ids a request


def prompts(n: int, seed: int) -> list[list[int]]:
    """n prompts of 4 pages each (a quarter of the quota), distinct from each other."""
    return [[seed * 1000 + i * 100 + j for j in range(4 * T)] for i in range(n)]


def refused(kv: Any) -> int:
    return kv.stats().quotas.refused.get("max_request_tokens", 0)


def test_a_batch_is_one_request_for_max_request_tokens(daemon_factory: Any) -> None:
    d = daemon_factory(server={"max_request_tokens": QUOTA}).start()
    with kvstore_client.connect(d.target) as kv, Raw(d.target) as raw:
        shape = kv.namespace(NS).page_shape
        stored = prompts(1, seed=1)[0]
        kv.put(NS, stored, prompt_bytes(stored, shape, T))
        before = raw.counts(NS)
        over = prompts(5, seed=2)  # 5 x 16 = 80 ids > 64, each item 16 <= 64

        with pytest.raises(ResourceExhausted) as err:
            kv.put_many(NS, over, [prompt_bytes(p, shape, T) for p in over])
        assert err.value.details == (
            "BatchReserve: its 5 items carry 80 token ids in all; the quota is max_request_tokens=64 "
            "for one request, a batch's items together (split the batch)"
        )
        assert raw.counts(NS) == before  # nothing reserved, sealed or pinned
        with pytest.raises(
            ResourceExhausted, match=r"BatchLookup: its 5 items carry 80 .*max_request_tokens=64"
        ):
            kv.get_many(NS, [stored, *over[:4]])
        assert raw.counts(NS) == before and refused(kv) == 2
        # The wire call, packed ids and max_tokens counted too: one item reserving room for 60
        # tokens and one carrying 8 ids is 68.
        reserve = pb.BatchReserveRequest(
            items=[
                pb.ReserveRequest(session_id=kv.session_id, namespace=NS, max_tokens=60),
                pb.ReserveRequest(session_id=kv.session_id, namespace=NS, token_ids_u32=bytes(4 * 2 * T)),
            ]
        )
        e = raw.error("BatchReserve", reserve)
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "carry 68 token ids" in e.details()
        assert raw.counts(NS) == before and refused(kv) == 3
        assert all(not r.hit_tokens for r in (kv.lookup(NS, p) for p in over))  # none of them stored

        # At the quota: 4 x 16 = 64 ids works, each item as its own call would.
        under = over[:4]
        puts = kv.put_many(NS, under, [prompt_bytes(p, shape, T) for p in under])
        assert [r.sealed_pages for r in puts] == [4, 4, 4, 4]
        gets = kv.get_many(NS, [stored, *under[:3]])
        for p, got in zip([stored, *under[:3]], gets, strict=True):
            assert got.data.numpy().tobytes() == prompt_bytes(p, shape, T)
        assert refused(kv) == 3
    assert d.proc.poll() is None
