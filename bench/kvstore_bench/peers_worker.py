"""One peer of `kvstore-bench peers`, measured in its own process (run with the peers venv's
python: `build/peers-venv/bin/python bench/kvstore_bench/peers_worker.py SYSTEM ...`).

Standard library only at import time, so it runs under any python; the peer's client package
is imported when measured, and a missing one is reported as a reason, never faked. Starts the
peer's server itself (mooncake_master, redis-server) on free ports in a temp dir and stops it.
Prints one JSON object on stdout: {"available": true, "put_s": {k: [seconds a pass]}, ...} or
{"available": false, "reason": "..."}.

The pages are `pages` x `page_bytes` bytes from `random.Random(seed)` (the same bytes the
kvstore side writes). A pass puts all of them in requests of k pages, then gets them all back
in requests of k pages into a preallocated buffer, checks the bytes, and clears the store.

- mooncake: MooncakeDistributedStore, embedded (this process contributes the segment that
  holds the data), protocol tcp (local transfers are memcpy), metadata P2PHANDSHAKE, a
  mooncake_master child. put = batch_put_from (registered source buffer), get =
  batch_get_into (registered destination buffer): one call a request each way.
- mooncake-standalone: the data in a mooncake_client process (the "real client"), this one a
  dummy client over its IPC socket and shared memory; put_batch / get_batch (bytes).
- lmcache: always skipped, with the reason (see LMCACHE_REASON).
- redis-unix / redis-tcp: redis-server child (no persistence), redis-py (hiredis if present),
  a non-transactional pipeline of k SETs / k GETs a request; get copies each value into the
  destination buffer.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

Batch = list[int]  # page indices of one request

LMCACHE_REASON = (
    "its MP server (lmcache.v1.multiprocess) moves KV between its storage and an engine's "
    "registered KV-cache tensors (register the engine's caches by IPC handle, then store/retrieve "
    "by block ids); it has no put/get of bytes from client memory to time against these pages on "
    "a CPU-only machine"
)


def lmcache_reason() -> str:
    try:
        import lmcache  # noqa: F401
    except ImportError as e:
        return f"lmcache is not installed in this venv ({e}); " + LMCACHE_REASON
    from importlib.metadata import version

    return f"lmcache {version('lmcache')} installs, but " + LMCACHE_REASON


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def page_bytes_of(seed: int, pages: int, page_bytes: int) -> bytearray:
    """The pages every system stores (randbytes takes under 2^28 bytes at once: page by page)."""
    rng, out = random.Random(seed), bytearray()
    for _ in range(pages):
        out += rng.randbytes(page_bytes)
    return out


@contextlib.contextmanager
def child(argv: list[str], log: str, ready: Callable[[], bool], what: str) -> Iterator[None]:
    with open(log, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        deadline = time.monotonic() + 30
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                with open(log, errors="replace") as f:
                    tail = f.read()[-2000:]
                raise RuntimeError(f"{what} did not start (status {proc.poll()}): {tail}")
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def port_open(port: int) -> Callable[[], bool]:
    def check() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    return check


# ---------------------------------------------------------------- the peers


class Mooncake:
    def __init__(self, tmp: str, pages: int, page_bytes: int, src: bytearray, dst: bytearray) -> None:
        from mooncake.store import MooncakeDistributedStore

        self.tmp, self.page_bytes = tmp, page_bytes
        self.segment = int(pages * page_bytes * 1.3) + (256 << 20)
        self.store = MooncakeDistributedStore()
        self._src = (ctypes.c_char * len(src)).from_buffer(src)
        self._dst = (ctypes.c_char * len(dst)).from_buffer(dst)
        self.src, self.dst = ctypes.addressof(self._src), ctypes.addressof(self._dst)
        self.stored = 0

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        import mooncake

        master = shutil.which("mooncake_master") or os.path.join(
            os.path.dirname(mooncake.__file__), "mooncake_master"
        )
        rpc, metrics = free_port(), free_port()
        # A get leases its objects (5 s by default) and remove_all skips leased ones; a short
        # lease lets each pass clear the store before the next instead of evicting under it.
        argv = [master, f"-rpc_port={rpc}", f"-metrics_port={metrics}", "-default_kv_lease_ttl=200"]
        with child(argv, os.path.join(self.tmp, "master.log"), port_open(rpc), "mooncake_master"):
            rc = self.store.setup(
                "127.0.0.1", "P2PHANDSHAKE", self.segment, 64 << 20, "tcp", "", f"127.0.0.1:{rpc}"
            )
            if rc != 0:
                raise RuntimeError(f"MooncakeDistributedStore.setup returned {rc}")
            for addr, buf in ((self.src, self._src), (self.dst, self._dst)):
                if self.store.register_buffer(addr, len(buf)) != 0:
                    raise RuntimeError("register_buffer failed")
            try:
                yield
            finally:
                self.store.close()

    def put(self, keys: list[str], batch: Batch) -> None:
        pb = self.page_bytes
        rcs = self.store.batch_put_from(keys, [self.src + i * pb for i in batch], [pb] * len(batch))
        if any(rc != 0 for rc in rcs):
            raise RuntimeError(f"batch_put_from of {len(batch)} pages: {rcs}")
        self.stored += len(keys)

    def get(self, keys: list[str], batch: Batch) -> None:
        pb = self.page_bytes
        got = self.store.batch_get_into(keys, [self.dst + i * pb for i in batch], [pb] * len(batch))
        if any(n != pb for n in got):
            raise RuntimeError(f"batch_get_into of {len(batch)} pages: {got}")

    def clear(self) -> None:
        deadline = time.monotonic() + 10
        while self.stored > 0:  # leased objects are removed once their lease runs out
            self.stored -= max(0, self.store.remove_all())
            if self.stored and time.monotonic() > deadline:
                raise RuntimeError(f"remove_all left {self.stored} objects for 10 s")
            if self.stored:
                time.sleep(0.02)


class MooncakeStandalone(Mooncake):
    """The data in a mooncake_client process of its own (the real client owning the segment);
    this process is a dummy client talking to it over its IPC socket and shared memory.
    put_batch / get_batch of the pages (get returns bytes, copied into the buffer)."""

    def __init__(
        self, tmp: str, pages: int, page_bytes: int, src: bytearray, dst: bytearray, largest: int
    ) -> None:
        super().__init__(tmp, pages, page_bytes, src, dst)
        self.local_buffer = largest * page_bytes + (64 << 20)  # a request's bytes in transit
        self.src_view, self.dst_view = memoryview(src), memoryview(dst)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        import mooncake

        here = os.path.dirname(mooncake.__file__)
        rpc, metrics, port = free_port(), free_port(), free_port()
        master = [os.path.join(here, "mooncake_master"), f"-rpc_port={rpc}", f"-metrics_port={metrics}"]
        master.append("-default_kv_lease_ttl=200")
        client = [os.path.join(here, "mooncake_client"), "-host=127.0.0.1", f"-port={port}"]
        client += [f"-global_segment_size={self.segment}", f"-master_server_address=127.0.0.1:{rpc}"]
        client += ["-metadata_server=P2PHANDSHAKE", "-protocol=tcp"]
        with (
            child(master, os.path.join(self.tmp, "master.log"), port_open(rpc), "mooncake_master"),
            child(client, os.path.join(self.tmp, "client.log"), port_open(port), "mooncake_client"),
        ):
            rc = self.store.setup_dummy(64 << 20, self.local_buffer, f"127.0.0.1:{port}")
            if rc != 0:
                raise RuntimeError(f"MooncakeDistributedStore.setup_dummy returned {rc}")
            try:
                yield
            finally:
                self.store.close()

    def put(self, keys: list[str], batch: Batch) -> None:
        pb = self.page_bytes
        rc = self.store.put_batch(keys, [self.src_view[i * pb : (i + 1) * pb] for i in batch])
        if rc != 0:
            raise RuntimeError(f"put_batch of {len(batch)} pages: {rc}")
        self.stored += len(keys)

    def get(self, keys: list[str], batch: Batch) -> None:
        pb = self.page_bytes
        for value, i in zip(self.store.get_batch(keys), batch, strict=True):
            if len(value) != pb:
                raise RuntimeError(f"get_batch of {len(batch)} pages: a value of {len(value)} bytes")
            self.dst_view[i * pb : (i + 1) * pb] = value


class Redis:
    def __init__(self, tmp: str, unix: bool, page_bytes: int, src: bytearray, dst: bytearray) -> None:
        import redis

        self.redis, self.tmp, self.unix, self.page_bytes = redis, tmp, unix, page_bytes
        self.src, self.dst = memoryview(src), memoryview(dst)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        server = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(server):
            raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
        port, sock = free_port(), os.path.join(self.tmp, "redis.sock")
        argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--unixsocket", sock]
        argv += ["--save", "", "--appendonly", "no", "--dir", self.tmp, "--proto-max-bulk-len", "1gb"]
        with child(argv, os.path.join(self.tmp, "redis.log"), port_open(port), "redis-server"):
            kw: dict[str, Any] = (
                {"unix_socket_path": sock} if self.unix else {"host": "127.0.0.1", "port": port}
            )
            self.r = self.redis.Redis(**kw)
            self.r.ping()
            try:
                yield
            finally:
                self.r.close()

    def put(self, keys: list[str], batch: Batch) -> None:
        pb, p = self.page_bytes, self.r.pipeline(transaction=False)
        for key, i in zip(keys, batch, strict=True):
            p.set(key, self.src[i * pb : (i + 1) * pb])
        p.execute()

    def get(self, keys: list[str], batch: Batch) -> None:
        pb, p = self.page_bytes, self.r.pipeline(transaction=False)
        for key in keys:
            p.get(key)
        for value, i in zip(p.execute(), batch, strict=True):
            self.dst[i * pb : (i + 1) * pb] = value

    def clear(self) -> None:
        self.r.flushall()


# ---------------------------------------------------------------- the measurement


def measure(
    peer: Any, pages: int, sizes: list[int], repeat: int, src: bytearray, dst: bytearray
) -> dict[str, Any]:
    put_s: dict[str, list[float]] = {}
    get_s: dict[str, list[float]] = {}
    for k in sizes:
        batches = [list(range(i, min(i + k, pages))) for i in range(0, pages, k)]
        for rep in range(repeat + 1):  # the first pass warms up (page faults, connections)
            keys = [[f"p{k}-{rep}-{i}" for i in b] for b in batches]
            ctypes.memset((ctypes.c_char * len(dst)).from_buffer(dst), 0, len(dst))
            t0 = time.perf_counter()
            for ks, b in zip(keys, batches, strict=True):
                peer.put(ks, b)
            t1 = time.perf_counter()
            for ks, b in zip(keys, batches, strict=True):
                peer.get(ks, b)
            t2 = time.perf_counter()
            if dst != src:
                raise RuntimeError(f"{k} pages a request: the bytes read back differ from those written")
            peer.clear()
            if rep:
                put_s.setdefault(str(k), []).append(t1 - t0)
                get_s.setdefault(str(k), []).append(t2 - t1)
    return {"available": True, "put_s": put_s, "get_s": get_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "system", choices=["mooncake", "mooncake-standalone", "redis-unix", "redis-tcp", "lmcache"]
    )
    p.add_argument("--pages", type=int, required=True)
    p.add_argument("--page-bytes", type=int, required=True)
    p.add_argument("--sizes", required=True, type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.system == "lmcache":
        print(json.dumps({"available": False, "reason": lmcache_reason(), "python": sys.executable}))
        return 0
    src = page_bytes_of(a.seed, a.pages, a.page_bytes)
    dst = bytearray(len(src))
    with tempfile.TemporaryDirectory(prefix="kvsb-peer-") as tmp:
        try:
            if a.system == "mooncake":
                peer: Any = Mooncake(tmp, a.pages, a.page_bytes, src, dst)
            elif a.system == "mooncake-standalone":
                peer = MooncakeStandalone(tmp, a.pages, a.page_bytes, src, dst, max(a.sizes))
            else:
                peer = Redis(tmp, a.system == "redis-unix", a.page_bytes, src, dst)
            with peer.running():
                result = measure(peer, a.pages, a.sizes, a.repeat, src, dst)
        except (ImportError, OSError, RuntimeError) as e:
            result = {"available": False, "reason": f"{type(e).__name__}: {e}"}
    result["python"] = sys.executable
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
