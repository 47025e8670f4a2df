"""Token ids packed on the wire (`token_ids_u32`, little-endian uint32; docs/api.md): the
client library sends them packed, and the daemon answers a packed request exactly as it
answers the same ids in the repeated `token_ids` (the errors: tests/test_e2e_bad_input.py)."""

from __future__ import annotations

from typing import Any

import grpc
import kvstore_client
import numpy as np
from e2e_helpers import Raw, prompt, prompt_bytes
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

NS = "test"  # tests/daemon.py: 4 tokens a page
T = 4


class Requests(grpc.UnaryUnaryClientInterceptor):
    """The requests a client sends, by method name."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.sent.append((details.method.rsplit("/", 1)[-1], request))
        return continuation(details, request)


def u32(ids: list[int]) -> bytes:
    return np.asarray(ids, dtype="<u4").tobytes()


def test_the_client_sends_packed_ids_and_both_forms_answer_the_same(daemon) -> None:
    requests = Requests()  # (seen on the gRPC channel: the lane is off for this client)
    channel = grpc.intercept_channel(grpc.insecure_channel(daemon.target), requests)
    with Raw(daemon.target) as raw, kvstore_client.Client(channel, daemon.target, lane=False) as kv:
        kv.open("packed")
        shape = kv.namespace(NS).page_shape
        first, second = prompt(3 * T + 2, seed=41), prompt(2 * T, seed=42)
        kv.put(NS, first, prompt_bytes(first, shape, T))  # Reserve + Seal
        kv.put(NS, np.array(second, dtype=np.int64), prompt_bytes(second, shape, T))  # Put, into the credit
        hit = kv.get(NS, np.array(first, dtype=np.int32))
        assert hit.data.numpy().tobytes() == prompt_bytes(first[: 3 * T], shape, T)
        with_ids = [(m, r) for m, r in requests.sent if m in ("Reserve", "Put", "Lookup")]
        assert [m for m, _ in with_ids] == ["Reserve", "Put", "Lookup"]
        for method, r in with_ids:
            assert list(r.token_ids) == [], f"{method} sent the repeated field"
            assert len(r.token_ids_u32) == 4 * (len(second) if method == "Put" else len(first))

        # The daemon: one reply, whichever field carries the ids.
        for tokens, pages in ((first, 3), (second, 2)):
            old = raw.kv.Lookup(pb.LookupRequest(namespace=NS, token_ids=tokens), timeout=10)
            new = raw.kv.Lookup(pb.LookupRequest(namespace=NS, token_ids_u32=u32(tokens)), timeout=10)
            assert old.hit_tokens == pages * T and len(old.block_hashes) == 16 * pages
            assert new.SerializeToString() == old.SerializeToString()

        sid = kv.session_id
        replies = []
        for form in ({"token_ids": first[: 3 * T]}, {"token_ids_u32": u32(first[: 3 * T])}):
            reply = raw.kv.Reserve(pb.ReserveRequest(session_id=sid, namespace=NS, **form), timeout=10)
            raw.kv.Release(pb.ReleaseRequest(session_id=sid, sequence_id=reply.sequence_id), timeout=10)
            reply.sequence_id = 0
            replies.append(reply)
        assert replies[0].cached_tokens == 3 * T and len(replies[0].pages) == 3
        assert replies[1].SerializeToString() == replies[0].SerializeToString()
