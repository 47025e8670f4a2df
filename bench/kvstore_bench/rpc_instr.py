"""rpc-instr: instructions the daemon and the echo server spend on one Lookup over gRPC.

The `rpc` benchmark's setup (its namespace, 64-page prompt, packed request and the echo
server answering the daemon's real reply), each server run under
`valgrind --tool=callgrind --instr-atstart=no` (Debian's `valgrind`): instrumentation is
switched on (`callgrind_control -i on`) for `--calls` Lookups at `--concurrency` only, after
a warm-up, so start-up does not count; all the server's threads are counted. A count does
not move with the machine's load, unlike the CPU time `rpc` measures, which on a shared
machine is noise.

The daemon's scrubber, checksums and zeroing are off unless `--integrity`: they run per
50 ms tick, and valgrind's slowness (~50x) multiplies the ticks a call (~150 k instructions
a call counted with them on, ~3 k in real time). `ratio` = echo ÷ kvstore instructions.

    kvstore-bench rpc-instr --json                 # 300 calls at c=16, kvstore and echo
    kvstore-bench rpc-instr --sides kvstore --calls 600
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import uvloop
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb
from kvstore_proto.kvstore.v1 import kvstore_pb2_grpc as pb_grpc

from . import rpc
from .harness import BenchDaemon, BenchError, ChildServer, emit, progress

SIDES = ("kvstore", "echo")
WARMUP_CALLS = 100
NO_INTEGRITY = {"scrub_bytes_per_s": 0, "page_checksums": False, "zero_freed_pages": False}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--sides", default="kvstore,echo", help=f"comma separated, of {', '.join(SIDES)}")
    p.add_argument("--calls", type=int, default=300, help="Lookups counted (default 300)")
    p.add_argument("--concurrency", type=int, default=16, help="calls in flight (default 16)")
    p.add_argument("--integrity", action="store_true", help="leave the scrubber, checksums and zeroing on")


def run(args: argparse.Namespace) -> int:
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not sides or set(sides) - set(SIDES) or args.calls < 1 or args.concurrency < 1:
        raise SystemExit(f"rpc-instr: --sides of {', '.join(SIDES)}; --calls and --concurrency >= 1")
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise BenchError("rpc-instr needs valgrind (Debian: apt-get install valgrind)")
    tokens = random.Random(0).choices(range(rpc.VOCAB), k=rpc.PROMPT_PAGES * rpc.PAGE_TOKENS)
    server = {"lease_ttl_max_s": rpc.LEASE_S} | ({} if args.integrity else NO_INTEGRITY)
    out: dict[str, Any] = {"calls": args.calls, "concurrency": args.concurrency, "integrity": args.integrity}
    with tempfile.TemporaryDirectory(prefix="kvsb-instr-") as tmp:
        with BenchDaemon([rpc.namespace()], server) as plain:  # the echo server's reply, captured
            reply = rpc.prepare(plain.target, tokens)
        reply_file = Path(tmp) / "reply.bin"
        reply_file.write_bytes(reply)
        for side in sides:
            dump = Path(tmp) / f"{side}.callgrind"
            if side == "kvstore":
                child: ChildServer = BenchDaemon([rpc.namespace()], server)
            else:
                argv = [sys.executable, "-m", "kvstore_bench.echo_server", "--socket", "{socket}"]
                child = ChildServer("echo", [*argv, "--reply", str(reply_file)])
            child.argv = [*valgrind(dump), *child.argv]
            with _env(OPENBLAS_NUM_THREADS="1", PYTHONHASHSEED="0"), child:
                if side == "kvstore":
                    rpc.prepare(child.target, tokens)
                uvloop.run(_count(child, tokens, side == "kvstore", args.calls, args.concurrency, dump))
                total = dump_totals(dump)
            out[f"{side}_instructions_per_call"] = total // args.calls
            progress("rpc-instr: %s: %s instructions a Lookup", side, f"{total // args.calls:,}")
    if "kvstore_instructions_per_call" in out and "echo_instructions_per_call" in out:
        out["ratio"] = round(out["echo_instructions_per_call"] / out["kvstore_instructions_per_call"], 4)
    emit(out, args.json, "\n".join(f"{k}: {v}" for k, v in out.items()))
    return 0


def valgrind(dump: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={dump}"]


def dump_totals(dump: Path) -> int:
    """Instructions in the dumps `callgrind_control -d` wrote (`<dump>.1`, ...): counted
    while instrumentation was on; the file written at exit (`<dump>`) is not one of them."""
    total = 0
    for path in dump.parent.glob(f"{dump.name}.*"):
        total += parse_totals(path.read_text(errors="replace"))
    return total


def parse_totals(text: str) -> int:
    found = re.search(r"^totals:\s+(\d+)", text, re.MULTILINE)
    if found is None:
        raise BenchError("rpc-instr: a callgrind dump without a totals line")
    return int(found.group(1))


async def _count(
    server: ChildServer, tokens: list[int], session: bool, calls: int, conc: int, dump: Path
) -> None:
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        sid = 0
        if session:
            opened = await stub.OpenSession(
                pb.OpenSessionRequest(client_name="bench-rpc-instr", lease_ttl_ms=rpc.LEASE_S * 1000)
            )
            sid = opened.session_id
        packed = np.asarray(tokens, dtype="<u4").tobytes()
        request = pb.LookupRequest(session_id=sid, namespace=rpc.NAMESPACE, token_ids_u32=packed)
        for _ in range(WARMUP_CALLS):
            await stub.Lookup(request, timeout=120)
        left = calls

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                reply = await stub.Lookup(request, timeout=120)
                if reply.hit_tokens != len(tokens):
                    raise BenchError(f"lookup hit {reply.hit_tokens} tokens, expected {len(tokens)}")

        _control("-i", "on", server.pid)
        await asyncio.gather(*(worker() for _ in range(conc)))
        _control("-i", "off", server.pid)
        _control("-d", server.pid)


def _control(*args: object) -> None:
    done = subprocess.run(["callgrind_control", *map(str, args)], capture_output=True, text=True, timeout=300)
    if done.returncode:
        raise BenchError(f"callgrind_control {' '.join(map(str, args))} failed: {done.stderr[-500:]}")


class _env:
    """Environment variables set for the children started inside."""

    def __init__(self, **values: str) -> None:
        self.values = values
        self.saved: dict[str, str | None] = {}

    def __enter__(self) -> None:
        for k, v in self.values.items():
            self.saved[k] = os.environ.get(k)
            os.environ[k] = v

    def __exit__(self, *exc: object) -> None:
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
