"""`kvstore-bench tiers`: the disk tier's write-back, promotion and re-index against the file system.

Layer-level (kvstore.tiers.DiskTier in this process, no daemon), on the file system of
--dir (default: the temp dir), with N pages of --page-kib each (default 256 x 512 KiB =
128 MiB), every variant timed --repeat times, interleaved, medians reported:

- write-back: `put_async` of the records in batches of --batch, then `flush()` (commit +
  fsync), into a fresh environment. Baseline: the same bytes written to a fresh plain file
  page by page, then `os.fsync`. writeback_ratio = tier GB/s / file GB/s (goal >= 0.5).
- promotion: `read_into` of every page (one LMDB read transaction, copy into a preallocated
  buffer, checksum (XXH3-64) check of the copy) on 1 thread (and, informational, on 2 threads). Baseline: `readinto` of the same bytes
  from the plain file, page by page. Both warm-cache: dropping the page cache needs root,
  so both sides read from the page cache (this is the CPU cost of promotion, not the
  disk's). promotion_ratio = tier GB/s / file GB/s.
- re-index: --reindex-pages records (default 100,000) with 64-byte payloads (the re-index
  reads only the metadata database, so payload size does not change its time) are written,
  the environment is closed and reopened, and `reindex()` is timed to the last record:
  reindex_100k_s (goal < 10 s; scaled to 100k when --reindex-pages differs).

Store level (tiers_store.py, skipped with --no-store-level): TTFT through the HF adapter
with the prefix in the pool vs only on disk vs recompute, and 16 concurrent clients with a
shared-prefix workload (tiers_load.py) against a daemon with tiers vs without
(`tiers_vs_none_throughput_ratio`, goal >= 0.95).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

from kvstore.tiers import DiskTier, PageKey, PageRecord, make_meta

from . import tiers_store
from .harness import BenchError, emit, machine_info, median, now_iso, progress, self_cpu_seconds

WRITEBACK_GOAL = 0.5
READERS = 2  # threads for the parallel promotion (the machine has 2 vCPUs)
REINDEX_GOAL_S = 10.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--pages", type=int, default=256, help="pages written and read (default 256)")
    p.add_argument("--page-kib", type=int, default=512, help="page size in KiB (default 512)")
    p.add_argument("--batch", type=int, default=32, help="records per put_async call (default 32)")
    p.add_argument("--repeat", type=int, default=5, help="timed repeats; medians reported (default 5)")
    p.add_argument(
        "--reindex-pages", type=int, default=100_000, help="records for the re-index (default 100,000)"
    )
    p.add_argument(
        "--dir",
        default=None,
        help="where to write (default: the temp dir); the same file system for both sides",
    )
    p.add_argument(
        "--writemap", action="store_true", help="open LMDB with MDB_WRITEMAP (slower here: see BENCHMARKS.md)"
    )
    tiers_store.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    if min(args.pages, args.page_kib, args.batch, args.repeat, args.reindex_pages) < 1:
        raise SystemExit("tiers: --pages, --page-kib, --batch, --repeat and --reindex-pages must be >= 1")
    base = Path(tempfile.mkdtemp(prefix="kvsb-tiers-", dir=args.dir))
    try:
        result = measure(args, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    result["machine"] = machine_info(filesystem_dir=str(base.parent))
    emit(result, args.json, format_text(result))
    return 0


def _records(n: int, page_bytes: int) -> list[PageRecord]:
    blob = os.urandom(page_bytes + n)  # page i = blob[i : i + page_bytes]: distinct, no n x copy
    view = memoryview(blob)
    out = []
    parent = b""
    for i in range(n):
        h = i.to_bytes(16, "little")
        out.append(
            PageRecord.build(make_meta("bench", h, parent, 16, page_bytes, "bench"), view[i : i + page_bytes])
        )
        parent = h
    return out


def measure(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    n, page_bytes = args.pages, args.page_kib << 10
    nbytes = n * page_bytes
    capacity = max(4 * nbytes, 64 << 20)
    progress("building %d records of %d KiB (%d MiB) with XXH3-64 checksums", n, args.page_kib, nbytes >> 20)
    t0 = time.perf_counter()
    records = _records(n, page_bytes)
    checksum_gbps = nbytes / (time.perf_counter() - t0) / 1e9
    keys = [r.key for r in records]
    times: dict[str, list[float]] = {
        k: [] for k in ("tier_write", "file_write", "tier_read", "file_read", "tier_read_parallel")
    }
    buf = bytearray(page_bytes)
    bufs = [bytearray(page_bytes) for _ in range(READERS)]
    pool = cf.ThreadPoolExecutor(READERS)
    cpu0, wall0 = self_cpu_seconds(), time.perf_counter()
    for rep in range(args.repeat):
        progress(
            "round %d/%d: write-back, then promotion, tier and file alternating first", rep + 1, args.repeat
        )
        tier_dir, file_path = base / f"tier{rep}", base / f"file{rep}.bin"
        order = ("tier", "file") if rep % 2 == 0 else ("file", "tier")
        for side in order:
            if side == "tier":
                times["tier_write"].append(_tier_write(tier_dir, capacity, records, args))
            else:
                times["file_write"].append(_file_write(file_path, records))
        with DiskTier.open(tier_dir, capacity, writemap=args.writemap) as disk:
            list(disk.reindex())
            for side in order:
                if side == "tier":
                    times["tier_read"].append(_tier_read(disk, keys, buf))
                else:
                    times["file_read"].append(_file_read(file_path, n, buf))
            times["tier_read_parallel"].append(_tier_read_parallel(disk, keys, bufs, pool))
            if bytes(buf) != bytes(records[-1].payload):
                raise BenchError("the last page read back from the disk tier differs from what was written")
        shutil.rmtree(tier_dir)
        file_path.unlink()
    cpu = (self_cpu_seconds() - cpu0) / (time.perf_counter() - wall0)
    pool.shutdown()
    del records

    def gbps(ts: list[float]) -> float:
        return round(nbytes / median(ts) / 1e9, 3)

    g = {k: gbps(v) for k, v in times.items()}
    reindex = _reindex(base / "reindex", args.reindex_pages)
    writeback_ratio = g["tier_write"] / g["file_write"]
    return {
        "benchmark": "tiers",
        "when": now_iso(),
        "pages": n,
        "page_bytes": page_bytes,
        "bytes": nbytes,
        "repeat": args.repeat,
        "batch_records": args.batch,
        "writemap": args.writemap,
        "checksum": "xxh3_64 (xxhash)",
        "checksum_gbps": round(checksum_gbps, 3),
        "writeback_gbps": g["tier_write"],
        "file_write_fsync_gbps": g["file_write"],
        "writeback_ratio": round(writeback_ratio, 3),
        "writeback_goal": WRITEBACK_GOAL,
        "writeback_goal_met": writeback_ratio >= WRITEBACK_GOAL,
        "promotion_gbps": g["tier_read"],
        "file_read_gbps": g["file_read"],
        "promotion_ratio": round(g["tier_read"] / g["file_read"], 3),
        "promotion_parallel_gbps": g["tier_read_parallel"],
        "promotion_parallel_threads": READERS,
        "reads": "warm page cache on both sides (dropping it needs root)",
        "spread_ms": {k: [round(min(v) * 1e3, 1), round(max(v) * 1e3, 1)] for k, v in times.items()},
        "bench_cpu_util": round(cpu, 3),
        **reindex,
        "store_level": tiers_store.store_level(args),
    }


def _tier_write(path: Path, capacity: int, records: list[PageRecord], args: argparse.Namespace) -> float:
    with DiskTier.open(path, capacity, writemap=args.writemap) as disk:
        t0 = time.perf_counter()
        futures = [disk.put_async(records[i : i + args.batch]) for i in range(0, len(records), args.batch)]
        disk.flush_sync()
        elapsed = time.perf_counter() - t0
        if any(f.result() for f in futures) or len(disk) != len(records):
            raise BenchError(f"the disk tier holds {len(disk)} of {len(records)} pages after flush")
    return elapsed


def _file_write(path: Path, records: list[PageRecord]) -> float:
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for r in records:
            f.write(r.payload)
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def _tier_read(disk: DiskTier, keys: list[PageKey], buf: bytearray) -> float:
    t0 = time.perf_counter()
    for k in keys:
        if disk.read_into(k, buf) is None:
            raise BenchError(f"page {k} missing from the disk tier")
    return time.perf_counter() - t0


def _tier_read_parallel(
    disk: DiskTier, keys: list[PageKey], bufs: list[bytearray], pool: cf.ThreadPoolExecutor
) -> float:
    # READERS threads, each its own buffer: LMDB and the reader-thread copy release the GIL.
    def part(j: int) -> None:
        for k in keys[j::READERS]:
            if disk.read_into(k, bufs[j]) is None:
                raise BenchError(f"page {k} missing from the disk tier")

    t0 = time.perf_counter()
    list(pool.map(part, range(READERS)))
    return time.perf_counter() - t0


def _file_read(path: Path, n: int, buf: bytearray) -> float:
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        for _ in range(n):
            f.readinto(buf)
    return time.perf_counter() - t0


def _reindex(path: Path, n: int) -> dict[str, Any]:
    progress("re-index: writing %d records with 64-byte payloads", n)
    with DiskTier.open(path, max(64 << 20, n * 1024), batch_records=10_000) as disk:
        recs = []
        for i in range(n):
            h = i.to_bytes(16, "little")
            recs.append(PageRecord.build(make_meta("bench", h, b"", 16, 64, "bench"), h * 4))
        for i in range(0, n, 10_000):
            disk.put_async(recs[i : i + 10_000])
        disk.flush_sync()
        del recs
    with DiskTier.open(path, max(64 << 20, n * 1024)) as disk:
        t0 = time.perf_counter()
        crc = 0
        count = 0
        for meta in disk.reindex(
            lambda done, total, rate: progress("re-index: %d/%d (%.0f pages/s)", done, total, rate)
        ):
            crc = zlib.crc32(meta.block_hash, crc)  # consume each record, as the store will
            count += 1
        elapsed = time.perf_counter() - t0
    if count != n:
        raise BenchError(f"re-index found {count} of {n} records")
    scaled = elapsed * 100_000 / n
    return {
        "reindex_pages": n,
        "reindex_s": round(elapsed, 3),
        "reindex_100k_s": round(scaled, 3),
        "reindex_goal_s": REINDEX_GOAL_S,
        "reindex_goal_met": scaled < REINDEX_GOAL_S,
    }


def format_text(r: dict[str, Any]) -> str:
    mib = r["bytes"] >> 20
    lines = [
        f"disk tier (LMDB, writemap={r['writemap']}), {r['pages']} pages x {r['page_bytes'] >> 10} KiB = {mib} MiB, "
        f"medians of {r['repeat']}",
        f"  write-back (put + flush)  {r['writeback_gbps']:.3f} GB/s   file write+fsync {r['file_write_fsync_gbps']:.3f} GB/s"
        f"   writeback_ratio {r['writeback_ratio']:.3f} (goal >= {r['writeback_goal']}: "
        f"{'met' if r['writeback_goal_met'] else 'MISSED'})",
        f"  promotion (read+verify)   {r['promotion_gbps']:.3f} GB/s   file read        {r['file_read_gbps']:.3f} GB/s"
        f"   promotion_ratio {r['promotion_ratio']:.3f} ({r['reads']})",
        f"  promotion on {r['promotion_parallel_threads']} threads {r['promotion_parallel_gbps']:.3f} GB/s",
        f"  re-index {r['reindex_pages']:,} pages in {r['reindex_s']:.2f}s -> reindex_100k_s {r['reindex_100k_s']:.2f}"
        f" (goal < {r['reindex_goal_s']:.0f} s: {'met' if r['reindex_goal_met'] else 'MISSED'})",
        f"  checksum (XXH3-64) {r['checksum_gbps']:.2f} GB/s while building records",
        *tiers_store.format_text(r["store_level"]),
    ]
    return "\n".join(lines)
