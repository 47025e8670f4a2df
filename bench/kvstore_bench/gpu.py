"""`kvstore-bench gpu`: the GPU pool against the copies it must come close to, one run.

Needs CuPy and torch with CUDA (tools/gpu_check.py runs it on the GPU machine; docs/gpu.md).
All rates are bytes moved per second (a copy of n bytes counts n), each the median of
`--repeat` timed passes after a warm-up, every ratio against a baseline of the same bytes
measured in this run:
- `d2d_gbs`: torch `copy_` between two device tensors of `--mib` MiB, the ceiling for IPC;
- `pinned_*`, `pageable_*`: host<->device `copy_` of the same bytes, the tiers' ceiling;
- IPC: the daemon's pool class (CudaPool: one cudaMalloc, its IPC handle) in this process; a
  second process opens the handle with the client's mapping (`ipc_open_ms`), writes the bytes
  through it and reads them back, and measures its own d2d: `ipc_vs_d2d` = min(write, read) /
  its d2d (goal >= 0.9). This process then checks it sees the writer's last bytes (`ipc_visible`);
- `offload_vs_pinned` / `promote_vs_pinned`: the daemon's staging path in its batch forms
  (`CudaPool.copy_out_many`, `landed_many`: async copies on the pool's stream through its
  pinned arena), pages of `--page-bytes`, over pinned D2H / H2D (goal >= 0.8);
- `gather_vs_d2d`, `scatter_vs_d2d` (goal >= 0.7) and the other kernel keys: the page
  gather/scatter kernels, `gpu_kernels.measure` (its docstring says what each key is);
- `ttft_speedup_2k`, `exact`: SmolLM2's time to first token with a 2k-token prefix cached by
  another process and served from the GPU pool, over recompute, first tokens equal
  (bench/kvstore_bench/gpu_ttft.py; null, with why, without the model: KVSTORE_SMOLLM2_GGUF).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from . import gpu_kernels, gpu_ttft
from .gpu_timing import timed, wall
from .harness import BenchError, emit, machine_info, now_iso, progress


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--mib", type=int, default=256, help="MiB moved by each timed copy (default 256)")
    p.add_argument(
        "--page-bytes", type=int, default=737_280, help="page size of the staging path (default: SmolLM2)"
    )
    p.add_argument("--repeat", type=int, default=10, help="timed passes, median taken (default 10)")
    p.add_argument("--device", default="cuda:0", help="pool device, as a namespace names it (default cuda:0)")
    p.add_argument("--ttft-repeat", type=int, default=5, help="timed TTFT runs, median taken (default 5)")


def copies(torch: Any, n: int, repeat: int) -> dict[str, float]:
    dev_a, dev_b = (
        torch.empty(n, dtype=torch.uint8, device="cuda"),
        torch.empty(n, dtype=torch.uint8, device="cuda"),
    )
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(n, dtype=torch.uint8)
    gbs = {}
    for name, dst, src in (
        ("d2d", dev_b, dev_a),
        ("pinned_h2d", dev_a, pinned),
        ("pinned_d2h", pinned, dev_a),
        ("pageable_h2d", dev_a, pageable),
        ("pageable_d2h", pageable, dev_a),
    ):
        gbs[f"{name}_gbs"] = (
            n / timed(torch, lambda d=dst, s=src: d.copy_(s, non_blocking=True), repeat) / 1e9
        )
    return gbs


def ipc(device: str, n: int, repeat: int) -> dict[str, Any]:
    """The pool in this process, the mapping in another: open time, write/read vs d2d."""
    from kvstore.memory.cuda_pool import CudaPool

    pool = CudaPool.create(device, n)
    try:
        h = pool.handle
        job = {
            "device": h.device,
            "ipc_handle": h.ipc_handle.hex(),
            "alloc_nbytes": h.alloc_nbytes,
            "repeat": repeat,
        }
        out = subprocess.run(
            [sys.executable, "-c", "from kvstore_bench.gpu import ipc_child; ipc_child()"],
            input=json.dumps(job),
            capture_output=True,
            text=True,
            timeout=600,
            env=os.environ.copy(),
        )
        if out.returncode != 0:
            raise BenchError(f"the IPC process failed:\n{out.stderr}")
        got = json.loads(out.stdout)
        got["ipc_visible"] = (
            bytes(pool.copy_out(0, 4096)) == bytes([7]) * 4096
            and bytes(pool.copy_out(n - 4096, 4096)) == bytes([7]) * 4096
        )
    finally:
        pool.close()
    got["ipc_vs_d2d"] = min(got["ipc_write_gbs"], got["ipc_read_gbs"]) / got["child_d2d_gbs"]
    return got


def ipc_child() -> None:
    """The other process: open the handle as a client does, write and read through it."""
    import torch
    from kvstore_client._cuda_pool import CudaMapping
    from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

    job = json.loads(sys.stdin.read())
    n, repeat = job["alloc_nbytes"], job["repeat"]
    d = pb.PoolDescriptor(
        device=job["device"],
        handle_type=pb.CUDA_IPC,
        ipc_handle=bytes.fromhex(job["ipc_handle"]),
        nbytes=n,
        alloc_nbytes=n,
        num_pages=1,
        page_bytes=n,
        page_stride=n,
        page_shape=[n],
        dtype=pb.UINT8,
        sync_mode=pb.SYNC_BEFORE_COMMIT,
    )
    t0 = time.perf_counter()
    mapping = CudaMapping.open(d)
    view = mapping.raw_page(0)
    open_ms = (time.perf_counter() - t0) * 1000
    src = torch.full((n,), 7, dtype=torch.uint8, device=view.device)
    dst = torch.empty(n, dtype=torch.uint8, device=view.device)
    out = {
        "ipc_open_ms": open_ms,
        "ipc_write_gbs": n / timed(torch, lambda: view.copy_(src), repeat) / 1e9,
        "ipc_read_gbs": n / timed(torch, lambda: dst.copy_(view), repeat) / 1e9,
        "child_d2d_gbs": n / timed(torch, lambda: dst.copy_(src), repeat) / 1e9,
    }
    view.copy_(src)  # the owner checks it sees these bytes
    mapping.close()  # (synchronizes first; nothing touches `view` after)
    print(json.dumps(out))


def staging(device: str, n: int, page_bytes: int, repeat: int) -> dict[str, Any]:
    """The daemon's tier copies over `n` bytes of pages, through its own pool class and its
    default staging arena (kvstore/memory/staging.py): offload is one `copy_out_many` of
    every page (the chunks through the pinned ring, each view read as a tier would); promote
    is `landed_many` of pages staged in the arena's pinned slots, as many a batch as it has
    slots (what a stream of promotions gets), timed without the tier's fill of the slots."""
    from kvstore.memory.cuda_pool import CudaPool

    pages = max(1, n // page_bytes)
    pool = CudaPool.create(device, pages * page_bytes)
    try:
        offsets = [i * page_bytes for i in range(pages)]

        def offload() -> None:
            for view in pool.copy_out_many(offsets, page_bytes):
                view[0]  # (the caller has the page: a tier copies it from here)

        pool.copy_in(0, page_bytes)  # (the first fixes the slot size)
        pool.dropped(0)
        batch = max(1, pool.free_slots)
        batches = [offsets[i : i + batch] for i in range(0, pages, batch)]

        def promote() -> float:
            took = 0.0
            for group in batches:
                for o in group:
                    pool.copy_in(o, page_bytes)[:8] = o.to_bytes(8, "little")
                t0 = time.perf_counter()
                pool.landed_many(group)
                took += time.perf_counter() - t0
            return took

        off = wall(offload, repeat)
        promote()
        promote_s = statistics.median(promote() for _ in range(repeat))
        if pool.staged_unpinned:
            raise BenchError(f"promote: {pool.staged_unpinned} pages staged outside the pinned arena")
        return {
            "offload_gbs": pages * page_bytes / off / 1e9,
            "promote_gbs": pages * page_bytes / promote_s / 1e9,
            "staging_pages": pages,
            "promote_batch_pages": batch,
        }
    finally:
        pool.close()


def run(args: argparse.Namespace) -> int:
    try:
        import torch

        if not torch.cuda.is_available():
            raise BenchError("torch sees no CUDA device")
        import cupy  # noqa: F401  (the pool's allocator)
    except ImportError as e:
        raise BenchError(f"needs torch with CUDA and CuPy: {e}") from e
    n = args.mib << 20
    progress("gpu: %s, %d MiB a copy", torch.cuda.get_device_name(), args.mib)
    result: dict[str, Any] = {"benchmark": "gpu", "when": now_iso(), "gpu": torch.cuda.get_device_name()}
    result |= copies(torch, n, args.repeat)
    progress("gpu: d2d %.0f GB/s, pinned h2d %.1f GB/s", result["d2d_gbs"], result["pinned_h2d_gbs"])
    result |= ipc(args.device, n, args.repeat)
    result |= staging(args.device, n, args.page_bytes, max(3, args.repeat // 3))
    result["offload_vs_pinned"] = result["offload_gbs"] / result["pinned_d2h_gbs"]
    result["promote_vs_pinned"] = result["promote_gbs"] / result["pinned_h2d_gbs"]
    kernels = gpu_kernels.measure(torch, args.repeat, mib=max(64, args.mib))
    progress("gpu: gather %s x d2d, scatter %s x d2d", kernels["gather_vs_d2d"], kernels["scatter_vs_d2d"])
    not_measured = kernels.pop("not_measured")
    result |= kernels
    ttft, why_not = gpu_ttft.measure_or_why(args.device, args.ttft_repeat)
    result |= ttft
    result["not_measured"] = not_measured | ({"ttft_speedup_2k": why_not} if why_not else {})
    result["goals"] = {
        "ipc_vs_d2d": 0.9,
        "offload_vs_pinned": 0.8,
        "promote_vs_pinned": 0.8,
        "gather_vs_d2d": 0.7,
        "scatter_vs_d2d": 0.7,
    }
    result["machine"] = machine_info(torch=torch.__version__, cupy=__import__("cupy").__version__)
    text = "\n".join(f"{k:22} {v:.3f}" if isinstance(v, float) else f"{k:22} {v}" for k, v in result.items())
    emit(result, args.json, text)
    return 0
