"""`kvstore-bench fuzz`: hostile requests over every method (found by reflection); 0 UNKNOWN or INTERNAL.

One daemon with a tokens file (auth on; `--no-auth` runs without one) and two namespaces:
`held`, where a writer process stores --prompts prompts of 4 pages (page bytes that name their
prompt and index, proof_common.page_bytes) and keeps them (its sequences stay open, so no
Evict can take them), and `fz`, a playground. Then --streams processes send --requests
requests in all, built by kvstore_bench.fuzz_gen from what server reflection lists: hostile
typed values and garbage bytes over every method of every service. Each request carries one
of: the fuzzer's own token (read/write/admin on every namespace: the requests reach the
servicers), a token with read on `fz` only, no token, a wrong token, or a malformed
`authorization` header. Its own session ids are real, so calls get past the session check.

Afterwards: the daemon is SERVING (health), counted no internal error (Stats), logged no
traceback and stops with status 0; the writer reads its pages back through its own mapping
and a reader process (its own token, read-only, its own mapping) looks each prompt up and
compares every page: byte-identical, or the run fails. `ok` is true iff no answer was UNKNOWN
or INTERNAL, no call without a valid token was answered OK (`auth_bypassed`), and all of the
above held. The JSON has the counts by status code, by method and by credential, and
requests/s (of all streams together, on this machine: the generator and the daemon share
its CPUs).
"""

from __future__ import annotations

import argparse
import queue
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc

from . import fuzz_gen
from .harness import BenchDaemon, BenchError, emit, machine_info, now_iso, progress
from .proof_common import (
    client_context,
    logged_tracebacks,
    page_bytes,
    prompt_tokens,
    read_page,
    who_wrote,
    write_page,
    write_tokens_file,
)

GEOMETRY = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "dtype": "float16", "page_tokens": 4}
NAMESPACES = [GEOMETRY | {"name": "held", "num_pages": 64}, GEOMETRY | {"name": "fz", "num_pages": 64}]
PAGES = 4
WRITER = "fuzz-writer-secret-0123456789"
READER = "fuzz-reader-secret-0123456789"
FUZZER = "fuzz-admin-secret-0123456789"
FZ_READ = "fuzz-fzread-secret-0123456789"
TOKENS = {
    "writer": (WRITER, {"held": ["read", "write"]}),
    "reader": (READER, {"held": ["read"]}),
    "fuzzer": (FUZZER, {"*": ["read", "write", "admin"]}),
    "fz-read": (FZ_READ, {"fz": ["read"]}),
}
# (credential, weight, metadata): what a request presents.
CREDENTIALS = [
    ("valid", 55, (("authorization", f"Bearer {FUZZER}"),)),
    ("fz-read", 15, (("authorization", f"Bearer {FZ_READ}"),)),
    ("none", 10, None),
    ("wrong", 10, (("authorization", "Bearer not-a-token-of-this-daemon-000"),)),
    ("malformed", 10, None),  # drawn per request (fuzz_stream)
]
# (Only values gRPC lets a client send: a control character is refused before it leaves.)
MALFORMED = [
    "Bearer",
    "Bearer ",
    "Basic Zm9vOmJhcg==",
    f"bearer{FUZZER}",
    "Bearer " + "x" * 4096,
    f"Bearer {FUZZER[:-1]}",
]
CALL_TIMEOUT_S = 5.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--requests", type=int, default=100_000, help="hostile requests in all (default 100000)")
    p.add_argument("--streams", type=int, default=4, help="processes sending them at once (default 4)")
    p.add_argument("--prompts", type=int, default=6, help="prompts of 4 pages the writer stores (default 6)")
    p.add_argument("--seed", type=int, default=1, help="seed of the requests")
    p.add_argument("--no-auth", action="store_true", help="a daemon without a tokens file")
    p.add_argument("--quick", action="store_true", help="600 requests, 2 streams (a test's size)")


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.requests, args.streams = 600, 2
    if args.requests < 1 or args.streams < 1 or not 1 <= args.prompts <= 12:
        raise SystemExit("fuzz: --requests >= 1, --streams >= 1, 1 <= --prompts <= 12")
    result = fuzz(args.requests, args.streams, args.prompts, args.seed, auth=not args.no_auth)
    result["machine"] = machine_info()
    emit(result, args.json, format_text(result))
    return 0 if result["ok"] else 1


# ---------------------------------------------------------------- the client processes


def writer_main(conn: Any, target: str, token: str | None, prompts: int) -> None:
    """Store `prompts` prompts in `held` and keep them; on "verify", read them back through
    this process's mapping; on "exit", close."""
    import kvstore_client

    with kvstore_client.connect(target, client_name="fuzz-writer", token=token) as kv:
        ns = kv.namespace("held")
        held = []
        for pid in range(prompts):
            seq = kv.allocate(ns)
            for page in seq.append(prompt_tokens(pid, PAGES, ns.page_tokens)).writable_pages:
                write_page(ns, page.slot, page_bytes(pid, page.index, ns.pool.page_bytes))
            seq.commit()
            held.append(seq)
        conn.send({"slots": [seq.slots for seq in held]})
        while (msg := conn.recv()) == "verify":
            bad = [
                f"prompt {pid} page {i} (slot {slot})"
                for pid, seq in enumerate(held)
                for i, slot in enumerate(seq.slots)
                if read_page(ns, slot) != page_bytes(pid, i, ns.pool.page_bytes)
            ]
            conn.send({"checked": sum(len(s.slots) for s in held), "mismatched": bad})
    assert msg == "exit", msg


def reader_main(target: str, token: str | None, prompts: int) -> dict[str, Any]:
    """Another process: look each prompt up (pinned) and compare every page it maps."""
    import kvstore_client

    out: dict[str, Any] = {"checked": 0, "mismatched": [], "short": []}
    with kvstore_client.connect(target, client_name="fuzz-reader", token=token) as kv:
        ns = kv.namespace("held")
        for pid in range(prompts):
            with kv.lookup(ns, prompt_tokens(pid, PAGES, ns.page_tokens), pin=True) as hit:
                if len(hit.slots) != PAGES:
                    out["short"].append(f"prompt {pid}: {len(hit.slots)}/{PAGES} pages hit")
                for i, slot in enumerate(hit.slots):
                    got = read_page(ns, slot)
                    out["checked"] += 1
                    if got != page_bytes(pid, i, ns.pool.page_bytes):
                        out["mismatched"].append(f"prompt {pid} page {i}: holds {who_wrote(got)}")
    return out


def fuzz_stream(target: str, seed: int, requests: int, auth: bool, done: Any) -> dict[str, Any]:
    """One stream: `requests` hostile requests, counted by status, method and credential."""
    rng = random.Random(seed)
    by_code: Counter[str] = Counter()
    by_method: dict[str, Counter[str]] = {}
    by_cred: dict[str, Counter[str]] = {}
    bad: list[str] = []
    bypassed: list[str] = []
    creds = CREDENTIALS if auth else [("valid", 1, None)]
    names, weights = [c[0] for c in creds], [c[1] for c in creds]
    metadata = {c[0]: c[2] for c in creds}
    with grpc.insecure_channel(target) as channel:
        methods = fuzz_gen.discover(channel)
        open_method, open_request = next((m, cls) for m, cls in methods if m.name == "OpenSession")
        from google.protobuf import message_factory

        reply_cls = message_factory.GetMessageClass(open_method.output_type)
        sessions = []
        for i in range(2):
            opened = channel.unary_unary(fuzz_gen.method_path(open_method))(
                open_request(client_name=f"fuzzer-{seed}-{i}").SerializeToString(),
                timeout=10,
                metadata=metadata["valid"],
            )
            sessions.append(reply_cls.FromString(opened).session_id)
        fuzz = fuzz_gen.Fuzzer(rng, sessions, strings=["held", "fz"])
        for n in range(requests):
            method, request_cls = methods[rng.randrange(len(methods))]
            if rng.random() < 0.8:
                payload = fuzz.fill(request_cls()).SerializeToString()
            else:
                payload = fuzz.garbage(fuzz.fill(request_cls()).SerializeToString())
            cred = rng.choices(names, weights)[0]
            md = metadata[cred]
            if cred == "malformed":
                md = (("authorization", rng.choice(MALFORMED)),)
            code, details = fuzz_gen.call(channel, method, payload, timeout=CALL_TIMEOUT_S, metadata=md)
            path = fuzz_gen.method_path(method)
            by_code[code.name] += 1
            by_method.setdefault(path, Counter())[code.name] += 1
            by_cred.setdefault(cred, Counter())[code.name] += 1
            if code in fuzz_gen.BAD and len(bad) < 20:
                bad.append(f"{path} [{cred}] answered {code.name}: {details}")
            guarded = method.containing_service.full_name not in fuzz_gen.OPEN_SERVICES
            if auth and cred in ("none", "wrong", "malformed") and guarded and code == grpc.StatusCode.OK:
                bypassed.append(f"{path} [{cred}] answered OK")
            if n % 50 == 0:
                done.value = n
        done.value = requests
    return {
        "by_code": dict(by_code),
        "by_method": {k: dict(v) for k, v in by_method.items()},
        "by_credential": {k: dict(v) for k, v in by_cred.items()},
        "bad": bad,
        "bad_count": sum(by_code[c.name] for c in fuzz_gen.BAD),
        "bypassed": bypassed,
    }


# ---------------------------------------------------------------- the run


def fuzz(requests: int, streams: int, prompts: int, seed: int, *, auth: bool) -> dict[str, Any]:
    daemon = BenchDaemon(NAMESPACES, {"max_pool_bytes": 16 << 20, "max_request_tokens": 4096})
    disk = daemon.dir / "disk"
    daemon.server |= {"host_tier_bytes": 1 << 20, "disk_tier_dir": str(disk), "disk_tier_bytes": 64 << 20}
    if auth:
        daemon.server["tokens_file"] = write_tokens_file(Path(daemon.dir) / "tokens.toml", TOKENS)
    tok = (lambda t: t) if auth else (lambda t: None)
    ctx = client_context()
    writer_conn, child_conn = ctx.Pipe()
    writer = ctx.Process(target=writer_main, args=(child_conn, daemon.target, tok(WRITER), prompts))
    status: int | None = None
    try:
        daemon.start()
        writer.start()
        if not writer_conn.poll(60):
            raise BenchError("the writer stored nothing in 60 s")
        stored = writer_conn.recv()
        progress("writer: %d prompts of %d pages stored and held", len(stored["slots"]), PAGES)
        wall, streamed = _send(ctx, daemon, requests, streams, seed, auth)
        progress("fuzz: %d requests in %.1fs (%.0f/s)", requests, wall, requests / wall)
        after = _after(daemon, tok(FUZZER))
        writer_conn.send("verify")
        own = writer_conn.recv()
        with ctx.Pool(1) as pool:
            other = pool.apply(reader_main, (daemon.target, tok(READER), prompts))
        writer_conn.send("exit")
        writer.join(30)
        tracebacks = logged_tracebacks(daemon.stderr_path.read_text(errors="replace"))
    finally:
        if writer.is_alive():
            writer.kill()
        status = daemon.stop()
    return summary(requests, streams, prompts, auth, wall, streamed, after, own, other, tracebacks, status)


def _stream_main(results: Any, target: str, seed: int, requests: int, auth: bool, done: Any) -> None:
    results.put(fuzz_stream(target, seed, requests, auth, done))


def _send(
    ctx: Any, daemon: BenchDaemon, requests: int, streams: int, seed: int, auth: bool
) -> tuple[float, list]:
    share = [requests // streams + (i < requests % streams) for i in range(streams)]
    counters = [ctx.Value("q", 0, lock=False) for _ in range(streams)]
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_stream_main, args=(results, daemon.target, seed * 1000 + i, n, auth, counters[i]))
        for i, n in enumerate(share)
    ]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    got: list[dict[str, Any]] = []
    last = t0
    try:
        while len(got) < streams:
            try:
                got.append(results.get(timeout=1.0))
            except queue.Empty:
                if not all(p.is_alive() for p in procs) and results.empty():
                    dead = [p.exitcode for p in procs if not p.is_alive()]
                    if any(code != 0 for code in dead):
                        raise BenchError(f"a fuzz stream died (exit codes {dead})") from None
            if time.monotonic() - last >= 5:
                last = time.monotonic()
                sent = sum(c.value for c in counters)
                progress("fuzz: %d/%d requests sent (%.0f/s)", sent, requests, sent / (last - t0))
                if daemon.proc is None or daemon.proc.poll() is not None:
                    raise BenchError(f"the daemon exited during the fuzz:\n{daemon.stderr_tail()}")
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    return time.monotonic() - t0, got


def _after(daemon: BenchDaemon, token: str | None) -> dict[str, Any]:
    import kvstore_client

    alive = daemon.proc is not None and daemon.proc.poll() is None
    if not alive:
        return {"alive": False, "health": "EXITED", "internal_errors": -1, "malformed_requests": -1}
    with kvstore_client.connect(daemon.target, client_name="fuzz-check", token=token) as kv:
        stats = kv.stats()
        return {
            "alive": True,
            "health": kv.health(),
            "internal_errors": stats.internal_errors,
            "malformed_requests": stats.malformed_requests,
            "sessions_open": stats.sessions,
        }


def summary(
    requests: int,
    streams: int,
    prompts: int,
    auth: bool,
    wall: float,
    streamed: list[dict[str, Any]],
    after: dict[str, Any],
    own: dict[str, Any],
    other: dict[str, Any],
    tracebacks: tuple[int, list[str], int],
    status: int | None,
) -> dict[str, Any]:
    by_code: Counter[str] = Counter()
    by_method: dict[str, Counter[str]] = {}
    by_cred: dict[str, Counter[str]] = {}
    for s in streamed:
        by_code.update(s["by_code"])
        for k, v in s["by_method"].items():
            by_method.setdefault(k, Counter()).update(v)
        for k, v in s["by_credential"].items():
            by_cred.setdefault(k, Counter()).update(v)
    bad = sum(s["bad_count"] for s in streamed)
    bypassed = [b for s in streamed for b in s["bypassed"]]
    expected_pages = prompts * PAGES
    checks = {
        "no_unknown_or_internal": bad == 0,
        "no_auth_bypass": not bypassed,
        "serving": after["health"] == "SERVING",
        "internal_errors_0": after["internal_errors"] == 0,
        "no_traceback_logged": tracebacks[0] == 0,
        "clean_exit": status == 0,
        "pages_identical_writer": own["checked"] == expected_pages and not own["mismatched"],
        "pages_identical_reader": other["checked"] == expected_pages
        and not other["mismatched"] + other["short"],
    }
    return {
        "benchmark": "fuzz",
        "when": now_iso(),
        "ok": all(checks.values()),
        "checks": checks,
        "requests": requests,
        "streams": streams,
        "auth": auth,
        "wall_s": round(wall, 1),
        "requests_per_s": round(requests / wall, 1),
        "unknown_or_internal": bad,
        "unknown_or_internal_examples": [b for s in streamed for b in s["bad"]][:20],
        "auth_bypassed": len(bypassed),
        "auth_bypassed_examples": bypassed[:20],
        "by_code": dict(by_code.most_common()),
        "by_credential": {k: dict(v.most_common()) for k, v in sorted(by_cred.items())},
        "methods": len(by_method),
        "by_method": {k: dict(v.most_common()) for k, v in sorted(by_method.items())},
        "daemon": after
        | {
            "tracebacks_logged": tracebacks[0],
            "tracebacks_first": tracebacks[1],
            "grpc_replies_to_gone_callers_logged": tracebacks[2],
            "exit_status": status,
        },
        "pages_checked_writer": own["checked"],
        "pages_checked_reader": other["checked"],
        "pages_mismatched": own["mismatched"] + other["mismatched"],
        "prompts_short": other["short"],
    }


def format_text(r: dict[str, Any]) -> str:
    failed = [k for k, v in r["checks"].items() if not v]
    codes = ", ".join(f"{k} {v:,}" for k, v in r["by_code"].items())
    return "\n".join(
        [
            f"fuzz: {r['requests']:,} hostile requests over {r['methods']} methods, {r['streams']} streams, "
            f"auth {'on' if r['auth'] else 'off'}: {r['wall_s']:.0f}s, {r['requests_per_s']:.0f} requests/s "
            f"({'ok' if r['ok'] else 'FAILED: ' + ', '.join(failed)})",
            f"  by status: {codes}",
            f"  UNKNOWN or INTERNAL: {r['unknown_or_internal']}; answered OK without a valid token: "
            f"{r['auth_bypassed']}",
            f"  daemon: {r['daemon']['health']}, internal_errors {r['daemon']['internal_errors']}, "
            f"malformed_requests {r['daemon']['malformed_requests']}, tracebacks logged "
            f"{r['daemon']['tracebacks_logged']}, exit status {r['daemon']['exit_status']}",
            f"  stored pages: {r['pages_checked_writer']} read back by the writer, "
            f"{r['pages_checked_reader']} by a reader process; mismatched {len(r['pages_mismatched'])}",
            *(f"  FAIL {b}" for b in r["unknown_or_internal_examples"] + r["auth_bypassed_examples"]),
            *(f"  FAIL {m}" for m in r["pages_mismatched"] + r["prompts_short"]),
            *(f"  daemon logged:\n{t}" for t in r["daemon"]["tracebacks_first"]),
        ]
    )
