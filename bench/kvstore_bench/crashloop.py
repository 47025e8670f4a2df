"""`kvstore-bench crashloop`: kill -9 the daemon during write-back, N times; 0 corrupt pages served.

One disk tier directory, one daemon restarted on it N times (`write_through = true`, a
16-page pool and an 8-page host tier, so pages are written through *and* demoted pool ->
host -> disk while the writer runs). Each cycle:

1. start the daemon; wait for its re-index of the disk tier to finish (the log line);
2. check: look up (pinned) every prompt a flush acknowledged since the previous check, every
   prompt written but not acknowledged in the previous cycle, and a sample of older
   acknowledged ones; read each hit page through this process's mapping of the pool and
   compare it with the bytes written. An acknowledged prompt must hit whole
   (`acknowledged_lost` otherwise); any hit page must be byte-identical (`corrupt_served`
   otherwise); an unacknowledged prompt may miss, in whole or from any page on;
3. write: prompts of 4 pages with deterministic bytes (a seeded permutation of a universe
   of --universe prompts whose first page is shared in groups of 8, so pages deduplicate),
   allocate/append/write/commit/release, `flush()` every 1-6 prompts; a flush that returned
   acknowledges every prompt committed before it was sent. A timer kills the daemon with
   SIGKILL at a random moment (seeded) --min-ms..--max-ms after the writes began, so the
   kill lands in a commit, a flush or the writer thread's batch.

After the last cycle the daemon is restarted once more and *every* acknowledged prompt is
checked. The JSON summary has `cycles`, `pages_checked`, `corrupt_served` (must be 0),
`acknowledged_lost` (must be 0: an acknowledged prompt short on two lookups),
`acknowledged_short_first_lookup` (must be 0: short on the first lookup, whole on a second),
the daemon's `corrupt_pages` counters and timings.
tests/test_e2e_tiers_crash.py runs 50 cycles of this loop in CI.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kvstore_client
import numpy as np
from kvstore_client.errors import KVStoreClientError

from .harness import BenchDaemon, BenchError, emit, machine_info, now_iso, progress

PAGE_TOKENS = 4
PAGES_PER_PROMPT = 4
GROUP = 8  # prompts j and j + GROUP * k share their first page
NAMESPACE = {
    "name": "crash",
    "num_layers": 2,
    "num_kv_heads": 2,
    "head_dim": 16,
    "dtype": "float16",
    "page_tokens": PAGE_TOKENS,
    "num_pages": 16,
}
DONE_LINE = "re-index of the disk tier done"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--cycles", type=int, default=1000, help="kill -9 cycles (default 1000)")
    p.add_argument("--seed", type=int, default=1, help="seed of the kill times and prompt order")
    p.add_argument("--universe", type=int, default=2000, help="distinct prompts (default 2000)")
    p.add_argument("--min-ms", type=float, default=30.0, help="earliest kill after writes begin (ms)")
    p.add_argument("--max-ms", type=float, default=400.0, help="latest kill after writes begin (ms)")
    p.add_argument("--sample", type=int, default=16, help="older acknowledged prompts checked per cycle")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop after this much wall time (0: none)")
    p.add_argument("--dir", default=None, help="where the disk tier lives (default: a temp dir)")


def run(args: argparse.Namespace) -> int:
    if args.cycles < 1 or args.universe < GROUP or not 0 <= args.min_ms <= args.max_ms:
        raise SystemExit("crashloop: --cycles >= 1, --universe >= 8, 0 <= --min-ms <= --max-ms")
    base = Path(tempfile.mkdtemp(prefix="kvsb-crash-", dir=args.dir))
    try:
        result = crash_loop(
            base,
            cycles=args.cycles,
            seed=args.seed,
            universe=args.universe,
            kill_ms=(args.min_ms, args.max_ms),
            sample=args.sample,
            max_seconds=args.max_minutes * 60 or None,
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    result["machine"] = machine_info(filesystem_dir=str(base.parent))
    emit(result, args.json, format_text(result))
    return 0 if result["ok"] else 1


# ---------------------------------------------------------------- prompts and their bytes


def prompt_tokens(j: int) -> list[int]:
    """Prompt j: a first page shared by its group (j % GROUP), then pages of its own."""
    head = random.Random(f"group-{j % GROUP}")
    own = random.Random(f"prompt-{j}")
    tokens = [head.randrange(50_000) for _ in range(PAGE_TOKENS)]
    return tokens + [own.randrange(50_000) for _ in range((PAGES_PER_PROMPT - 1) * PAGE_TOKENS)]


def page_bytes_for(tokens: list[int], index: int, nbytes: int) -> bytes:
    """The bytes written for page `index` of `tokens`: a function of the tokens up to and
    including that page (like real KV), so equal prefixes write equal pages."""
    key = hashlib.blake2b(np.asarray(tokens[: (index + 1) * PAGE_TOKENS], "<i4").tobytes(), digest_size=8)
    return np.random.default_rng(int.from_bytes(key.digest(), "little")).bytes(nbytes)


# ---------------------------------------------------------------- the loop


@dataclass
class Tally:
    cycles: int = 0
    prompts_written: int = 0
    flushes_acknowledged: int = 0
    prompts_checked: int = 0
    pages_checked: int = 0
    corrupt_served: int = 0
    acknowledged_lost: int = 0
    acknowledged_short_first_lookup: int = 0
    unacknowledged_hit_whole: int = 0
    unacknowledged_missed: int = 0
    corrupt_pages_reported: int = 0
    promotion_failures: int = 0
    disk_full_events: int = 0
    kills_during: dict[str, int] = field(default_factory=dict)
    start_s: list[float] = field(default_factory=list)
    reindex_s: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


class CrashLoop:
    def __init__(self, base: Path, *, seed: int, universe: int, kill_ms: tuple[float, float], sample: int):
        self.rng = random.Random(seed)
        self.order = list(range(universe))
        self.rng.shuffle(self.order)
        self.next = 0
        self.kill_ms = kill_ms
        self.sample = sample
        self.daemon = BenchDaemon(
            [NAMESPACE],
            {
                "log_level": "info",  # the re-index's done line
                "host_tier_bytes": 8 * 1024,  # 8 pages of 1 KiB
                "disk_tier_dir": str(base / "disk"),
                "disk_tier_bytes": 64 << 20,  # never full: a loss would be the tier's, not eviction's
                "write_through": True,
                "lease_ttl_s": 2.0,
            },
        )
        self.acked: set[int] = set()  # prompts some returned flush acknowledged
        self.fresh_acked: set[int] = set()  # ... since the last check
        self.unacked: set[int] = set()  # written in the last cycle, not acknowledged
        self.t = Tally()

    # ---- one daemon run

    def start(self) -> None:
        t0 = time.monotonic()
        self.daemon.start()
        t1 = time.monotonic()
        self.t.start_s.append(t1 - t0)
        deadline = t1 + 60
        while DONE_LINE not in self.daemon.stderr_path.read_text(errors="replace"):
            if self.daemon.proc is None or self.daemon.proc.poll() is not None:
                raise BenchError(f"the daemon exited during its re-index:\n{self.daemon.stderr_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"no re-index done line in 60 s:\n{self.daemon.stderr_tail()}")
            time.sleep(0.01)
        self.t.reindex_s.append(time.monotonic() - t1)

    def check(self, prompts: list[int], acked: set[int]) -> None:
        with kvstore_client.connect(self.daemon.target, client_name="crash-check") as client:
            ns = client.namespace(NAMESPACE["name"])
            for j in prompts:
                self._check_one(client, ns, j, j in acked)
            tiers = client.stats().tiers
            self.t.corrupt_pages_reported += tiers.corrupt_pages
            self.t.promotion_failures += tiers.promotion_failures
            self.t.disk_full_events += tiers.disk_full_events

    def _check_one(self, client: Any, ns: Any, j: int, acked: bool) -> None:
        tokens = prompt_tokens(j)
        self.t.prompts_checked += 1
        pages = self._lookup_and_compare(client, ns, j, tokens)
        if acked and pages != PAGES_PER_PROMPT:
            # A failure either way; once more to tell a page lost for good from a lookup that
            # missed a page still there (as promotion from a full host tier did before 4c61c25).
            again = self._lookup_and_compare(client, ns, j, tokens)
            if again == PAGES_PER_PROMPT:
                self.t.acknowledged_short_first_lookup += 1
                self._fail(f"cycle {self.t.cycles}: acknowledged prompt {j} hit {pages} pages, then whole")
            else:
                self.t.acknowledged_lost += 1
                self._fail(
                    f"cycle {self.t.cycles}: acknowledged prompt {j} hit {again}/{PAGES_PER_PROMPT} pages"
                )
        elif not acked:
            if pages == PAGES_PER_PROMPT:
                self.t.unacknowledged_hit_whole += 1
            elif pages == 0:
                self.t.unacknowledged_missed += 1

    def _lookup_and_compare(self, client: Any, ns: Any, j: int, tokens: list[int]) -> int:
        """Pinned lookup; every hit page compared with the bytes written. Pages hit."""
        with client.lookup(ns, tokens, pin=True) as hit:
            for i, slot in enumerate(hit.slots):
                got = ns.pool.raw_page(slot).numpy().tobytes()
                self.t.pages_checked += 1
                if got != page_bytes_for(tokens, i, ns.pool.page_bytes):
                    self.t.corrupt_served += 1
                    self._fail(f"cycle {self.t.cycles}: prompt {j} page {i} (slot {slot}) served wrong bytes")
            return hit.hit_tokens // PAGE_TOKENS

    def _fail(self, what: str) -> None:
        log = self.daemon.stderr_path.read_text(errors="replace").splitlines()
        said = [line for line in log if "WARNING" in line or "ERROR" in line][-3:]
        progress("FAIL: %s; the daemon logged: %s", what, said)
        if len(self.t.failures) < 20:
            self.t.failures.append(what + "".join(f"\n    daemon: {line}" for line in said))

    def write_until_killed(self) -> None:
        """Write prompts and flush now and then until a timer kills the daemon with SIGKILL."""
        assert self.daemon.proc is not None
        pid = self.daemon.proc.pid
        phase = ["start"]  # what the writer was doing when the kill landed
        killed = threading.Event()

        def kill() -> None:
            self.t.kills_during[phase[0]] = self.t.kills_during.get(phase[0], 0) + 1
            killed.set()
            os.kill(pid, signal.SIGKILL)

        self.unacked = set()
        pending: list[int] = []  # committed since the last flush was sent
        with kvstore_client.connect(self.daemon.target, client_name="crash-writer", timeout_s=10) as client:
            ns = client.namespace(NAMESPACE["name"])
            timer = threading.Timer(self.rng.uniform(*self.kill_ms) / 1e3, kill)
            flush_every = self.rng.randint(1, 6)
            timer.start()
            try:
                while not killed.is_set():
                    j = self.order[self.next % len(self.order)]
                    self.next += 1
                    phase[0] = "write"
                    self.unacked.add(j)  # (checked after the restart even if the kill cuts it short)
                    self._write(client, ns, j)
                    pending.append(j)
                    self.t.prompts_written += 1
                    if len(pending) >= flush_every:
                        phase[0] = "flush"
                        sent, pending = pending, []
                        client.flush()
                        self.t.flushes_acknowledged += 1
                        self.acked.update(sent)
                        self.fresh_acked.update(sent)
                        self.unacked.difference_update(sent)
                        flush_every = self.rng.randint(1, 6)
            except KVStoreClientError:
                if not killed.is_set():
                    raise
            finally:
                timer.cancel()
        self.daemon.proc.wait(10)
        if not killed.is_set():
            raise BenchError("the writer stopped before the kill")
        self.daemon.proc = None

    def _write(self, client: Any, ns: Any, j: int) -> None:
        tokens = prompt_tokens(j)
        with client.allocate(ns) as seq:
            for page in seq.append(tokens).writable_pages:
                data = page_bytes_for(tokens, page.index, ns.pool.page_bytes)
                ns.pool.raw_page(page.slot).numpy()[:] = np.frombuffer(data, np.uint8)
            seq.commit()

    def cycle(self) -> None:
        self.start()
        if self.t.cycles:
            older = sorted(self.acked - self.fresh_acked)
            sample = self.rng.sample(older, min(self.sample, len(older)))
            self.check(sorted(self.fresh_acked | self.unacked) + sample, self.acked)
            self.fresh_acked = set()
        self.write_until_killed()
        self.t.cycles += 1

    def final_check(self) -> None:
        """Restart once more and check every acknowledged prompt (and the last cycle's others)."""
        self.start()
        self.check(sorted(self.acked | self.unacked), self.acked)
        self.daemon.stop()


def crash_loop(
    base: Path,
    *,
    cycles: int,
    seed: int = 1,
    universe: int = 2000,
    kill_ms: tuple[float, float] = (30.0, 400.0),
    sample: int = 16,
    max_seconds: float | None = None,
) -> dict[str, Any]:
    """Run the loop (see the module doc); the summary, with `ok` true iff nothing failed."""
    loop = CrashLoop(base, seed=seed, universe=universe, kill_ms=kill_ms, sample=sample)
    t0 = time.monotonic()
    try:
        while loop.t.cycles < cycles:
            loop.cycle()
            c = loop.t.cycles
            if c % 10 == 0 or c == cycles:
                progress(
                    "cycle %d/%d: %d prompts written, %d acknowledged, %d pages checked, "
                    "%d corrupt served, %d acknowledged lost",
                    c,
                    cycles,
                    loop.t.prompts_written,
                    len(loop.acked),
                    loop.t.pages_checked,
                    loop.t.corrupt_served,
                    loop.t.acknowledged_lost,
                )
            if max_seconds is not None and time.monotonic() - t0 > max_seconds:
                progress("stopping after %d cycles: --max-minutes reached", c)
                break
        loop.final_check()
    finally:
        if loop.daemon.proc is not None:
            loop.daemon.stop()
        else:
            loop.daemon._cleanup()
    return summary(loop, cycles, time.monotonic() - t0)


def summary(loop: CrashLoop, asked: int, wall: float) -> dict[str, Any]:
    t = loop.t

    def ms(xs: list[float]) -> dict[str, float]:
        xs = sorted(xs)
        return {"median": round(xs[len(xs) // 2] * 1e3, 1), "max": round(xs[-1] * 1e3, 1)} if xs else {}

    ok = t.corrupt_served == t.acknowledged_lost == t.acknowledged_short_first_lookup == 0 < t.cycles
    return {
        "benchmark": "crashloop",
        "when": now_iso(),
        "ok": ok,
        "cycles": t.cycles,
        "cycles_asked": asked,
        "wall_s": round(wall, 1),
        "prompts_written": t.prompts_written,
        "flushes_acknowledged": t.flushes_acknowledged,
        "prompts_acknowledged": len(loop.acked),
        "prompts_checked": t.prompts_checked,
        "pages_checked": t.pages_checked,
        "corrupt_served": t.corrupt_served,
        "acknowledged_lost": t.acknowledged_lost,
        "acknowledged_short_first_lookup": t.acknowledged_short_first_lookup,
        "unacknowledged_hit_whole": t.unacknowledged_hit_whole,
        "unacknowledged_missed": t.unacknowledged_missed,
        "corrupt_pages_reported": t.corrupt_pages_reported,
        "promotion_failures": t.promotion_failures,
        "disk_full_events": t.disk_full_events,
        "kills_during": t.kills_during,
        "daemon_start_ms": ms(t.start_s),
        "reindex_wait_ms": ms(t.reindex_s),
        "failures": t.failures,
    }


def format_text(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"crash loop: {r['cycles']} of {r['cycles_asked']} kill -9 cycles in {r['wall_s']:.0f}s "
            f"({'ok' if r['ok'] else 'FAILED'})",
            f"  {r['prompts_written']:,} prompts written, {r['prompts_acknowledged']:,} acknowledged by "
            f"{r['flushes_acknowledged']:,} flushes; kills during {r['kills_during']}",
            f"  checked {r['prompts_checked']:,} prompts / {r['pages_checked']:,} pages: "
            f"corrupt served {r['corrupt_served']}, acknowledged lost {r['acknowledged_lost']} "
            f"(short on the first lookup, whole on the second: {r['acknowledged_short_first_lookup']})",
            f"  unacknowledged: {r['unacknowledged_hit_whole']} hit whole, {r['unacknowledged_missed']} missed; "
            f"daemon counted {r['corrupt_pages_reported']} corrupt pages, "
            f"{r['promotion_failures']} promotion failures",
            f"  daemon start {r['daemon_start_ms']} ms, re-index wait {r['reindex_wait_ms']} ms",
            *(f"  FAIL {f}" for f in r["failures"]),
        ]
    )
