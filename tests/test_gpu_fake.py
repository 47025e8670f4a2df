"""The GPU pool's rules, in CI: a real daemon whose namespace lives on the fake device
(kvstore/memory/fake_device.py), real gRPC, real shared memory, client processes.

The fake keeps a client's writes in its own buffers until it synchronizes, as a stream
does, and counts every page touched since; so these tests fail if the library sent a
Commit before its sync (the daemon refuses it), if writes never reached the pool (another
process reads other bytes), or if the tiers touched device memory as host memory.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import grpc
import kvstore_client
import pytest
import torch
from daemon import SMALL_NAMESPACE
from e2e_helpers import Raw, page_content, page_tokens_of, prompt
from gpu_probe import run_reader
from kvstore_client.errors import PoolError
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

NS = "test"
T = 4
FAKE = "fake:dev0"
DEVICE_NS = SMALL_NAMESPACE | {"device": FAKE}


@pytest.fixture
def fake_devices(monkeypatch):
    """This process (and the clients it starts) has the fake device `dev0`."""
    monkeypatch.setenv("KVSTORE_FAKE_DEVICES", "dev0")


@pytest.fixture
def device_daemon(daemon_factory, fake_devices):
    return daemon_factory(namespaces=[DEVICE_NS]).start()


def write(seq: kvstore_client.Sequence, tokens: list[int], pages) -> None:
    ns = seq.namespace
    for page in pages:
        ns.page(page.slot).copy_(
            page_content(page.index, page_tokens_of(tokens, page.index, T), ns.page_shape)
        )


READER = textwrap.dedent(
    """
    import sys, hashlib, kvstore_client
    tokens = [int(t) for t in sys.argv[2].split(",")]
    with kvstore_client.connect(sys.argv[1], client_name="reader") as c:
        with c.lookup("test", tokens, pin=True) as hit:
            print(hit.hit_tokens, *[hashlib.sha256(v.contiguous().view(-1).numpy().tobytes()).hexdigest()
                                    for v in hit.views()])
    """
)


def read_in_another_process(target: str, tokens: list[int]) -> list[str]:
    return run_reader(READER, target, tokens, timeout=60)


def digest(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.contiguous().view(-1).numpy().tobytes()).hexdigest()


def test_the_descriptor_names_the_fake_device_and_asks_for_sync(device_daemon) -> None:
    with Raw(device_daemon.target) as raw:
        d = raw.pool(NS)
    assert d.handle_type == pb.FAKE_DEVICE
    assert d.device == FAKE
    assert d.sync_mode == pb.SYNC_BEFORE_COMMIT
    assert d.alloc_nbytes > d.nbytes > 0
    assert d.host_id == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert d.pool_epoch != 0 and d.ipc_handle and d.pool_ticket


def test_pages_written_and_committed_are_read_by_another_process(device_daemon) -> None:
    tokens = prompt(10, seed=1)  # two full pages and a partial one
    with kvstore_client.connect(device_daemon.target, client_name="writer") as c:
        seq = c.allocate(NS)
        res = seq.append(tokens)
        write(seq, tokens, res.writable_pages)
        assert seq.commit().sealed_pages == 2  # the library synchronized first
        want = [
            digest(page_content(i, page_tokens_of(tokens, i, T), c.namespace(NS).page_shape)) for i in (0, 1)
        ]
        assert read_in_another_process(device_daemon.target, tokens) == ["8", *want]


def test_a_commit_before_the_sync_is_refused_and_one_after_it_seals(device_daemon) -> None:
    tokens = prompt(8, seed=2)
    with kvstore_client.connect(device_daemon.target) as c, Raw(device_daemon.target) as raw:
        seq = c.allocate(NS)
        res = seq.append(tokens)
        write(seq, tokens, res.writable_pages)  # "kernels" in flight: not synchronized
        commit = pb.CommitRequest(session_id=c.session_id, sequence_id=seq.sequence_id, num_tokens=8)
        err = raw.error("Commit", commit)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "synchronized" in err.details() and "seal after sync" in err.details()
        assert raw.counts(NS)["pages_sealed"] == 0  # nothing changed
        c.namespace(NS).pool.synchronize()
        assert raw.kv.Commit(commit, timeout=10).sealed_pages == 2


def test_a_handle_opens_only_on_its_own_device(device_daemon, monkeypatch) -> None:
    monkeypatch.setenv("KVSTORE_FAKE_DEVICES", "dev1")
    with kvstore_client.connect(device_daemon.target) as c:
        seq = c.allocate(NS)
        seq.append(prompt(4, seed=3))
        with pytest.raises(PoolError, match="no such device"):
            c.namespace(NS).page(seq.slots[0])


@pytest.mark.parametrize("staging", [None, 64 << 10])
def test_pages_go_down_to_the_host_tier_and_come_back_through_staging(
    daemon_factory, fake_devices, staging
) -> None:
    """The fake device has no host view: demotion and promotion must copy through staging
    (its arena: the default, or the smallest, where pages go out one at a time and come up
    staged outside it; the lookup's 3 promotions land in one batch either way)."""
    server = {"host_tier_bytes": 256 << 10} | ({"device_staging_bytes": staging} if staging else {})
    d = daemon_factory(server=server, namespaces=[DEVICE_NS]).start()
    tokens = prompt(12, seed=4)
    with kvstore_client.connect(d.target) as c, Raw(d.target) as raw:
        with c.allocate(NS) as seq:
            res = seq.append(tokens)
            write(seq, tokens, res.writable_pages)
            assert seq.commit().sealed_pages == 3
        assert c.evict(NS, all=True).pages_evicted == 3  # demoted to the host tier
        assert raw.counts(NS)["pages_sealed"] == 0
        shape = c.namespace(NS).page_shape
        want = [digest(page_content(i, page_tokens_of(tokens, i, T), shape)) for i in range(3)]
        assert read_in_another_process(d.target, tokens) == ["12", *want]  # promoted, bytes intact


def test_a_reader_synchronizes_before_its_pin_is_released(device_daemon) -> None:
    tokens = prompt(8, seed=5)
    with kvstore_client.connect(device_daemon.target) as c:
        seq = c.allocate(NS)
        write(seq, tokens, seq.append(tokens).writable_pages)
        seq.commit()
        pool = c.namespace(NS).pool
        synced = pool.syncs
        hit = c.lookup(NS, tokens, pin=True)
        assert [float(v.float().sum()) for v in hit.views()]  # "kernels" read the pages
        assert pool.pending == 2 and pool.syncs == synced
        hit.release()  # release after sync: the reads were waited for first
        assert pool.pending == 0 and pool.syncs == synced + 1
