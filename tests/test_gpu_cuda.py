"""The CUDA pool on a real GPU: skipped, with the probe's reason, where there is none.

What runs here on a GPU machine (tools/gpu_check.py): the daemon's raw allocation and IPC
handle (kvstore/memory/cuda_pool.py), the tiers' staging copies, and the real daemon
serving a `cuda:0` namespace whose pages one process writes through its IPC mapping and
another reads back (client/kvstore_client/_cuda_pool.py), seal after sync included.
"""

from __future__ import annotations

import hashlib
import textwrap

import pytest
from daemon import SMALL_NAMESPACE
from e2e_helpers import prompt
from gpu_probe import cuda_missing, run_reader

pytestmark = pytest.mark.skipif(cuda_missing() is not None, reason=f"needs a GPU: {cuda_missing()}")

NS = "test"
CUDA_NS = SMALL_NAMESPACE | {"device": "cuda:0"}


def pattern(n: int, seed: int) -> bytes:
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def test_the_pool_is_one_raw_allocation_with_an_ipc_handle_and_staged_copies() -> None:
    from kvstore.memory.backend import HandleType, SyncMode
    from kvstore.memory.cuda_pool import CudaPool

    pool = CudaPool.create("cuda:0", 1 << 20)
    try:
        h = pool.handle
        assert h.handle_type is HandleType.CUDA_IPC and h.sync_mode is SyncMode.BEFORE_COMMIT
        assert h.device.startswith(("cuda:GPU-", "cuda:PCI-")) and len(h.ipc_handle) == 64
        assert h.alloc_nbytes == h.nbytes == 1 << 20 and h.host_id
        data = pattern(4096, 1)
        pool.copy_in(8192, 4096)[:] = data
        assert bytes(pool.copy_out(8192, 4096)) == data  # staged: not on the device yet
        pool.landed(8192)
        assert pool.staged == 0 and bytes(pool.copy_out(8192, 4096)) == data  # from the device
        assert bytes(pool.copy_out(0, 4096)) == bytes(4096)  # zeroed at start
    finally:
        pool.close()


def test_many_pages_go_out_and_back_through_the_pinned_arena_in_batches() -> None:
    """The batch forms on the copy engines (kvstore/memory/staging.py): a small arena first
    (2 pages a ring chunk, 17 pinned slots for 120 pages: the rest staged unpinned), then the
    default one; in order and scattered; a staged page reads as its staged bytes."""
    import numpy as np

    from kvstore.memory.cuda_pool import CudaPool
    from kvstore.memory.staging import DEFAULT_STAGING_BYTES

    page, pages = 737_280, 120
    base = np.frombuffer(pattern(page, 2), dtype=np.uint8)

    def content(i: int, salt: int) -> bytes:
        return (base + np.uint8((7 * i + salt) % 256)).tobytes()

    for staging in (16 << 20, None):
        pool = CudaPool.create("cuda:0", pages * page, staging or DEFAULT_STAGING_BYTES)
        try:
            offsets = [i * page for i in range(pages)]
            for salt, order in ((1, offsets), (2, offsets[::-1]), (3, offsets[1::2] + offsets[::2])):
                for o in order:
                    pool.copy_in(o, page)[:] = content(o // page, salt)
                pool.landed_many(order)
                assert pool.staged == 0
                got = [
                    bytes(v) == content(o // page, salt)
                    for o, v in zip(order, pool.copy_out_many(order, page), strict=True)
                ]
                assert all(got), f"arena {staging}: {got.count(False)} pages differ"
            assert (pool.staged_unpinned > 0) == (staging is not None)
            pool.copy_in(5 * page, page)[:] = content(5, 9)
            views = pool.copy_out_many([4 * page, 5 * page, 6 * page], page)
            assert [bytes(v) for v in views] == [content(4, 3), content(5, 9), content(6, 3)]
            pool.landed(5 * page)
            assert bytes(pool.copy_out(5 * page, page)) == content(5, 9)
        finally:
            pool.close()


READER = textwrap.dedent(
    """
    import sys, hashlib, kvstore_client
    tokens = [int(t) for t in sys.argv[2].split(",")]
    with kvstore_client.connect(sys.argv[1], client_name="reader") as c:
        with c.lookup("test", tokens, pin=True) as hit:
            views = hit.views()
            assert all(v.is_cuda for v in views)
            print(hit.hit_tokens, *[hashlib.sha256(v.cpu().contiguous().view(-1).numpy().tobytes()).hexdigest()
                                    for v in views])
    """
)


def read_in_another_process(target: str, tokens: list[int]) -> list[str]:
    return run_reader(READER, target, tokens, timeout=120)


def write_pages(c, tokens: list[int]) -> list[str]:
    """Write seeded bytes into the writable pages through the IPC mapping (on the current
    stream, not synchronized: the library's Commit must wait for it); their digests."""
    import torch

    ns = c.namespace(NS)
    seq = c.allocate(NS)
    res = seq.append(tokens)
    digests = []
    for p in res.writable_pages:
        view = ns.page(p.slot)
        assert view.is_cuda
        src = torch.frombuffer(
            bytearray(pattern(view.numel() * view.element_size(), p.index)), dtype=torch.uint8
        )
        view.view(-1).view(torch.uint8).copy_(src.cuda(), non_blocking=True)
        digests.append(hashlib.sha256(src.numpy().tobytes()).hexdigest())
    assert seq.commit().sealed_pages == len(tokens) // 4
    return digests[: len(tokens) // 4]


def test_another_process_reads_what_one_wrote_through_the_ipc_mapping(daemon_factory) -> None:
    import kvstore_client

    d = daemon_factory(namespaces=[CUDA_NS]).start()
    tokens = prompt(12, seed=1)
    with kvstore_client.connect(d.target, client_name="writer") as c:
        want = write_pages(c, tokens)
        assert read_in_another_process(d.target, tokens) == ["12", *want]


def test_pages_go_down_to_the_host_tier_and_back_through_staging(daemon_factory) -> None:
    import kvstore_client

    d = daemon_factory(server={"host_tier_bytes": 256 << 10}, namespaces=[CUDA_NS]).start()
    tokens = prompt(12, seed=2)
    with kvstore_client.connect(d.target, client_name="writer") as c:
        want = write_pages(c, tokens)
        c.close()  # (our sequence: released at close, so the pages are evictable)
    with kvstore_client.connect(d.target) as c:
        assert c.evict(NS, all=True).pages_evicted == 3
        assert read_in_another_process(d.target, tokens) == ["12", *want]


def test_a_handle_for_a_gpu_this_process_does_not_see_fails_loudly() -> None:
    from kvstore_client._cuda_pool import CudaMapping
    from kvstore_client.errors import PoolError
    from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

    d = pb.PoolDescriptor(
        device="cuda:GPU-00000000-0000-0000-0000-000000000000",
        handle_type=pb.CUDA_IPC,
        ipc_handle=bytes(64),
        dtype=pb.FLOAT16,
        sync_mode=pb.SYNC_BEFORE_COMMIT,
    )
    with pytest.raises(PoolError, match="sees no such GPU"):
        CudaMapping.open(d)
