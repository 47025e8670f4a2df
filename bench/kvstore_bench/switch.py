"""`kvstore-bench switch`: one daemon, one module attribute switched between two values under a
steady gRPC Lookup load, the daemon's CPU a call for each value.

Two daemons measured one after another on a shared 2-core VM differ by more (±10 µs of a
~300 µs call between 2 s windows) than most single changes to the Lookup path move. So this
runs the `rpc` benchmark's daemon and Lookup (its namespace, its 64-page prompt, packed ids,
a session) with `--concurrency` calls always in flight, and every `--window` seconds sets
`MODULE.ATTR` in the daemon to the other of `--values` (a `sitecustomize` the daemon starts
with, written to its temp dir: SIGUSR1 switches, SIGUSR2 sets the first; the daemon writes the
value it now has to a file, read back before each window counts; an attribute it cannot set
is an error). Each window counts the
calls finished and the CPU the daemon's threads used (/proc schedstat): all of them, and its
main thread (the asyncio loop, grpc.aio's Python side and the handlers). Windows alternate,
so a slow spell of the VM falls on both values alike. `--values V,V` (the same twice) shows
the tool's own spread.

    kvstore-bench switch --attr kvstore.store.live_mrc:PENDING_ADDS --values 1,32 --json
    kvstore-bench switch --attr kvstore.store.live_mrc:PENDING_ADDS --values 32,32 --seconds 20

Only a module attribute read at each call can be switched this way (a constant the code reads
through its module, a function looked up at call time). Reported for each value: `daemon_us`
and `loop_us` (CPU a call over all its windows), `daemon_us_median_window`, `calls`,
`windows`; `daemon_us_diff` = the second value's daemon_us minus the first's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import uvloop
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb
from kvstore_proto.kvstore.v1 import kvstore_pb2_grpc as pb_grpc

from . import rpc
from .harness import BenchDaemon, BenchError, _setting, emit, progress
from .idle import threads_cpu

SETTLE_S = 0.03  # after a switch, before the window counts: calls under way finish
SITE = """\
# Written by kvstore-bench switch for its daemon only: SIGUSR1 switches MODULE.ATTR to the
# other value, SIGUSR2 sets the first; the value set is written to STATUS.
import importlib, json, os, signal

_module, _attr = os.environ["KVBENCH_SWITCH_ATTR"].rsplit(":", 1)
_values = json.loads(os.environ["KVBENCH_SWITCH_VALUES"])
_status = os.environ["KVBENCH_SWITCH_STATUS"]
_now = [0]


def _set(i):
    _now[0] = i
    try:  # (an exception here would surface in whatever the daemon was running)
        setattr(importlib.import_module(_module), _attr, _values[i])
        said = {"value": _values[i]}
    except Exception as e:
        said = {"error": f"{type(e).__name__}: {e}"}
    with open(_status + ".tmp", "w") as f:
        f.write(json.dumps(said))
    os.replace(_status + ".tmp", _status)


signal.signal(signal.SIGUSR1, lambda *_: _set(1 - _now[0]))
signal.signal(signal.SIGUSR2, lambda *_: _set(0))
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument(
        "--attr", required=True, help="MODULE:ATTR in the daemon, e.g. kvstore.store.live_mrc:PENDING_ADDS"
    )
    p.add_argument(
        "--values", required=True, help="two values, comma separated (numbers, true/false, else strings)"
    )
    p.add_argument("--seconds", type=float, default=30.0, help="measured time, both values (default 30)")
    p.add_argument("--window", type=float, default=0.2, help="seconds a window (default 0.2)")
    p.add_argument("--concurrency", type=int, default=16, help="calls in flight (default 16)")


def run(args: argparse.Namespace) -> int:
    module, sep, attr = args.attr.rpartition(":")
    values = [_setting(v.strip()) for v in args.values.split(",")]
    if not sep or not module or not attr.isidentifier() or len(values) != 2:
        raise SystemExit("switch: --attr MODULE:ATTR and --values A,B (two values)")
    if args.seconds <= 0 or args.window <= 0 or args.concurrency < 1:
        raise SystemExit("switch: --seconds, --window > 0 and --concurrency >= 1")
    tokens = random.Random(0).choices(range(rpc.VOCAB), k=rpc.PROMPT_PAGES * rpc.PAGE_TOKENS)
    daemon = BenchDaemon([rpc.namespace()], {"lease_ttl_max_s": rpc.LEASE_S})
    site = daemon.dir / "switch_site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE)
    status = daemon.dir / "switch_value"
    daemon.env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH", "")])),
        "KVBENCH_SWITCH_ATTR": args.attr,
        "KVBENCH_SWITCH_VALUES": json.dumps(values),
        "KVBENCH_SWITCH_STATUS": str(status),
    }
    with daemon:
        rpc.prepare(daemon.target, tokens)
        out = uvloop.run(_measure(daemon, status, values, tokens, args))
    emit(out, args.json, _text(out))
    return 0


async def _measure(
    daemon: BenchDaemon, status: Path, values: list[Any], tokens: list[int], args: argparse.Namespace
) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        opened = await stub.OpenSession(
            pb.OpenSessionRequest(client_name="bench-switch", lease_ttl_ms=rpc.LEASE_S * 1000)
        )
        packed = np.asarray(tokens, dtype="<u4").tobytes()
        request = pb.LookupRequest(
            session_id=opened.session_id, namespace=rpc.NAMESPACE, token_ids_u32=packed
        )
        done = [0]
        stop = asyncio.Event()

        async def caller() -> None:
            while not stop.is_set():
                reply = await stub.Lookup(request, timeout=30)
                if reply.hit_tokens != len(tokens):
                    raise BenchError(
                        f"switch: a lookup hit {reply.hit_tokens} tokens, expected {len(tokens)}"
                    )
                done[0] += 1

        callers = [asyncio.ensure_future(caller()) for _ in range(args.concurrency)]
        try:
            await asyncio.sleep(1.0)  # warm-up
            windows = await _windows(daemon.pid, status, values, done, args)
        finally:
            stop.set()
            await asyncio.gather(*callers)
    out: dict[str, Any] = {
        "benchmark": "switch",
        "attr": args.attr,
        "values": values,
        "seconds": args.seconds,
        "window_s": args.window,
        "concurrency": args.concurrency,
        "by_value": [],
    }
    for i, value in enumerate(values):
        w = windows[i]
        calls = sum(n for n, _, _ in w)
        if not calls:
            raise BenchError(f"switch: no call finished in the windows of value {value!r}")
        out["by_value"].append(
            {
                "value": value,
                "windows": len(w),
                "calls": calls,
                "daemon_us": round(sum(a for _, a, _ in w) / calls / 1e3, 2),
                "loop_us": round(sum(lp for _, _, lp in w) / calls / 1e3, 2),
                "daemon_us_median_window": round(statistics.median(a / n / 1e3 for n, a, _ in w if n), 2),
            }
        )
    out["daemon_us_diff"] = round(out["by_value"][1]["daemon_us"] - out["by_value"][0]["daemon_us"], 2)
    return out


async def _windows(
    pid: int, status: Path, values: list[Any], done: list[int], args: argparse.Namespace
) -> list[list[tuple[int, int, int]]]:
    """(calls, daemon CPU ns, main thread CPU ns) of each window, by value index."""
    windows: list[list[tuple[int, int, int]]] = [[], []]
    now = 0
    os.kill(pid, signal.SIGUSR2)  # the first value
    t_end = time.monotonic() + args.seconds
    last_report = time.monotonic()
    while time.monotonic() < t_end:
        await asyncio.sleep(SETTLE_S)
        await _confirm(status, values[now])
        c0, t0 = done[0], threads_cpu(pid)
        await asyncio.sleep(args.window)
        c1, t1 = done[0], threads_cpu(pid)
        windows[now].append(
            (
                c1 - c0,
                sum(v - t0.get(k, 0) for k, v in t1.items()),
                t1.get(str(pid), 0) - t0.get(str(pid), 0),
            )
        )
        os.kill(pid, signal.SIGUSR1)
        now = 1 - now
        if time.monotonic() - last_report > 5:
            last_report = time.monotonic()
            progress(
                "switch: %d windows, %.0f s left", sum(map(len, windows)), max(0.0, t_end - time.monotonic())
            )
    return windows


async def _confirm(status: Path, value: Any, timeout: float = 2.0) -> None:
    """Wait until the daemon says it has `value` (its signal handler runs between bytecodes)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            said = json.loads(status.read_text())
        except (OSError, ValueError):
            said = {}
        if "error" in said:
            raise BenchError(f"switch: the daemon could not set the attribute: {said['error']}")
        if "value" in said and said["value"] == value:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"switch: the daemon did not take the value {value!r} in {timeout} s")
        await asyncio.sleep(0.002)


def _text(out: dict[str, Any]) -> str:
    lines = [
        f"{out['attr']}, {out['concurrency']} Lookups in flight, {out['window_s']} s windows alternating:"
    ]
    for v in out["by_value"]:
        lines.append(
            f"  = {v['value']!r}: daemon {v['daemon_us']} us a call (median window "
            f"{v['daemon_us_median_window']}), its loop thread {v['loop_us']}, {v['calls']} calls in {v['windows']} windows"
        )
    lines.append(f"  second - first: {out['daemon_us_diff']} us of daemon CPU a call")
    return "\n".join(lines)
