"""The demo (`make run`, or `python examples/demo.py`): the whole system end to end on one
machine, with the CPU default config. A client of the daemon like any other: it starts the
daemon as a separate process and talks to it only through `kvstore_client`.

Two variants. The model one (`--model`; the default where transformers and the SmolLM2-135M
GGUF model are installed, see `kvstore_client.hf.smollm2_missing`): process A reads a long
document into the cache through the transformers adapter, process B asks questions about it,
computing only the questions, and checks its answers equal the model alone's
(examples/demo_model_worker.py). The plain one (`--plain`, the default otherwise) writes
synthetic KV (examples/demo_worker.py), as follows:

1. Start the real daemon as a child process (`python -m kvstore serve`), or use the one
   already serving on the socket, and wait until its health check says SERVING.
2. Process A (its own OS process) writes the KV of a long prompt straight into pages of
   the shared pool and commits them; then it exits.
3. Process B (another OS process) looks the prompt up, maps the pool, reads A's pages
   zero-copy and checks every byte; then appends the prompt plus its own question and gets
   A's pages back as CACHED: nothing to recompute, nothing copied.
4. Print the daemon's stats (as `kvstore-admin stats` does), then keep the daemon serving
   until Ctrl-C or SIGTERM and stop it gracefully (`--no-serve`: stop right away).

Exit status: 0 when the demo verified and the daemon stopped cleanly; 1 when something
failed; 2 for a bad config (the daemon's error says which key); 130 when interrupted before
the demo finished.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import demo_model_worker
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kvstore_client import KVStoreClientError, default_socket_path, wait_until_serving
from kvstore_client.cli.admin import connect
from kvstore_client.cli.fmt import count, human_bytes
from kvstore_client.cli.stats_view import namespace_dict, render_stats
from kvstore_client.errors import Unavailable
from kvstore_client.target import ConfigFileError

PROG = "demo"  # what its messages start with
HERE = Path(__file__).resolve().parent
SERVING = health_pb2.HealthCheckResponse.SERVING
START_TIMEOUT_S = 60.0  # the default 256 MiB pool is backed in well under a second
STOP_TIMEOUT_S = 30.0  # beyond the daemon's own shutdown_grace_s
WORKER_TIMEOUT_S = 300.0


class DemoError(Exception):
    """The demo cannot go on; the message says what happened."""


class BadConfig(DemoError):
    """The daemon refused its config (exit status 2); it printed which key and why."""


class _Stop(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt is for SIGINT."""


class _StopSignals:
    """SIGINT and SIGTERM while the demo runs: the first stops it (KeyboardInterrupt or _Stop in
    the main thread); later ones are ignored, so none cuts the daemon's ordered shutdown short.
    They come in bursts: `timeout make run` signals make and its process group, and make passes
    its own SIGTERM on. A handler that raised at each let the second land while the first was
    being handled, and the demo died leaving its daemon serving. (Ignored here, not with SIG_IGN:
    a signal caught just before SIG_IGN is set makes Python print "Signal 15 ignored due to race
    condition" with a traceback.)"""

    def __init__(self) -> None:
        self.stopping = False

    def handler(self, signum: int, frame: object) -> None:
        if self.stopping:
            return
        self.stopping = True
        raise KeyboardInterrupt if signum == signal.SIGINT else _Stop


def say(line: str = "") -> None:
    print(line, flush=True)


# ---------------------------------------------------------------- the daemon


def _health(target: str, timeout: float) -> int | None:
    """The daemon's overall health status, or None when nothing answers."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.RpcError:
            return None
    return reply.status


class DaemonChild:
    """`python -m kvstore serve` as a child process, in its own process group so that a
    Ctrl-C in the terminal reaches only the demo, which then stops the daemon in order."""

    def __init__(self, socket_path: str, config_file: str | None, log_level: str) -> None:
        self.target = f"unix:{socket_path}"
        self.argv = [sys.executable, "-m", "kvstore", "serve", "--socket", socket_path]
        self.argv += ["--log-level", log_level] + (["--config", config_file] if config_file else [])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start it and wait for SERVING; returns the seconds that took."""
        t0 = time.monotonic()
        # stdout/stderr stay the terminal's: the daemon's warnings and errors are the operator's.
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, process_group=0)
        say(f"daemon: started `{' '.join(['python', *self.argv[1:]])}` (pid {self.proc.pid})")
        self._wait_serving(t0 + START_TIMEOUT_S)
        return time.monotonic() - t0

    def _wait_serving(self, deadline: float) -> None:
        assert self.proc is not None
        proc = self.proc
        try:
            wait_until_serving(
                self.target, deadline - time.monotonic(), still_starting=lambda: proc.poll() is None
            )
        except Unavailable as e:
            if proc.poll() == 2:
                raise BadConfig("the daemon refused its config (its error is above)") from None
            if proc.poll() is not None:
                raise DemoError(
                    f"the daemon exited with status {proc.returncode} before it was ready (its error is above)"
                ) from None
            raise DemoError(e.details) from None

    def wait(self) -> int:
        """Until the daemon exits. In short waits: a Ctrl-C that the kernel hands to another
        thread of this process (gRPC keeps one) does not interrupt a blocking waitpid in the
        main thread, and would go unnoticed until the daemon exits by itself."""
        assert self.proc is not None
        while True:
            try:
                return self.proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue

    def stop(self) -> int | None:
        """SIGTERM, wait for the daemon's ordered shutdown; SIGKILL if it hangs. Its exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            say(f"daemon: stopping (SIGTERM to pid {self.proc.pid})")
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                say(f"daemon: still running after {STOP_TIMEOUT_S:g}s; killing it")
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


# ---------------------------------------------------------------- processes A and B


def run_worker(role: str, target: str, namespace: str, tokens: int, seed: int, *extra: str) -> dict[str, Any]:
    """Run one side of the demo as its own process; its JSON report."""
    argv = [sys.executable, str(HERE / "demo_worker.py"), role, "--target", target]
    argv += ["--namespace", namespace, "--tokens", str(tokens), "--seed", str(seed), *extra]
    proc = subprocess.run(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, timeout=WORKER_TIMEOUT_S
    )
    if proc.returncode != 0:
        raise DemoError(f"process {'A' if role == 'write' else 'B'} exited with status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_model_worker(role: str, target: str, namespace: str) -> dict[str, Any]:
    """Run one model process; its JSON report. Its stderr (the model loader's progress bars,
    transformers warnings) is shown only if it fails."""
    argv = [sys.executable, str(HERE / "demo_model_worker.py"), role, "--target", target]
    argv += ["--namespace", namespace]
    proc = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise DemoError(
            f"process {'A' if role == 'read-document' else 'B'} exited with status {proc.returncode}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_model_demo(kv: Any, target: str, namespace: str) -> bool:
    """A reads a document into the cache through the adapter, B asks about it. True when every
    answer hit the cache and equals the model alone's."""
    w = demo_model_worker
    say(f"A: its own process; loads {w.MODEL_NAME} (~20 s), then reads the document into the cache")
    a = run_model_worker("read-document", target, namespace)
    A = f"A (pid {a['pid']})"
    made = "created" if a["namespace_created"] else "found"
    say(
        f"{A}: loaded the model in {a['load_seconds']:.1f}s (it runs on {a['device']}); {made} namespace "
        f"{namespace} (model {a['fingerprint']})"
    )
    describe_namespace(kv, namespace)
    say(
        f"{A}: read a {count(a['tokens'])}-token document (pydoc topics {', '.join(a['topics'])}) through "
        f"the adapter in {a['prefill_seconds']:.1f}s: {count(a['hit_before'])} tokens were cached, "
        f"{count(a['pages_sealed'])} pages sealed; exited"
    )
    say(
        f"B: its own process; loads the model (~20 s), asks {len(w.QUESTIONS)} questions about the same document"
    )
    b = run_model_worker("ask", target, namespace)
    B = f"B (pid {b['pid']})"
    say(f"{B}: loaded the model in {b['load_seconds']:.1f}s (it runs on {b['device']})")
    ok = a["pid"] != b["pid"]
    for i, q in enumerate(b["answers"], 1):
        say(f"{B}: Q{i}: {q['question']}")
        say(
            f"{B}:   hit {count(q['hit_tokens'])} of {count(q['tokens'])} tokens written by pid {a['pid']}: "
            f"prefilled only {count(q['computed_tokens'])} tokens (its question is {q['question_tokens']}); "
            f"TTFT {q['ttft_cached_s']:.2f}s with kvstore vs {q['ttft_alone_s']:.2f}s without"
        )
        say(f"{B}:   answer: {q['answer']!r}")
        say(f"{B}:   same tokens as the model alone: {'yes' if q['same_as_model_alone'] else 'NO'}")
        ok = ok and q["hit_tokens"] > 0 and q["same_as_model_alone"]
    return ok


def run_demo(target: str, namespace: str, tokens: int, question: int, seed: int) -> bool:
    """A writes, B reads and shares; narrate both. True when B verified A's bytes."""
    a = run_worker("write", target, namespace, tokens, seed)
    A = f"A (pid {a['pid']})"
    say(f"{A}: lookup of its {count(a['tokens'])}-token prompt: {count(a['hit_before'])} tokens cached")
    say(
        f"{A}: wrote the KV of {count(a['written_tokens'])} tokens in place into {count(a['writable_pages'])} "
        f"pages ({human_bytes(a['written_bytes'])}) of the shared pool, "
        f"committed: {count(a['sealed_pages'])} pages sealed"
    )
    say(f"{A}: exited; its pages stay cached in the daemon")

    extra = (
        "--question-tokens",
        str(question),
        "--writer-pid",
        str(a["pid"]),
        "--writer-digest",
        a["digest"],
    )
    b = run_worker("read", target, namespace, tokens, seed, *extra)
    B = f"B (pid {b['pid']})"
    ok = b["zero_copy"] and b["digest_matches_writer"] and b["matches_recomputed"] and b["hit_tokens"] > 0
    verdict = "read zero-copy, bytes match" if ok else "BYTES DO NOT MATCH"
    say(
        f"{B}: hit {count(b['hit_tokens'])} of {count(b['tokens'])} tokens ({count(b['hit_pages'])} pages) "
        f"written by pid {a['pid']}, {verdict}"
    )
    if not ok:
        say(
            f"{B}: views into the pool: {b['zero_copy']}; digest equals A's: {b['digest_matches_writer']}; "
            f"equals the recomputed KV: {b['matches_recomputed']}"
        )
    shared = "A's slots" if b["cached_slots_are_writers"] else "slots differ from A's!"
    say(
        f"{B}: appended its {count(b['tokens'])} tokens: {count(b['cached_pages'])} pages CACHED ({shared}, "
        f"nothing to compute or write), {count(b['writable_pages'])} WRITABLE; wrote the KV of its "
        f"{count(b['written_tokens'])} new tokens, committed: {count(b['sealed_pages'])} pages sealed"
    )
    return ok and b["cached_slots_are_writers"] and a["pid"] != b["pid"]


def describe_namespace(kv: Any, wanted: str | None) -> str:
    """Pick the namespace (the one asked for, else `default`, else the first) and describe it."""
    infos = {i.name: i for i in kv.list_namespaces()}
    if not infos:
        raise DemoError("the daemon has no namespace")
    name = wanted or ("default" if "default" in infos else next(iter(infos)))
    if name not in infos:
        raise DemoError(f"namespace {name!r} does not exist; known: {', '.join(infos)}")
    d = namespace_dict(infos[name])
    where = f"a {d['device']} pool (epoch {d['pool_epoch']}, handed out by the daemon)"
    say(
        f"namespace {name}: {d['num_layers']} layers x {d['num_kv_heads']} KV heads x {d['head_dim']} dims, "
        f"{d['dtype']}, {d['page_tokens']} tokens a page ({human_bytes(d['page_bytes'])}), "
        f"{count(d['num_pages'])} pages ({human_bytes(d['pool_bytes'])}) in {where}"
    )
    return name


# ---------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python examples/demo.py",
        description="Start the daemon, share a prompt's KV between two processes zero-copy, show the "
        "stats, then serve until Ctrl-C.",
    )
    parser.add_argument(
        "--socket", help="daemon socket (default: as `kvstore serve` chooses it, as clients find it)"
    )
    parser.add_argument("--config", metavar="FILE", help="TOML config for the daemon (see docs/config.md)")
    parser.add_argument("--no-serve", action="store_true", help="stop the daemon after the demo (tests, CI)")
    variant = parser.add_mutually_exclusive_group()
    variant.add_argument(
        "--model", action="store_true", help="the SmolLM2-135M variant (default where the model is installed)"
    )
    variant.add_argument("--plain", action="store_true", help="the synthetic-KV variant (no model needed)")
    parser.add_argument(
        "--namespace",
        help="namespace to use (plain: default `default`, else the first; model: `smollm2-135m`, "
        "created if missing)",
    )
    parser.add_argument(
        "--tokens", type=int, default=2000, help="plain: prompt length A writes (default 2000)"
    )
    parser.add_argument("--question-tokens", type=int, default=37, help="plain: tokens B adds (default 37)")
    parser.add_argument("--seed", type=int, help="prompt seed (default 0 on a fresh daemon, else the pid)")
    parser.add_argument(
        "--log-level", default="warning", choices=("debug", "info", "warning", "error"), help="daemon logs"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tokens < 1 or args.question_tokens < 1:
        print(f"{PROG}: --tokens and --question-tokens must be >= 1", file=sys.stderr)
        return 2
    try:
        # The socket as the daemon will choose it: --socket > $KVSTORE_SOCKET > the config file's.
        given = args.socket and os.path.abspath(args.socket.removeprefix("unix:"))
        socket_path = given or default_socket_path(config_file=args.config)
    except ConfigFileError as e:
        print(f"{PROG}: config error: {e}", file=sys.stderr)
        return 2
    use_model = args.model
    if not args.model and not args.plain:
        from kvstore_client import hf

        use_model = hf.smollm2_missing() is None
    elif args.model:
        from kvstore_client import hf

        missing = hf.smollm2_missing()
        if missing is not None:
            print(f"{PROG}: --model needs the model: {missing}", file=sys.stderr)
            return 2
    target = f"unix:{socket_path}"
    signals = _StopSignals()
    previous = signal.signal(signal.SIGTERM, signals.handler)
    # Explicitly: a shell starts background jobs with SIGINT ignored, and Python keeps that.
    previous_int = signal.signal(signal.SIGINT, signals.handler)
    daemon: DaemonChild | None = None
    rc = 1
    try:
        if use_model:
            say(f"{PROG}: two processes running SmolLM2-135M share one KV cache through the daemon")
        else:
            say(f"{PROG}: two processes share one KV cache through the daemon, zero-copy")
        if _health(target, timeout=5.0) == SERVING:
            say(f"daemon: one is already serving on {target}; using it")
        else:
            daemon = DaemonChild(socket_path, args.config, args.log_level)
            say(f"daemon: SERVING on {target} after {daemon.start():.2f}s")
        seed = args.seed if args.seed is not None else (0 if daemon else os.getpid())
        with connect(target, timeout_s=30.0) as kv:
            if use_model:
                say()
                ok = run_model_demo(kv, target, args.namespace or demo_model_worker.NAMESPACE)
            else:
                namespace = describe_namespace(kv, args.namespace)
                say()
                ok = run_demo(target, namespace, args.tokens, args.question_tokens, seed)
            say()
            say(render_stats(kv.stats(), target))
            say()
        if not ok:
            raise DemoError(
                "B's answers did not use A's cache or differ from the model's (see above)"
                if use_model
                else "B could not verify A's pages (see above)"
            )
        rc = 0 if daemon is None or args.no_serve else serve(daemon, target)
    except (KeyboardInterrupt, _Stop):
        say(f"{PROG}: interrupted")
        rc = 130
    except BrokenPipeError:  # `python examples/demo.py | head`: stop quietly, the daemon too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        rc = 1
    except BadConfig as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        rc = 2
    except (DemoError, KVStoreClientError, subprocess.TimeoutExpired) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        rc = 1
    finally:
        signals.stopping = True  # (already, if a signal stopped it: here for the other ways out)
        try:
            status = daemon.stop() if daemon is not None else None
        finally:
            signal.signal(signal.SIGINT, previous_int)
            signal.signal(signal.SIGTERM, previous)
        if status is not None:
            say(f"daemon: stopped (exit status {status})")
            if status != 0 and rc == 0:
                rc = 1
    if daemon is None and rc == 0 and not args.no_serve:
        say(f"the daemon on {target} was not started by this demo and keeps serving")
    return rc


def serve(daemon: DaemonChild, target: str) -> int:
    """Keep serving until Ctrl-C / SIGTERM (exit 0 after a clean stop) or the daemon dies."""
    try:
        say(f"daemon serving on {target} — press Ctrl-C to stop")
        status = daemon.wait()
    except (KeyboardInterrupt, _Stop):
        return 0
    print(f"{PROG}: error: the daemon exited on its own with status {status}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
