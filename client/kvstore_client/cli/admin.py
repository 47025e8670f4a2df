"""`kvstore-admin`: the operator's view of a running daemon (stats, namespaces, sessions,
eviction, health).

It talks to the daemon only over gRPC, through `kvstore_client`, and opens no session: an
operator looking at the daemon must not show up as one of its clients. Every failure is one
line on stderr (`error: <CODE>: <message>`) and exit status 1; a usage error is status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from .._core import KEEPALIVE_S
from ..channel import TLS, TOKEN_ENV, bearer, open_sync
from ..client import Client
from ..errors import KVStoreClientError
from ..results import Stats
from ..target import ConfigFileError
from ..version import version_line
from . import admin_explain
from .fmt import (
    PROG,
    count,
    human_bytes,
    human_duration,
    one_line,
    parse_bytes,
    parse_tokens,
    positive_int,
    positive_seconds,
    table,
)
from .stats_rates import rates, render_rates
from .stats_view import namespace_dict, render_stats, stats_dict

WATCH_S = 2.0  # `stats --watch` without SECONDS


def cmd_stats(kv: Client, args: argparse.Namespace) -> int:
    if args.count and not args.watch:
        print("error: --count needs --watch", file=sys.stderr)
        return 2
    readings: list[Stats] = []  # the last two: --watch shows rates over the interval between them

    def show() -> None:
        stats = kv.stats(args.namespace)
        readings[:] = [*readings[-1:], stats]
        r = rates(readings[0], stats) if len(readings) == 2 else None
        if args.json:
            out = stats_dict(stats) | ({"rates": r} if r is not None else {})
            print(json.dumps(out, indent=None if args.watch else 2), flush=True)
            return
        if args.watch and sys.stdout.isatty():
            print("\x1b[H\x1b[2J", end="")  # home + clear: redraw in place
        print(render_stats(stats, kv.target), flush=True)
        if args.watch:
            print("\n".join(render_rates(r, first=len(readings) == 1)))
            print(f"\nevery {args.watch:g}s, Ctrl-C to stop ({time.strftime('%H:%M:%S')})", flush=True)

    show()
    shown = 1
    if not args.watch:
        return 0
    # Ctrl-C sets a flag instead of raising KeyboardInterrupt wherever the main thread is: one
    # raised inside a gRPC call can leave the channel's state half-updated, and closing the
    # channel afterwards hangs (the test of this command once hung on exit that way).
    interrupted = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.set())
    try:
        # the operator's chosen refresh interval; --count ends it after that many readings
        while shown != args.count and not interrupted.wait(args.watch):
            if not args.json and not sys.stdout.isatty():
                print()
            show()
            shown += 1
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0


# ---------------------------------------------------------------- namespaces, sessions


def cmd_namespaces(kv: Client, args: argparse.Namespace) -> int:
    infos = kv.list_namespaces()
    if args.json:
        print(json.dumps({"namespaces": {i.name: namespace_dict(i) for i in infos}}, indent=2))
        return 0
    if not infos:
        print("no namespaces")
        return 0
    rows = []
    for info in infos:
        d = namespace_dict(info)
        rows.append(
            (
                info.name,
                f"{d['num_layers']}x{d['num_kv_heads']}x{d['head_dim']}",
                d["dtype"],
                d["page_tokens"],
                human_bytes(d["page_bytes"]),
                d["num_pages"],
                human_bytes(d["pool_bytes"]),
                d["policy"],
                f"{d['device']} {d['pool_epoch']}",
            )
        )
    header = ("NAMESPACE", "LAYERSxHEADSxDIM", "DTYPE", "PAGE TOKENS", "PAGE", "PAGES", "POOL")
    print(table((*header, "POLICY", "POOL EPOCH"), rows))
    fingerprints = [(i.name, i.model_fingerprint) for i in infos if i.model_fingerprint]
    for name, fp in fingerprints:
        print(f"{name}: model {fp}")
    for info in infos:
        tp = info.tier_precision
        if (tp.dtype or "fp") != "fp" or tp.schedule:
            bound = f", error bound {tp.error_bound:g}" if tp.error_bound else ""
            schedule = f" (first layers {tp.schedule})" if tp.schedule else ""
            print(f"{info.name}: stored below the pool as {tp.dtype or 'fp'}{schedule}{bound}")
    return 0


def cmd_sessions(kv: Client, args: argparse.Namespace) -> int:
    sessions = kv.list_sessions()
    if args.json:
        keys = ("session_id", "client_name", "sequences", "pins", "idle_s", "stream_attached")
        print(json.dumps({"sessions": [{k: getattr(s, k) for k in keys} for s in sessions]}, indent=2))
        return 0
    if not sessions:
        print("no sessions")
        return 0
    rows = [
        (
            s.session_id,
            s.client_name,
            s.sequences,
            s.pins,
            human_duration(s.idle_s),
            "yes" * s.stream_attached,
        )
        for s in sessions
    ]
    print(table(("SESSION", "CLIENT", "SEQUENCES", "PINS", "IDLE", "STREAM"), rows))
    return 0


# ---------------------------------------------------------------- evict, health


def cmd_evict(kv: Client, args: argparse.Namespace) -> int:
    if args.all:
        result, what = kv.evict(args.namespace, all=True), "all unpinned pages"
    elif args.bytes is not None:
        result, what = kv.evict(args.namespace, nbytes=args.bytes), f"at least {human_bytes(args.bytes)}"
    else:
        result = kv.evict(args.namespace, prefix=args.prefix_tokens, extra_keys=args.extra_keys)
        what = f"the prefix of {len(args.prefix_tokens)} tokens and every page extending it"
    if args.json:
        print(json.dumps({"namespace": args.namespace, **dataclasses.asdict(result)}, indent=2))
        return 0
    skipped = f"; {count(result.pages_skipped_pinned)} pinned pages skipped" * bool(
        result.pages_skipped_pinned
    )
    print(
        f"evicted {count(result.pages_evicted)} pages ({human_bytes(result.bytes_freed)}) "
        f"from namespace {args.namespace} ({what}){skipped}"
    )
    return 0


def cmd_delete_namespace(kv: Client, args: argparse.Namespace) -> int:
    result = kv.delete_namespace(args.namespace, force=args.force)
    if args.json:
        print(json.dumps({"namespace": args.namespace, **dataclasses.asdict(result)}, indent=2))
        return 0
    released = f" ({result.sequences_released} sequences and {result.pins_released} pins released)"
    print(f"deleted namespace {args.namespace}{released * bool(args.force)}")
    return 0


def cmd_flush(kv: Client, args: argparse.Namespace) -> int:
    result = kv.flush()
    if args.json:
        print(json.dumps(dataclasses.asdict(result), indent=2))
        return 0
    print(
        f"flushed: {count(result.pages_written)} pages written, {count(result.disk_pages)} pages on disk, "
        f"committed and fsynced in {result.seconds:.2f}s"
    )
    return 0


def cmd_health(kv: Client, args: argparse.Namespace) -> int:
    status = kv.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1


# ---------------------------------------------------------------- parser and main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect and manage a running kvstore daemon over gRPC.",
        epilog="Exit status: 0 ok, 1 the daemon refused or could not be reached, 2 bad usage.",
    )
    parser.add_argument("--version", action="version", version=version_line(PROG))
    parser.add_argument(
        "--target",
        help="daemon address: a socket path, unix:PATH or HOST:PORT (default: $KVSTORE_SOCKET, else "
        "`socket` in the daemon's config file $KVSTORE_CONFIG, else the daemon's default socket)",
    )
    parser.add_argument(
        "--token",
        help=f"bearer token of a daemon with a tokens file (default: ${TOKEN_ENV}; an argument is visible "
        "to other users in the process list, the variable is not)",
    )
    parser.add_argument("--tls-ca", metavar="PEM", help="CA bundle of a TLS listener (HOST:PORT targets)")
    parser.add_argument(
        "--tls-cert", metavar="PEM", help="client certificate, for a daemon that asks for one"
    )
    parser.add_argument("--tls-key", metavar="PEM", help="the client certificate's private key")
    parser.add_argument(
        "--timeout", type=positive_seconds, default=10.0, help="deadline of each call, seconds (default 10)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Callable[[Client, argparse.Namespace], int], **kw: Any) -> Any:
        sub = commands.add_parser(name, **kw)
        sub.set_defaults(run=run)
        return sub

    stats = command("stats", cmd_stats, help="counters per namespace: pages, hit rate, evictions")
    stats.add_argument("--namespace", default="", metavar="NS", help="only this namespace")
    stats.add_argument("--json", action="store_true", help="one JSON object (one per line with --watch)")
    stats.add_argument(
        "--watch",
        type=positive_seconds,
        nargs="?",
        const=WATCH_S,
        metavar="SECONDS",
        help=f"refresh every SECONDS (default {WATCH_S:g}), with rates over each interval: lookups/s, "
        "hit rate, puts/s, bytes/s in and out, evictions/s, RPC errors/s by code",
    )
    stats.add_argument(
        "--count",
        type=positive_int,
        metavar="N",
        help="with --watch: stop after N readings (exit 0), e.g. for a script",
    )

    ns = command("namespaces", cmd_namespaces, help="geometry, dtype, pool size and epoch, policy")
    ns.add_argument("--json", action="store_true")
    delete = command(
        "delete-namespace",
        cmd_delete_namespace,
        help="delete a namespace and unlink its pool",
        description="Refused while a session holds a sequence or pin in it, unless --force "
        "(which releases them). Its pages in the host and disk tiers are dropped too.",
    )
    delete.add_argument("namespace", metavar="NS")
    delete.add_argument("--force", action="store_true", help="release live sequences and pins first")
    delete.add_argument("--json", action="store_true")
    sessions = command("sessions", cmd_sessions, help="open client sessions")
    sessions.add_argument("--json", action="store_true")

    evict = command("evict", cmd_evict, help="drop unpinned cached pages", description="Never a pinned page.")
    evict.add_argument("--namespace", required=True, metavar="NS")
    target = evict.add_mutually_exclusive_group(required=True)
    target.add_argument("--all", action="store_true", help="every unpinned sealed page")
    target.add_argument(
        "--bytes", type=parse_bytes, metavar="N", help="at least N bytes, policy's choice (e.g. 64MiB)"
    )
    target.add_argument(
        "--prefix-tokens",
        type=parse_tokens,
        metavar="IDS",
        help="the page ending this prefix and every page extending it (e.g. 1,2,3)",
    )
    evict.add_argument(
        "--extra-keys",
        type=bytes.fromhex,
        default=b"",
        metavar="HEX",
        help="extra_keys the prefix was stored under",
    )
    evict.add_argument("--json", action="store_true")

    flush = command(
        "flush",
        cmd_flush,
        help="write every sealed page to the disk tier and fsync",
        description="Returns once every sealed page (pool and host tier) is committed and fsynced on "
        "disk: a kill -9 of the daemon after it loses none of them. Needs a disk tier.",
    )
    flush.add_argument("--json", action="store_true")

    health = command("health", cmd_health, help="SERVING or NOT_SERVING; exit 0 only when SERVING")
    health.add_argument("--service", default="", help="a service name, e.g. kvstore.v1.KVStore")

    admin_explain.add_commands(command)
    return parser


def connect(target: str | None, timeout_s: float, token: str | None = None, tls: TLS | None = None) -> Client:
    """A client with no session: admin calls need none, and an operator is not a client."""
    # The library's channel options: keepalive pings, so a stopped daemon fails the call.
    channel, resolved = open_sync(target, KEEPALIVE_S, token, tls)
    return Client(channel, resolved, timeout_s=timeout_s, token=bearer(token))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tls = TLS(args.tls_ca, args.tls_cert, args.tls_key) if args.tls_ca else None
    if tls is None and (args.tls_cert or args.tls_key):
        print("error: --tls-cert and --tls-key need --tls-ca (TLS)", file=sys.stderr)
        return 2
    try:
        kv = connect(args.target, args.timeout, args.token, tls)
    except ConfigFileError as e:  # no --target, no $KVSTORE_SOCKET, and $KVSTORE_CONFIG is unreadable
        print(f"error: where is the daemon? {one_line(str(e))}", file=sys.stderr)
        return 1
    except OSError as e:  # a TLS file
        print(f"error: cannot read {e.filename}: {e.strerror}", file=sys.stderr)
        return 1
    except ValueError as e:  # grpc refuses a malformed target; a certificate without its key
        print(f"error: bad --target {args.target!r} or TLS files: {one_line(str(e))}", file=sys.stderr)
        return 1
    try:
        return args.run(kv, args)
    except KVStoreClientError as e:
        # Without a session, an unreachable daemon maps to "no kvstore daemon answered at ...".
        if e.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and (
            e.details.startswith("no kvstore daemon answered")
        ):
            print(f"error: {_unreachable(e.details, kv.target)}", file=sys.stderr)
        else:
            print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `kvstore-admin stats | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        kv.close()


def _unreachable(details: str, target: str) -> str:
    """'no kvstore daemon answered at unix:/x (UNAVAILABLE: ...: No such file or directory)' ->
    the same, with only the transport's last reason kept."""
    reason = re.search(r"\((?:[A-Z_]+: )?(.*)\)", details)
    why = one_line(reason.group(1)) if reason else ""
    why = why.rsplit(": ", 1)[-1] if why else ""
    return f"no kvstore daemon answered at {target}" + (f" ({why})" if why else "") + "; is it running?"


if __name__ == "__main__":
    raise SystemExit(main())
