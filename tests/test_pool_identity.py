"""Pool identity across daemon restarts, and namespaces created and deleted at run time.

Real daemons (tests/daemon.py), real gRPC, real memfd pools; this test process is the client
process that holds a mapping while the daemon behind it changes.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time

import grpc
import kvstore_client
import pytest
import torch
from daemon import DaemonProcess
from e2e_helpers import wait_until
from kvstore_client.errors import FailedPrecondition, InvalidArgument, NotFound, PoolError
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb
from kvstore_proto.kvstore.v1 import kvstore_pb2_grpc as pb_grpc

TOKENS = list(range(100, 108))  # two pages of the test namespace (4 tokens a page)


def write_prompt(kv: kvstore_client.Client, ns: str | kvstore_client.Namespace, fill: int) -> None:
    """Store TOKENS with every byte of their KV set to `fill`."""
    with kv.allocate(ns) as seq:
        res = seq.append(TOKENS)
        for view in seq.views(res.writable_pages):
            view.view(-1).view(dtype=torch.uint8).fill_(fill)
        seq.commit()


def read_prompt(kv: kvstore_client.Client, ns: str | kvstore_client.Namespace) -> set[int]:
    """The distinct byte values of TOKENS' cached KV, read through the client's mapping."""
    with kv.lookup(ns, TOKENS, pin=True) as hit:
        assert hit.hit_tokens == len(TOKENS)
        return {int(b) for view in hit.views() for b in view.contiguous().view(-1).numpy().view("u1")}


def test_a_client_holding_a_restarted_daemons_old_mapping_reads_the_new_pools_bytes() -> None:
    with DaemonProcess() as d:
        d.start()
        old = kvstore_client.connect(d.target)
        ns = old.namespace("test")
        write_prompt(old, ns, 0xAA)
        old_mapping = ns.pool
        assert read_prompt(old, ns) == {0xAA}
        old_hit = old.lookup(ns, TOKENS)  # slots of the old pool, kept by the engine

        d.kill()  # the same prefix, socket and namespace come back: a sidecar's restart
        d.start()
        with kvstore_client.connect(d.target) as writer:
            write_prompt(writer, "test", 0xBB)  # the new pool's bytes for the same tokens
        with kvstore_client.connect(d.target) as again:
            # The engine kept its Namespace (and mapping) across the reconnect.
            assert read_prompt(again, ns) == {0xBB}
            assert ns.pool is not old_mapping and old_mapping.closed
            with pytest.raises(PoolError, match="they index nothing there"):
                old_hit.views()  # the old slots are never read in the new pool
        old.close()


def test_a_killed_daemons_pool_vanishes_with_it_and_a_mapping_of_it_stays_valid() -> None:
    """No /dev/shm file at any time: the pool is a memfd, freed with its last holder. A client
    that maps it keeps reading its bytes after a kill -9; the restarted daemon has nothing
    to sweep."""
    with DaemonProcess() as d:
        d.start()
        assert d.shm_segments() == []
        with kvstore_client.connect(d.target) as kv:
            write_prompt(kv, "test", 0x77)
            views = kv.lookup("test", TOKENS, pin=True).views()  # (its pin ends with the daemon)
            d.kill()
            assert {int(b) for v in views for b in v.contiguous().view(-1).numpy().view("u1")} == {0x77}
        assert d.shm_segments() == []
        d.start()
        assert "removed stale pool socket" in d.stderr_text()  # (its socket files are all it left)
        with kvstore_client.connect(d.target) as kv:
            with pytest.raises(AssertionError):
                read_prompt(kv, "test")  # a new pool: nothing cached
            write_prompt(kv, "test", 0x78)
            assert read_prompt(kv, "test") == {0x78}
        assert d.shm_segments() == []


def closed_pools(d: DaemonProcess, namespace: str) -> list[str]:
    """Epochs (hex) of `namespace`'s pools the daemon says it closed."""
    return re.findall(
        rf"closed pool memfd {re.escape(d.shm_prefix)}([0-9a-f]{{16}})\.{namespace}\b", d.stderr_text()
    )


# ---------------------------------------------------------------- creating, deleting


def big_spec(name: str, gib: float) -> pb.NamespaceSpec:
    """A namespace of `gib` GiB (2 MiB pages)."""
    g = pb.Geometry(num_layers=32, num_kv_heads=8, head_dim=128, dtype=pb.FLOAT16, page_tokens=16)
    return pb.NamespaceSpec(name=name, geometry=g, num_pages=int(gib * 512))


def test_a_cancelled_create_namespace_leaves_nothing_and_the_retry_succeeds() -> None:
    with DaemonProcess(namespaces=[]) as d:
        d.start()
        with grpc.insecure_channel(d.target) as channel:
            admin = pb_grpc.AdminStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                admin.CreateNamespace(pb.CreateNamespaceRequest(spec=big_spec("big", 1)), timeout=0.05)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            info = admin.CreateNamespace(pb.CreateNamespaceRequest(spec=big_spec("big", 1)), timeout=60)
            assert info.pool.pool_epoch
        # The cancelled call's pool is closed once its thread has backed it; the retry's stays.
        closed = wait_until(
            lambda: closed_pools(d, "big"),
            lambda c: len(c) == 1,
            timeout=30,
            what="the cancelled pool closed",
        )
        assert closed != [f"{info.pool.pool_epoch:016x}"] and d.shm_segments() == []


def test_other_rpcs_are_answered_while_a_big_namespace_is_created() -> None:
    with DaemonProcess(namespaces=[]) as d:
        d.start()
        with kvstore_client.connect(d.target, lease_ttl_s=1.0) as kv:
            created: list[object] = []
            creating = threading.Thread(
                target=lambda: created.append(kv.create_namespace(big_spec("big", 2)))
            )
            creating.start()
            # Heartbeat until the pool exists and the RPC answered.
            worst = 0.0
            while creating.is_alive():
                t0 = time.monotonic()
                kv.heartbeat()
                worst = max(worst, time.monotonic() - t0)
                time.sleep(0.02)
            creating.join()
            assert created and kv.alive
            # Before the fix mmap(MAP_POPULATE) held the GIL ~1 s a GiB: no RPC answered meanwhile.
            assert worst < 0.5, f"a heartbeat took {worst:.2f}s while a 2 GiB pool was created"


def test_delete_namespace_refuses_while_held_unless_forced_and_a_mapping_never_sees_the_successor() -> None:
    with DaemonProcess() as d:
        d.start()
        spec = kvstore_client.namespace_spec(
            "tmp", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16", page_tokens=4, num_pages=16
        )
        with kvstore_client.connect(d.target) as kv, kvstore_client.connect(d.target) as admin:
            ns = kv.create_namespace(spec)
            write_prompt(kv, ns, 0x44)
            held = kv.lookup(ns, TOKENS, pin=True)
            with pytest.raises(FailedPrecondition, match="1 pin"):
                admin.delete_namespace("tmp")
            assert closed_pools(d, "tmp") == []
            view = held.views()[0]
            assert {int(b) for b in view.contiguous().view(-1).numpy().view("u1")} == {0x44}

            with pytest.raises(InvalidArgument, match="pool_epoch=0"):
                admin.delete_namespace("tmp", force=True, pool_epoch=0)
            old_epoch = ns.epoch
            r = admin.delete_namespace("tmp", force=True, pool_epoch=old_epoch)
            assert (r.sequences_released, r.pins_released) == (0, 1)
            assert closed_pools(d, "tmp") == [f"{old_epoch:016x}"]
            # Freed by the daemon, still mapped here: the view reads what it read.
            assert {int(b) for b in view.contiguous().view(-1).numpy().view("u1")} == {0x44}
            with pytest.raises(NotFound, match="'tmp'"):
                admin.lookup("tmp", TOKENS)
            with pytest.raises(NotFound, match="pin_id"):
                held.release()

            # The same name again: a new pool, a new epoch; `kv` still maps the old one.
            admin.create_namespace(spec)
            write_prompt(admin, "tmp", 0x55)
            assert read_prompt(kv, ns) == {0x55}
            with pytest.raises(FailedPrecondition, match="not the namespace you looked at"):
                admin.delete_namespace("tmp", pool_epoch=old_epoch)  # a stale command
            admin.delete_namespace("tmp")


def test_the_asyncio_client_maps_a_namespace_created_again_before_using_its_slots() -> None:
    async def main(target: str) -> None:
        async with kvstore_client.aio.connect(target) as kv:
            ns = await kv.namespace("test")
            old_mapping = ns.pool
            with kvstore_client.connect(target) as admin:
                spec = kvstore_client.namespace_spec(
                    "test",
                    num_layers=2,
                    num_kv_heads=2,
                    head_dim=16,
                    dtype="float16",
                    page_tokens=4,
                    num_pages=64,
                )
                admin.delete_namespace("test")
                admin.create_namespace(spec)
                write_prompt(admin, "test", 0x66)
            async with await kv.lookup(ns, TOKENS, pin=True) as hit:
                got = {int(b) for view in hit.views() for b in view.contiguous().view(-1).numpy().view("u1")}
            assert got == {0x66} and ns.pool is not old_mapping

    with DaemonProcess() as d:
        d.start()
        asyncio.run(main(d.target))
