"""`kvstore-bench pageio`: how fast a client moves KV through its mapping of the pool.

A client maps a namespace's pool (a memfd, DRAM-resident: 512 MiB, far above the last
level cache), allocates a sequence of N pages, and times, per page as an engine would:

- write: `view.copy_(src[i])` from a preallocated plain tensor into each WRITABLE page view;
- read:  `dst[i].copy_(view)` from each page view into a preallocated plain tensor.

Baseline, same process, same run, same code: the same per-page copies with the pool pages
replaced by a plain (anonymous, non-shm) tensor of N pages (`raw_chunked`), and one big
`copy_` of all N pages each way (`raw_single`). Informational: the whole-pool view with one
`index_copy_`/`index_select` (`pool_batched`), what a gather/scatter kernel would do.

ratio = pool (write+read) GB/s / raw_chunked (write+read) GB/s; goal >= 0.95.
torch runs with 1 thread on both sides. GB = 1e9 bytes copied (not counting the read of
the source separately). Every variant is timed once per repeat, interleaved, after a warmup;
results are medians over the repeats, with min and max.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import kvstore_client
import torch

from .harness import (
    BenchDaemon,
    BenchError,
    emit,
    machine_info,
    median,
    now_iso,
    progress,
    self_cpu_seconds,
    system_busy_seconds,
)

GOAL = 0.95
NAMESPACE = "pageio"
# 8 layers x 2 (K,V) x 16 tokens x 8 KV heads x 128 dims x 2 bytes = 512 KiB a page, a
# Llama-3-8B-like head geometry with fewer layers.
GEOMETRY = {"num_layers": 8, "num_kv_heads": 8, "head_dim": 128, "dtype": "float16", "page_tokens": 16}
POOL_PAGES = 1024  # 512 MiB: DRAM-resident (L3 here is 32 MiB)
BUSY = 0.2  # CPUs used by other processes above which results are flagged


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--pages", type=int, default=256, help="pages in the sequence (default 256 = 128 MiB)")
    p.add_argument("--repeat", type=int, default=15, help="timed repeats; medians are reported (default 15)")
    p.add_argument("--warmup", type=int, default=3, help="untimed repeats first (default 3)")


def run(args: argparse.Namespace) -> int:
    if args.pages < 1 or args.repeat < 1 or args.warmup < 0:
        raise SystemExit("pageio: --pages and --repeat must be >= 1, --warmup >= 0")
    pool_pages = max(POOL_PAGES, args.pages)
    torch.set_num_threads(1)
    ns = {"name": NAMESPACE, **GEOMETRY, "num_pages": pool_pages}
    with BenchDaemon([ns], server={"max_pool_bytes": "64GiB"}) as daemon:
        result = measure(daemon, args.pages, args.repeat, args.warmup)
    result["machine"] = machine_info(
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        torch_threads_note="torch.set_num_threads(1) for pool and baseline alike",
    )
    emit(result, args.json, format_text(result))
    return 0


def measure(daemon: BenchDaemon, n: int, repeat: int, warmup: int) -> dict[str, Any]:
    with kvstore_client.connect(daemon.target, client_name="bench-pageio") as kv:
        ns = kv.namespace(NAMESPACE)
        progress(
            "mapping the pool (%d pages of %d KiB)", ns.info.pool.num_pages, ns.info.pool.page_bytes >> 10
        )
        pool = ns.pool  # maps (and prefaults) the whole pool
        page_shape, dtype = ns.page_shape, ns.dtype
        page_bytes = int(ns.info.pool.page_bytes)
        with kv.allocate(ns, max_tokens=n * ns.page_tokens) as seq:
            tokens = torch.randint(
                0, 32000, (n * ns.page_tokens,), generator=torch.Generator().manual_seed(0)
            )
            res = seq.append(tokens)
            writable = res.writable_pages
            if len(writable) != n:
                raise BenchError(f"expected {n} writable pages, the daemon gave {len(writable)}")
            views = seq.views(writable)
            slots = torch.tensor([p.slot for p in writable], dtype=torch.long)
            whole = pool.view()

            progress("allocating plain tensors: 3 x %d MiB", n * page_bytes >> 20)
            src = torch.randn((n, *page_shape), dtype=torch.float32).to(dtype)
            dst = torch.zeros_like(src)
            plain = torch.zeros_like(src)  # the "pool" of the baseline: anonymous memory
            plain_pages = list(plain.unbind(0))
            src_pages, dst_pages = list(src.unbind(0)), list(dst.unbind(0))

            def per_page(to: list[torch.Tensor], frm: list[torch.Tensor]) -> Callable[[], None]:
                def go() -> None:
                    for t, f in zip(to, frm, strict=True):
                        t.copy_(f)

                return go

            variants: dict[str, Callable[[], None]] = {
                "pool_write": per_page(views, src_pages),
                "pool_read": per_page(dst_pages, views),
                "raw_chunked_write": per_page(plain_pages, src_pages),
                "raw_chunked_read": per_page(dst_pages, plain_pages),
                "raw_single_write": lambda: plain.copy_(src),
                "raw_single_read": lambda: dst.copy_(plain),
                "pool_batched_write": lambda: whole.index_copy_(0, slots, src),
                "pool_batched_read": lambda: torch.index_select(whole, 0, slots, out=dst),
            }
            times: dict[str, list[float]] = {k: [] for k in variants}
            progress("warmup: %d rounds; then %d timed rounds of %d variants", warmup, repeat, len(variants))
            cpu0 = (time.perf_counter(), system_busy_seconds(), self_cpu_seconds(), daemon.cpu_seconds())
            for r in range(warmup + repeat):
                # Rotate the order every round, so no variant always follows the same one.
                names = list(variants)
                k = r % len(names)
                for name in names[k:] + names[:k]:
                    t0 = time.perf_counter()
                    variants[name]()
                    elapsed = time.perf_counter() - t0
                    if r >= warmup:
                        times[name].append(elapsed)
            wall, busy, mine, theirs = (
                b - a
                for a, b in zip(
                    cpu0,
                    (time.perf_counter(), system_busy_seconds(), self_cpu_seconds(), daemon.cpu_seconds()),
                    strict=True,
                )
            )
            # CPU that other processes took meanwhile: memory bandwidth and caches are shared.
            others = max(0.0, busy - mine - theirs) / wall
            # The per-page write/read really moved the bytes through the pool.
            per_page(views, src_pages)()
            dst.zero_()
            per_page(dst_pages, views)()
            if not torch.equal(dst, src):
                raise BenchError("what was read back from the pool differs from what was written")
            seq.commit()
    result = summarize(
        times, n, page_bytes, tuple(page_shape), str(dtype), int(ns.info.pool.num_pages), repeat, warmup
    )
    result["others_cpu_util"] = round(others, 3)
    return result


def summarize(
    times: dict[str, list[float]],
    n: int,
    page_bytes: int,
    page_shape: tuple[int, ...],
    dtype: str,
    pool_pages: int,
    repeat: int,
    warmup: int,
) -> dict[str, Any]:
    nbytes = n * page_bytes

    def gbps(t: float, mult: int = 1) -> float:
        return round(mult * nbytes / t / 1e9, 3)

    results: dict[str, Any] = {}
    for name, ts in times.items():
        results[name] = {
            "gbps": gbps(median(ts)),
            "min_gbps": gbps(max(ts)),
            "max_gbps": gbps(min(ts)),
            "median_ms": round(median(ts) * 1e3, 3),
        }
    # write+read: the sum of the two medians moves 2 x nbytes.
    for side in ("pool", "raw_chunked", "raw_single", "pool_batched"):
        w, r = times[f"{side}_write"], times[f"{side}_read"]
        pairs = sorted(a + b for a, b in zip(w, r, strict=True))
        results[side] = {
            "gbps": gbps(median(w) + median(r), 2),
            "min_gbps": gbps(pairs[-1], 2),
            "max_gbps": gbps(pairs[0], 2),
        }
    ratio = results["pool"]["gbps"] / results["raw_chunked"]["gbps"]
    # Spread of the ratio: per round (each round times both sides back to back).
    per_round = sorted(
        (b1 + b2) / (a1 + a2)
        for a1, a2, b1, b2 in zip(
            times["pool_write"],
            times["pool_read"],
            times["raw_chunked_write"],
            times["raw_chunked_read"],
            strict=True,
        )
    )
    return {
        "benchmark": "pageio",
        "when": now_iso(),
        "config": {
            "pages": n,
            "page_bytes": page_bytes,
            "page_shape": list(page_shape),
            "dtype": dtype.removeprefix("torch."),
            "bytes_per_direction": nbytes,
            "pool_pages": pool_pages,
            "pool_bytes": pool_pages * page_bytes,
            "repeat": repeat,
            "warmup": warmup,
            "chunking": "one copy_ per page",
        },
        "results": results,
        "ratio": round(ratio, 4),
        "ratio_rounds": {
            "min": round(per_round[0], 4),
            "median": round(median(per_round), 4),
            "max": round(per_round[-1], 4),
        },
        "goal": GOAL,
        "goal_met": ratio >= GOAL,
        "ratio_definition": "pool (write+read) GB/s / raw_chunked (write+read) GB/s, same run, same chunking",
    }


def format_text(r: dict[str, Any]) -> str:
    c, m, res = r["config"], r["machine"], r["results"]
    lines = [
        "pageio: copy KV through the client's mapping of the pool vs plain memory",
        f"  machine: {m['cpu_count']} cpus, {m['cpu_model']}, torch {m['torch']}, "
        f"torch threads {m['torch_threads']} (set to 1 for both sides)",
        f"  {c['pages']} pages x {c['page_bytes'] >> 10} KiB ({c['bytes_per_direction'] / 2**20:.0f} MiB each way), "
        f"page shape {c['page_shape']} {c['dtype']}, pool {c['pool_bytes'] / 2**20:.0f} MiB, "
        f"median of {c['repeat']} after {c['warmup']} warmup",
        "",
        f"  {'variant':<22}{'GB/s':>9}{'min':>9}{'max':>9}",
    ]
    for name in (
        "pool_write",
        "pool_read",
        "pool",
        "raw_chunked_write",
        "raw_chunked_read",
        "raw_chunked",
        "raw_single_write",
        "raw_single_read",
        "raw_single",
        "pool_batched_write",
        "pool_batched_read",
        "pool_batched",
    ):
        v = res[name]
        label = name if name.endswith(("_write", "_read")) else f"{name} (w+r)"
        lines.append(f"  {label:<22}{v['gbps']:>9.2f}{v['min_gbps']:>9.2f}{v['max_gbps']:>9.2f}")
    rr = r["ratio_rounds"]
    lines += [
        "",
        f"  ratio = pool / raw_chunked = {r['ratio']:.3f} (per round: min {rr['min']:.3f}, "
        f"median {rr['median']:.3f}, max {rr['max']:.3f}); goal >= {r['goal']}: "
        + ("met" if r["goal_met"] else "MISSED"),
    ]
    if r["others_cpu_util"] > BUSY:
        lines.append(
            f"  warning: other processes used {r['others_cpu_util']:.2f} CPUs meanwhile; "
            "memory bandwidth was shared, numbers are less reliable"
        )
    return "\n".join(lines)
