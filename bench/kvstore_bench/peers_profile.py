"""peers-profile: where a put and a get of k pages spend their time beyond the bytes copied.

The kvstore side of `kvstore-bench peers` (same pages, same client calls), one request at a
time, split per side: wall ms a request; the client's copies (wall time inside
`_copy.copy_in` / `copy_out`, bands copied on other threads included); the client's
main-thread CPU outside the copies (the library's Python, protobuf, gRPC's send and receive); the daemon's CPU (all its threads, and its main thread, which runs
the servicers and the store: /proc schedstat, ns); and what is left (waiting: the round trip's scheduling and transport). memcpy of
the same k pages is the baseline. `--cprofile DIR` also runs the daemon under cProfile and the
client's timed loop under another and prints both top lists (slower: compare only runs of the
same mode)."""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import time
from pathlib import Path
from typing import Any

import kvstore_client
import torch
from kvstore_client import _copy

from . import peers_kvstore as kvside
from .harness import BenchDaemon, BenchError, emit, progress, server_settings
from .peers_worker import page_bytes_of


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--pages", type=int, default=512, help="pages a pass (default 512)")
    p.add_argument(
        "--sizes",
        default=[16, 64],
        type=lambda s: [int(x) for x in s.split(",") if x.strip()],
        help="pages a request, comma separated (default 16,64)",
    )
    p.add_argument("--repeat", type=int, default=3, help="timed passes per size (default 3)")
    p.add_argument(
        "--pool-pages",
        type=int,
        default=0,
        help="the pool's pages (default: room for a pass, emptied after each); fewer than a pass: a "
        "full pool, every grant evicting (a cache's steady state): puts only, nothing emptied",
    )
    p.add_argument("--cprofile", type=Path, help="profile both sides into this directory, print the tops")
    p.add_argument(
        "--layers",
        type=int,
        default=30,
        help="layers of the page geometry (default 30: the peers' 737,280 B page; 1: 24,576 B, "
        "the daemon's work without the copies' cache misses)",
    )
    p.add_argument("--top", type=int, default=25, help="functions a cProfile top list shows (default 25)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a [server] config key of the daemon (repeatable), e.g. page_checksums=false",
    )


class CopyClock:
    """Seconds spent inside the client library's page copies (wraps `_copy`'s two functions):
    wall, and the calling thread's CPU (less than the wall when a copy is split over threads,
    which then copy the other bands while the caller waits for them)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.thread_seconds = 0.0
        self._orig = (_copy.copy_in, _copy.copy_out)

        def timed(f: Any) -> Any:
            def run(*a: Any, **kw: Any) -> Any:
                t, c = time.perf_counter(), time.thread_time()
                try:
                    return f(*a, **kw)
                finally:
                    self.seconds += time.perf_counter() - t
                    self.thread_seconds += time.thread_time() - c

            return run

        _copy.copy_in, _copy.copy_out = timed(self._orig[0]), timed(self._orig[1])

    def restore(self) -> None:
        _copy.copy_in, _copy.copy_out = self._orig


def daemon_cpu(pid: int) -> tuple[float, float]:
    """(all threads, main thread) CPU seconds of the daemon, ns-exact (/proc schedstat)."""
    total = main = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            ns = int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            continue  # (a thread that ended meanwhile)
        total += ns / 1e9
        if task.name == str(pid):
            main = ns / 1e9
    return total, main


def daemon_faults(pid: int) -> int:
    """The daemon's minor page faults so far (all threads: /proc stat, field 10)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def _pass(daemon: BenchDaemon, clock: CopyClock, fn: Any, items: list[Any]) -> dict[str, float]:
    d0, t0, w0 = daemon_cpu(daemon.pid), time.thread_time(), time.perf_counter()
    c0, ct0 = clock.seconds, clock.thread_seconds
    for item in items:
        fn(*item)
    w, t = time.perf_counter() - w0, time.thread_time() - t0
    d1 = daemon_cpu(daemon.pid)
    copy, dcpu, dmain = clock.seconds - c0, d1[0] - d0[0], d1[1] - d0[1]
    client = max(0.0, t - (clock.thread_seconds - ct0))  # the main thread's CPU outside the copies
    n = len(items)
    ms = 1000 / n
    return {
        "wall_ms": w * ms,
        "copy_ms": copy * ms,
        "client_cpu_ms": client * ms,
        "daemon_cpu_ms": dcpu * ms,
        "daemon_main_ms": dmain * ms,
        "wait_ms": max(0.0, w - copy - client - dcpu) * ms,
    }


def _median(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(sorted(r[k] for r in rows)[len(rows) // 2], 3) for k in rows[0]}


# The integrity counters the run ends with (docs/security.md, "The window before the check").
INTEGRITY = (
    "pages_checksummed",
    "pages_unchecked",
    "pages_zeroed",
    "pages_zeroed_inline",
    "replies_waited_zeroing",
    "pages_sums_given",
)


def _top(stats: pstats.Stats, n: int) -> str:
    out = io.StringIO()
    stats.stream = out
    stats.sort_stats("tottime").print_stats(n)
    return out.getvalue()


def run(args: argparse.Namespace) -> int:
    if args.pages < 1 or args.repeat < 1 or not args.sizes or min(args.sizes) < 1:
        raise SystemExit("peers-profile: --pages, --repeat and every --sizes must be >= 1")
    torch.set_num_threads(1)
    if args.layers < 1:
        raise SystemExit("peers-profile: --layers must be >= 1")
    spec = kvside.namespace_spec(args.pages, max(args.sizes)) | {"num_layers": args.layers}
    full = 0 < args.pool_pages < spec["num_pages"]  # (the pool cannot hold a pass: puts only)
    if full:
        if args.pool_pages < kvside.CREDIT_POOL_SHARE * max(args.sizes):
            raise SystemExit(
                f"peers-profile: --pool-pages must be >= {kvside.CREDIT_POOL_SHARE} x the largest "
                "--sizes (a credit is at most 1/8 of the pool)"
            )
        spec["num_pages"] = args.pool_pages
    page_bytes = kvside.PAGE_BYTES // 30 * args.layers
    src = torch.frombuffer(page_bytes_of(0, args.pages, page_bytes), dtype=torch.uint8).view(-1, page_bytes)
    dst = torch.zeros_like(src)
    server: dict[str, Any] = {"max_pool_bytes": "64GiB"} | server_settings(args.set, "peers-profile")
    daemon = BenchDaemon([spec], server=server)
    prof = None
    if args.cprofile:
        args.cprofile.mkdir(parents=True, exist_ok=True)
        dprof = args.cprofile.resolve() / "daemon.prof"
        daemon.argv[1:1] = ["-m", "cProfile", "-o", str(dprof)]
        prof = cProfile.Profile()
    rng = random.Random(0)
    result: dict[str, Any] = {
        "pages": args.pages,
        "pool_pages": spec["num_pages"],
        "page_bytes": page_bytes,
        "repeat": args.repeat,
        "sizes": {},
    }
    clock = CopyClock()
    try:
        with daemon, kvstore_client.connect(daemon.target, client_name="bench-peers-profile") as kv:
            ns = kv.namespace(kvside.NAMESPACE)
            assert ns.pool is not None  # (mapped before anything is timed)
            result["transport"] = "lane" if kv.lane else "grpc"  # (KVSTORE_LANE=0: gRPC, for an A/B)
            result["put_follow"] = kv.pipelines_puts  # (KVSTORE_PUT_FOLLOW=0: copy, then Put)
            start, faults = daemon_cpu(daemon.pid), daemon_faults(daemon.pid)

            def put_one(tokens: list[int], data: torch.Tensor) -> None:  # as kvstore's side of peers
                if kv.put(ns, tokens, data).written_pages != len(data):
                    raise BenchError("put: not every page written")

            def get_one(tokens: list[int], out: torch.Tensor) -> None:
                if kv.get(ns, tokens, out).pages != len(out):
                    raise BenchError("get: not every page hit")

            for k in args.sizes:
                spans = [(a, min(a + k, args.pages)) for a in range(0, args.pages, k)]
                rows: dict[str, list[dict[str, float]]] = {"put": [], "get": [], "memcpy": []}
                for rep in range(args.repeat + 1):  # the first pass warms up
                    prompts = [[rng.randrange(kvside.VOCAB) for _ in range((b - a) * 16)] for a, b in spans]
                    puts = [(t, src[a:b]) for t, (a, b) in zip(prompts, spans, strict=True)]
                    gets = [(t, dst[a:b]) for t, (a, b) in zip(prompts, spans, strict=True)]
                    copies = [(dst[a:b], src[a:b]) for a, b in spans]
                    if prof is not None and rep:
                        prof.enable()
                    put = _pass(daemon, clock, put_one, puts)
                    get = _pass(
                        daemon, clock, get_one, gets[-(args.pool_pages // 2) // k :] if full else gets
                    )
                    if prof is not None:
                        prof.disable()
                    mem = _pass(daemon, clock, torch.Tensor.copy_, copies)
                    if full:  # (the pool holds the last puts only: those are read back)
                        a = spans[-(args.pool_pages // 2) // k][0]
                        if not torch.equal(dst[a:], src[a:]):
                            raise BenchError(f"{k} pages a request: the bytes read back differ")
                    elif not torch.equal(dst, src):
                        raise BenchError(f"{k} pages a request: the bytes read back differ")
                    else:
                        kv.evict(kvside.NAMESPACE, all=True)
                    dst.zero_()
                    if rep:
                        rows["put"].append(put)
                        rows["get"].append(get)
                        rows["memcpy"].append(mem)
                    progress("%d pages: put %.2f ms, get %.2f ms", k, put["wall_ms"], get["wall_ms"])
                result["sizes"][str(k)] = {op: _median(r) for op, r in rows.items()}
            s = kv.stats(kvside.NAMESPACE).namespaces[0]  # (whole run, warm-up passes included)
            result["integrity"] = {f: getattr(s, f) for f in INTEGRITY}
            # The daemon's CPU over the same run (all threads; main thread): whatever pass the
            # integrity thread did its work in, A/B runs of the same passes differ by that work.
            end = daemon_cpu(daemon.pid)
            result["daemon_cpu_s"] = [round(end[0] - start[0], 4), round(end[1] - start[1], 4)]
            # (a first touch of a pool page in the daemon's mapping: 180 faults a 737,280 B page)
            result["daemon_minor_faults"] = daemon_faults(daemon.pid) - faults
    finally:
        clock.restore()
    text = _text(result)
    if prof is not None:
        client_stats = pstats.Stats(prof)
        client_stats.dump_stats(str(args.cprofile / "client.prof"))
        text += "\n--- client (cProfile, timed loop, by tottime)\n" + _top(client_stats, args.top)
        text += "\n--- daemon (cProfile, whole run, by tottime)\n" + _top(pstats.Stats(str(dprof)), args.top)
    emit(result, args.json, text)
    return 0


def _text(r: dict[str, Any]) -> str:
    keys = ("wall_ms", "copy_ms", "client_cpu_ms", "daemon_cpu_ms", "daemon_main_ms", "wait_ms")
    lines = [
        f"{r['pages']} pages of {r['page_bytes']} B a pass into a pool of {r.get('pool_pages', '?')}, "
        f"median of {r['repeat']} passes, ms a request, calls over {r.get('transport', '?')}, puts pipelined {r.get('put_follow', '?')}",
        "",
    ]
    lines.append(f"{'pages':>5} {'op':<7}" + "".join(f"{k:>15}" for k in keys))
    for k, ops in r["sizes"].items():
        for op, row in ops.items():
            lines.append(f"{k:>5} {op:<7}" + "".join(f"{row[c]:>15.3f}" for c in keys))
    if "integrity" in r:  # sealed pages evicted before the integrity thread reached them
        lines += ["", "integrity (whole run): " + ", ".join(f"{k} {v}" for k, v in r["integrity"].items())]
    if "daemon_cpu_s" in r:
        every, main = r["daemon_cpu_s"]
        lines.append(
            f"daemon CPU (whole run): {every:.3f} s, main thread {main:.3f} s; "
            f"{r['daemon_minor_faults']} minor page faults"
        )
    return "\n".join(lines) + "\n"
