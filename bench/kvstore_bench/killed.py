"""`kvstore-bench killed-clients`: clients SIGKILLed mid-write; every page free or sealed within the lease TTL + 1 s.

One daemon with a short lease (--lease-ttl, default 1 s). First a survivor seals --shared
prompts of 4 pages; a reader thread (this process, its own session and mapping) then looks
up, pinned, every prompt anyone may have sealed, over and over, and compares each hit page
with the bytes its prompt's page must hold (proof_common.page_bytes). Then --clients victim
processes, --concurrency at a time (a wave), each get to the middle of a write and are
killed with SIGKILL once all of their wave are there. Three kinds, in turn:

- `sequence` (client library, KeepAlive stream): allocate, append a 4-page prompt (prompts
  overlap between victims), write the right bytes into the first k pages (k = 0, 1 or 2) and
  commit those, write wrong bytes into the rest (never committed: if one were ever sealed
  and served, the reader would see it), and every other one pins a shared prompt;
- `put` (client library): the fast path's put with a function that writes wrong bytes into
  the reserved pages and then waits: killed between Reserve and Seal;
- `raw` (raw stubs, no stream: only the lease holds the session; heartbeats every TTL/3
  until the kill): open a session, allocate, append, pin a shared prompt.

For each victim the time from its kill to its session's end is measured by polling
ListSessions (every ~20 ms); a session's end releases everything it held. After each wave
Stats must show nothing reserved and nothing pinned (the reader paused), the open sessions
back to the baseline, and every page free or sealed. `ok` is true iff every victim's session
ended within the lease TTL + 1 s, the reader never saw a wrong byte, and the daemon ended
with its baseline sessions, no traceback, and a clean stop.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from typing import Any

import grpc
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb
from kvstore_proto.kvstore.v1 import kvstore_pb2_grpc as pb_grpc

from .harness import BenchDaemon, BenchError, emit, machine_info, now_iso, percentile, progress
from .killed_victims import (
    KINDS,
    NAMESPACE,
    NS,
    PAGES,
    SHARED_BASE,
    Reader,
    victim_main,
)
from .proof_common import (
    client_context,
    logged_tracebacks,
    page_bytes,
    prompt_tokens,
    write_page,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--clients", type=int, default=1000, help="victims in all (default 1000)")
    p.add_argument("--concurrency", type=int, default=50, help="victims alive at once, a wave (default 50)")
    p.add_argument("--lease-ttl", type=float, default=1.0, help="the daemon's lease TTL, seconds (default 1)")
    p.add_argument("--shared", type=int, default=16, help="prompts the survivor seals first (default 16)")
    p.add_argument("--quick", action="store_true", help="12 clients in waves of 6 (a test's size)")


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.clients, args.concurrency = 12, 6
    if args.clients < 1 or args.concurrency < 1 or args.lease_ttl < 0.5 or args.shared < 1:
        raise SystemExit(
            "killed-clients: --clients >= 1, --concurrency >= 1, --lease-ttl >= 0.5, --shared >= 1"
        )
    result = killed_clients(args.clients, args.concurrency, args.lease_ttl, args.shared)
    result["machine"] = machine_info()
    emit(result, args.json, format_text(result))
    return 0 if result["ok"] else 1


# ---------------------------------------------------------------- the run


class Monitor:
    """Raw stubs (no session of its own) for ListSessions and Stats."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.kv = pb_grpc.KVStoreStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)

    def session_ids(self) -> set[int]:
        return {s.session_id for s in self.admin.ListSessions(pb.ListSessionsRequest(), timeout=10).sessions}

    def counts(self) -> dict[str, int]:
        reply = self.kv.Stats(pb.StatsRequest(namespace=NS), timeout=10)
        (ns,) = reply.namespaces
        fields = ("pages_total", "pages_free", "pages_reserved", "pages_sealed", "pages_pinned", "sequences")
        return {f: getattr(ns, f) for f in fields} | {"sessions": reply.sessions}


def killed_clients(clients: int, concurrency: int, ttl: float, shared: int) -> dict[str, Any]:
    import kvstore_client

    daemon = BenchDaemon([NAMESPACE], {"lease_ttl_s": ttl, "lease_ttl_max_s": 60.0})
    ctx = client_context()
    t0 = time.monotonic()
    returns: dict[str, list[float]] = {k: [] for k in KINDS}
    settle: list[float] = []
    late: list[str] = []
    wave_checks: list[str] = []
    status = None
    try:
        daemon.start()
        monitor = Monitor(daemon.target)
        kv = kvstore_client.connect(daemon.target, client_name="survivor")
        _seal_shared(kv, shared)
        baseline = monitor.counts()
        reader = Reader(kv, shared)
        reader.start()
        progress("survivor sealed %d prompts; baseline %s", shared, baseline)
        done = 0
        while done < clients:
            n = min(concurrency, clients - done)
            last_kill = _wave(ctx, daemon, monitor, range(done, done + n), ttl, shared, returns, late)
            done += n
            problem = _settled(monitor, reader, baseline)
            while problem and time.monotonic() - last_kill < ttl + 10:
                time.sleep(0.02)
                problem = _settled(monitor, reader, baseline)
            settle.append(time.monotonic() - last_kill)
            if problem:
                wave_checks.append(f"after victim {done}: {problem}")
            elif settle[-1] > ttl + 1:
                wave_checks.append(f"after victim {done}: settled {settle[-1]:.2f}s after the last kill")
            if done % max(concurrency, clients // 10) == 0 or done == clients:
                all_s = sorted(x for xs in returns.values() for x in xs)
                progress(
                    "%d/%d victims killed; kill -> session end max %.3fs; reader %d pages checked, %d wrong",
                    done,
                    clients,
                    all_s[-1] if all_s else float("nan"),
                    reader.pages_checked,
                    len(reader.mismatched),
                )
            if reader.error is not None:
                raise BenchError(f"the reader failed: {reader.error!r}")
        reader.stop.set()
        reader.join(30)
        reader.sweep()  # once more, whole, after the last wave
        end = monitor.counts()
        kv.close()
        monitor.channel.close()
        tracebacks = logged_tracebacks(daemon.stderr_path.read_text(errors="replace"))
    finally:
        status = daemon.stop()
    return summary(
        clients,
        concurrency,
        ttl,
        time.monotonic() - t0,
        returns,
        settle,
        late,
        wave_checks,
        reader,
        baseline,
        end,
        tracebacks,
        status,
    )


def _seal_shared(kv: Any, shared: int) -> None:
    ns = kv.namespace(NS)
    for pid in range(SHARED_BASE, SHARED_BASE + shared):
        with kv.allocate(ns) as seq:
            for page in seq.append(prompt_tokens(pid, PAGES, ns.page_tokens)).writable_pages:
                write_page(ns, page.slot, page_bytes(pid, page.index, ns.pool.page_bytes))
            seq.commit()


def _wave(
    ctx: Any,
    daemon: BenchDaemon,
    monitor: Monitor,
    vids: range,
    ttl: float,
    shared: int,
    returns: dict[str, list[float]],
    late: list[str],
) -> float:
    """Start the wave's victims, wait until each is mid-write, SIGKILL them all, and time
    each one's session end; when the last kill was sent."""
    victims = []
    try:
        for vid in vids:
            kind = KINDS[vid % len(KINDS)]
            parent_end, child_end = ctx.Pipe()
            args = (child_end, daemon.target, kind, vid, ttl, shared)
            proc = ctx.Process(target=victim_main, args=args, daemon=True)
            proc.start()
            child_end.close()  # the victim's end is the victim's: 1,000 of them would exhaust our fds
            victims.append((vid, kind, proc, parent_end))
        sessions: dict[int, tuple[int, str]] = {}
        for vid, kind, proc, conn in victims:
            if not conn.poll(60):
                raise BenchError(
                    f"victim {vid} ({kind}) did not get mid-write in 60 s (exit code {proc.exitcode})"
                )
            try:
                sessions[conn.recv()["session_id"]] = (vid, kind)
            except EOFError:
                raise BenchError(
                    f"victim {vid} ({kind}) died before it got mid-write (exit {proc.exitcode})"
                ) from None
        killed_at: dict[int, float] = {}
        for (vid, kind, proc, _conn), sid in zip(victims, sessions, strict=True):
            if proc.exitcode is not None:
                late.append(
                    f"victim {vid} ({kind}) exited by itself (status {proc.exitcode}) before its kill"
                )
            else:
                os.kill(proc.pid, signal.SIGKILL)
            killed_at[sid] = time.monotonic()
    finally:
        for _vid, _kind, proc, conn in victims:
            if proc.exitcode is None:
                proc.kill()
            proc.join(10)
            proc.close()
            conn.close()
    pending = set(killed_at)
    deadline = time.monotonic() + ttl + 10
    while pending and time.monotonic() < deadline:
        live = monitor.session_ids()
        now = time.monotonic()
        for sid in pending - live:
            vid, kind = sessions[sid]
            took = now - killed_at[sid]
            returns[kind].append(took)
            if took > ttl + 1:
                late.append(f"victim {vid} ({kind}): session {sid} ended {took:.2f}s after its kill")
        pending &= live
        time.sleep(0.02)
    for sid in pending:
        vid, kind = sessions[sid]
        late.append(f"victim {vid} ({kind}): session {sid} still open {ttl + 10:.0f}s after its kill")
    return max(killed_at.values())


def _settled(monitor: Monitor, reader: Reader, baseline: dict[str, int]) -> str:
    """ "" if, with the reader between lookups, nothing is reserved or pinned, the sessions
    are the baseline's and every page is free or sealed; else what differs."""
    with reader.lock:
        c = monitor.counts()
    problems = []
    if c["pages_reserved"] or c["pages_pinned"] or c["sequences"]:
        problems.append(
            f"{c['pages_reserved']} reserved, {c['pages_pinned']} pinned, {c['sequences']} sequences"
        )
    if c["sessions"] != baseline["sessions"]:
        problems.append(f"{c['sessions']} sessions (baseline {baseline['sessions']})")
    if c["pages_free"] + c["pages_sealed"] != c["pages_total"]:
        problems.append(f"free {c['pages_free']} + sealed {c['pages_sealed']} != {c['pages_total']}")
    return "; ".join(problems)


def summary(
    clients: int,
    concurrency: int,
    ttl: float,
    wall: float,
    returns: dict[str, list[float]],
    settle: list[float],
    late: list[str],
    wave_checks: list[str],
    reader: Reader,
    baseline: dict[str, int],
    end: dict[str, int],
    tracebacks: tuple[int, list[str], int],
    status: int | None,
) -> dict[str, Any]:
    def dist(xs: list[float]) -> dict[str, float]:
        xs = sorted(xs)
        if not xs:
            return {}
        return {
            "n": len(xs),
            "min_s": round(xs[0], 3),
            "median_s": round(percentile(xs, 50), 3),
            "p99_s": round(percentile(xs, 99), 3),
            "max_s": round(xs[-1], 3),
        }

    measured = sum(len(xs) for xs in returns.values())
    checks = {
        "every_session_ended_within_ttl_plus_1s": not late and measured == clients,
        "no_wrong_bytes_served": not reader.mismatched and reader.pages_checked > 0,
        "settled_after_every_wave": not wave_checks,
        "sessions_back_to_baseline": end["sessions"] == baseline["sessions"],
        "every_page_free_or_sealed": end["pages_reserved"] == end["pages_pinned"] == 0
        and end["pages_free"] + end["pages_sealed"] == end["pages_total"],
        "no_traceback_logged": tracebacks[0] == 0,
        "clean_exit": status == 0,
    }
    return {
        "benchmark": "killed-clients",
        "when": now_iso(),
        "ok": all(checks.values()),
        "checks": checks,
        "clients": clients,
        "concurrency": concurrency,
        "lease_ttl_s": ttl,
        "bound_s": ttl + 1,
        "wall_s": round(wall, 1),
        "kill_to_session_end": {k: dist(v) for k, v in returns.items()},
        "last_kill_to_pages_settled": dist(settle),
        "late": late[:20],
        "late_count": len(late),
        "wave_problems": wave_checks[:20],
        "reader_lookups": reader.lookups,
        "reader_pages_checked": reader.pages_checked,
        "wrong_bytes_served": reader.mismatched,
        "baseline": baseline,
        "end": end,
        "daemon": {
            "tracebacks_logged": tracebacks[0],
            "tracebacks_first": tracebacks[1],
            "grpc_replies_to_gone_callers_logged": tracebacks[2],
            "exit_status": status,
        },
    }


def format_text(r: dict[str, Any]) -> str:
    failed = [k for k, v in r["checks"].items() if not v]
    lines = [
        f"killed clients: {r['clients']} victims SIGKILLed mid-write, {r['concurrency']} at a time, lease "
        f"{r['lease_ttl_s']:g}s, in {r['wall_s']:.0f}s ({'ok' if r['ok'] else 'FAILED: ' + ', '.join(failed)})",
    ]
    for kind, d in r["kill_to_session_end"].items():
        if d:
            lines.append(
                f"  {kind:8s} kill -> session end (all it held released): median {d['median_s']:.3f}s, "
                f"p99 {d['p99_s']:.3f}s, max {d['max_s']:.3f}s (n {d['n']}; bound {r['bound_s']:g}s)"
            )
    d = r["last_kill_to_pages_settled"]
    lines += [
        f"  per wave, last kill -> nothing reserved or pinned, sessions at baseline: median {d['median_s']:.3f}s, "
        f"max {d['max_s']:.3f}s (n {d['n']})",
        f"  reader: {r['reader_lookups']:,} pinned lookups, {r['reader_pages_checked']:,} pages compared, "
        f"{len(r['wrong_bytes_served'])} wrong",
        f"  end: {r['end']} (baseline sessions {r['baseline']['sessions']})",
        *(f"  FAIL {x}" for x in r["late"] + r["wave_problems"] + r["wrong_bytes_served"]),
        *(f"  daemon logged:\n{t}" for t in r["daemon"]["tracebacks_first"]),
    ]
    return "\n".join(lines)
