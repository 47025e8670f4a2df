"""Pool identity across daemon restarts, and namespaces created and deleted at run time.

Real daemons (tests/daemon.py), real gRPC, real /dev/shm; this test process is the client
process that holds a mapping while the daemon behind it changes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import kvstore_client
import pytest
import torch
from daemon import SHM_DIR, DaemonProcess, to_toml
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


def test_restart_right_after_kill_9_removes_the_old_segments_while_the_old_pid_looks_alive() -> None:
    with DaemonProcess() as a, DaemonProcess(shm_prefix=a.shm_prefix) as b:
        a.start()
        old = a.shm_segments()
        assert old
        a.signal(signal.SIGKILL)
        # Dead but not reaped: a zombie, whose pid still answers kill(pid, 0).
        os.waitid(os.P_PID, a.proc.pid, os.WEXITED | os.WNOWAIT)
        b.start()
        assert not set(old) & set(b.shm_segments())
        assert len(b.shm_segments()) == 1
        assert "removed stale pool segment" in b.stderr_text()
        a.wait()


def test_a_daemon_that_gets_its_old_pid_back_removes_its_old_segment_and_starts() -> None:
    d = DaemonProcess()
    d.config_path.write_text(to_toml(d.server, d.namespaces))
    # The daemon exec()s in a shell whose pid we know before it starts: its segments
    # from a "previous life" (the old naming, and the new one) are there when it starts.
    with open(d.dir / "stderr.log", "wb") as err:  # the child keeps its own copy of the fd
        proc = subprocess.Popen(
            [
                "sh",
                "-c",
                'read _ && exec "$0" -m kvstore serve --config "$1"',
                sys.executable,
                str(d.config_path),
            ],
            stdin=subprocess.PIPE,
            stderr=err,
        )
    try:
        leftovers = [
            SHM_DIR / f"{d.shm_prefix}{proc.pid}.test",
            SHM_DIR / f"{d.shm_prefix}{proc.pid}.{1:016x}.test",
        ]
        for path in leftovers:
            path.write_bytes(b"\x5a" * 4096)
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.close()
        kvstore_client.wait_until_serving(d.target, 30, still_starting=lambda: proc.poll() is None)
        assert not any(p.exists() for p in leftovers)
        with kvstore_client.connect(d.target) as kv:
            write_prompt(kv, "test", 0x11)
            assert read_prompt(kv, "test") == {0x11}
    finally:
        proc.terminate()
        proc.wait(30)
        d.close()


def test_a_live_daemons_segments_survive_another_daemons_start() -> None:
    with DaemonProcess() as a, DaemonProcess(shm_prefix=a.shm_prefix) as b:
        a.start()
        with kvstore_client.connect(a.target) as kv:
            write_prompt(kv, "test", 0x33)
            mine = a.shm_segments()
            # A live daemon of the version before locks (it named segments <prefix><pid>.<ns>):
            legacy = SHM_DIR / f"{a.shm_prefix}{os.getpid()}.legacy"
            legacy.write_bytes(b"")
            b.start()
            assert set(mine) < set(b.shm_segments()) and legacy.exists()
            assert "removed stale pool segment" not in b.stderr_text()
            assert read_prompt(kv, "test") == {0x33}  # through a fresh mapping too:
            assert read_prompt(kvstore_client.connect(a.target), "test") == {0x33}


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
            assert info.pool.pool_epoch and info.pool.shm_name in d.shm_segments()
        # The cancelled call's pool is closed once its thread has backed it: one segment left.
        wait_until(
            lambda: [s for s in d.shm_segments() if s.endswith(".big")],
            lambda segs: segs == [info.pool.shm_name],
            timeout=30,
            what="the cancelled pool removed",
        )


def test_other_rpcs_are_answered_while_a_big_namespace_is_created() -> None:
    with DaemonProcess(namespaces=[]) as d:
        d.start()
        with kvstore_client.connect(d.target, lease_ttl_s=1.0) as kv:
            created: list[object] = []
            creating = threading.Thread(
                target=lambda: created.append(kv.create_namespace(big_spec("big", 2)))
            )
            creating.start()
            # Heartbeat until the pool exists (by name in /dev/shm) and the RPC answered.
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
            segment = ns.info.pool.shm_name
            held = kv.lookup(ns, TOKENS, pin=True)
            with pytest.raises(FailedPrecondition, match="1 pin"):
                admin.delete_namespace("tmp")
            assert (SHM_DIR / segment).exists()
            assert {int(b) for b in held.views()[0].contiguous().view(-1).numpy().view("u1")} == {0x44}

            with pytest.raises(InvalidArgument, match="pool_epoch=0"):
                admin.delete_namespace("tmp", force=True, pool_epoch=0)
            old_epoch = ns.epoch
            r = admin.delete_namespace("tmp", force=True, pool_epoch=old_epoch)
            assert (r.sequences_released, r.pins_released) == (0, 1)
            assert not (SHM_DIR / segment).exists()
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
