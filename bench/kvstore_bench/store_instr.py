"""store-instr: instructions the daemon's handler code spends a Put or a Lookup, in process.

The servicers' own reply functions (`_put_reply`, `lookup_reply`) on a real Store, no gRPC:
k fresh pages a put into the session's credit (the fast path a `client.put` takes), and a
Lookup of a 64-page prompt that hits, pinned with a deadline and released (`lookup`) or
unpinned (`lookup-nopin`, the `rpc` benchmark's call), and that unpinned lookup as the daemon's
gRPC edge serves it (`lookup-edge`: the request's bytes through the edge's deserializer, its
wrapped handler and the reply's serializer, kvstore/server/edge.py; what grpc.aio itself does
around them is `rpc-instr`'s). Counted by cachegrind
(`valgrind --tool=cachegrind --cache-sim=no`, Debian's `valgrind`) as (Ir of N=60 ops - Ir
of N=20) / 40: the start-up cancels, and a count does not move with the machine's load,
unlike time. The requests are built before the loop and Python's GC is off while it runs
(one collection of the page table's objects inside one run's window and not the other's
moved a count by 150 k). The pool is 32,768 pages of 512 B: nothing is evicted.

    kvstore-bench store-instr --json                       # put at 16 and 64 pages, lookups at 64
    kvstore-bench store-instr --ops put --pages 16 --policy lru
    kvstore-bench store-instr --packed                     # the ids in token_ids_u32 (docs/api.md)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import shutil
import subprocess
import sys
import uuid
from typing import Any

from .harness import BenchError, emit, progress

OPS = ("put", "lookup", "lookup-nopin", "lookup-edge")
PAGE_TOKENS = 16
WARMUP = 20
COUNTS = (20, 60)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--ops", default="put,lookup,lookup-nopin", help=f"comma separated, of {', '.join(OPS)}")
    p.add_argument("--pages", default="16,64", help="pages a request, comma separated (default 16,64)")
    p.add_argument("--policy", default="horizon", help="eviction policy of the namespace (default horizon)")
    p.add_argument("--packed", action="store_true", help="token ids in token_ids_u32 (packed), not token_ids")


def run(args: argparse.Namespace) -> int:
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    sizes = [int(x) for x in args.pages.split(",") if x.strip()]
    if not ops or set(ops) - set(OPS) or not sizes or min(sizes) < 1:
        raise SystemExit(f"store-instr: --ops of {', '.join(OPS)}; --pages >= 1")
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise BenchError("store-instr needs valgrind (Debian: apt-get install valgrind)")
    form = "packed" if args.packed else "repeated"
    out: dict[str, Any] = {"policy": args.policy, "token_ids": form, "instructions": {}}
    for op in ops:
        for k in sizes if op == "put" else [max(sizes)]:
            counts = [_count(valgrind, n, k, args.policy, op, form) for n in COUNTS]
            per_op = (counts[1] - counts[0]) // (COUNTS[1] - COUNTS[0])
            out["instructions"][f"{op}_{k}"] = per_op
            progress(f"store-instr: {op} of {k} pages: {per_op:,} instructions")
    emit(out, args.json, "\n".join(f"{key}: {v:,} instructions" for key, v in out["instructions"].items()))
    return 0


def _count(valgrind: str, n: int, k: int, policy: str, op: str, form: str) -> int:
    env = os.environ | {"PYTHONHASHSEED": "0", "OPENBLAS_NUM_THREADS": "1"}
    cmd = [valgrind, "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"]
    cmd += [sys.executable, "-m", "kvstore_bench.store_instr", str(n), str(k), policy, op, form]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if done.returncode or found is None:
        raise BenchError(f"store-instr: {' '.join(cmd[4:])} failed: {done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def work(n: int, k: int, policy: str, op: str, form: str = "repeated") -> int:
    """`n` ops (after WARMUP more) in this process: what valgrind counts. Returns the pages
    sealed in the pool (put) or the last lookup's hit tokens."""
    import numpy as np
    from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

    from kvstore.server import fast_servicer as fs
    from kvstore.store import credit
    from kvstore.store.store import Store
    from kvstore.store.types import NamespaceSpec, StoreLimits

    store = Store(StoreLimits(), f"kvinstr-{uuid.uuid4().hex[:8]}-")
    try:
        spec = NamespaceSpec(
            "t", num_layers=1, num_kv_heads=1, head_dim=8, dtype="float16", page_tokens=PAGE_TOKENS,
            num_pages=32768, vocab_size=50000, policy=policy,
        )  # fmt: skip
        store.create_namespace(spec)
        sid = store.open_session("instr", 600).session_id
        ns = store.namespace("t")
        total = max(n, *COUNTS) + WARMUP + 1
        prompts = [[(i * 7919 + t) % 50000 for t in range(k * PAGE_TOKENS)] for i in range(total)]

        def ids(t: list[int]) -> dict[str, Any]:
            return (
                {"token_ids_u32": np.asarray(t, dtype="<u4").tobytes()}
                if form == "packed"
                else {"token_ids": t}
            )

        puts = [pb.PutRequest(session_id=sid, namespace="t", credit_pages=k, **ids(t)) for t in prompts]
        pin_ms = 1000 if op == "lookup" else 0
        edge_call = _edge_lookup(store) if op == "lookup-edge" else None
        look = pb.LookupRequest(session_id=sid, namespace="t", pin_ttl_ms=pin_ms, **ids(prompts[0]))
        grant = credit.grant(store, store.session(sid), ns, k)
        cr = (grant.sequence_id, list(grant.slots))

        def put(i: int) -> None:
            nonlocal cr
            req = puts[i]
            req.credit_sequence_id = cr[0]
            req.slots[:] = cr[1][:k]
            r = fs._put_reply(store, req)
            cr = (r.credit.sequence_id, list(r.credit.slots))

        put(0)  # the page a lookup hits
        data = look.SerializeToString()
        gc.collect()
        gc.freeze()
        gc.disable()
        hit = 0
        if edge_call is not None:  # (all in one task: the loop's start and stop once, not per call)
            hit = edge_call(data, n + WARMUP)
        for i in range(1, n + WARMUP + 1 if edge_call is None else 0):
            if op == "put":
                put(i)
                continue
            raw = _drive(fs.lookup_reply(store, look))  # (the reply's bytes)
            if pin_ms:
                store.release_pin(sid, pb.LookupResponse.FromString(raw).pin_id)
            hit = -1
        gc.enable()
        if hit == -1:
            hit = pb.LookupResponse.FromString(raw).hit_tokens
        return len(ns.index) if op == "put" else hit
    finally:
        store.close()


def _edge_lookup(store: Any) -> Any:
    """A function of a LookupRequest's bytes and n: n Lookups through the gRPC edge's Lookup
    handler as the daemon registers it, in one task on a running loop; the last one's hit."""
    import grpc
    from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb
    from kvstore_proto.kvstore.v1 import kvstore_pb2_grpc as pb_grpc

    from kvstore.server.edge import Edge
    from kvstore.server.kvstore_servicer import KVStoreServicer

    edge = Edge()
    pb_grpc.add_KVStoreServicer_to_server(KVStoreServicer(store, edge.counts, edge.rpc), edge)
    h = edge._methods["/kvstore.v1.KVStore/Lookup"]
    loop = asyncio.new_event_loop()
    edge._loop = loop  # (as `install` on the daemon's loop sets it)

    class Context:  # what the edge asks of grpc.aio's context on a call that succeeds
        def code(self) -> None:
            return None

        def done(self) -> bool:
            return False

        async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
            raise BenchError(f"store-instr: the edge's Lookup aborted: {code} {details}")

    context = Context()

    serialize = h.response_serializer or bytes  # (None: the reply is its bytes)

    async def calls(data: bytes, n: int) -> bytes:
        reply = b""
        for _ in range(n):
            reply = serialize(await h.unary_unary(h.request_deserializer(data), context))
        return reply

    def call(data: bytes, n: int) -> int:
        try:
            return pb.LookupResponse.FromString(loop.run_until_complete(calls(data, n))).hit_tokens
        finally:
            loop.close()

    return call


def _drive(coro: Any) -> Any:
    """A coroutine that never suspends (a lookup with nothing to wait for), run to its end."""
    try:
        coro.send(None)
    except StopIteration as e:
        return e.value
    coro.close()
    raise BenchError("store-instr: the lookup waited (a promotion?): not a pool hit")


if __name__ == "__main__":
    asyncio.set_event_loop(asyncio.new_event_loop())
    work(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
