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
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from kvstore_client import Client, default_target, dtype_name
from kvstore_client.errors import KVStoreClientError
from kvstore_client.target import resolve_target
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

from kvstore.config import format_size

PROG = "kvstore-admin"
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


# ---------------------------------------------------------------- formatting


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, the same text as the daemon's config and logs)."""
    return format_size(int(n))


def human_duration(seconds: float) -> str:
    """3725.2 -> '1h 02m 05s'."""
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {s:02d}s"
    if minutes:
        return f"{minutes}m {s:02d}s"
    return f"{seconds:.1f}s"


def parse_bytes(text: str) -> int:
    """'64MiB', '64M', '1.5 GiB', '4096' -> bytes (k/m/g/t are powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m or (m.group(3) and not m.group(2) and m.group(3) != "b"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use e.g. 4096, 64MiB, 1.5GiB")
    return math.ceil(float(m.group(1)) * _UNITS[m.group(2)])


def parse_tokens(text: str) -> list[int]:
    """'1,2,3' or '1 2 3' -> [1, 2, 3]."""
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    try:
        tokens = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of token ids like 1,2,3") from None
    if not tokens:
        raise argparse.ArgumentTypeError("need at least one token id")
    return tokens


def hit_rate(hit: int, miss: int) -> float | None:
    """hit / (hit + miss); None before any token was looked up."""
    return hit / (hit + miss) if hit + miss else None


def _n(x: int) -> str:
    return f"{x:,}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned text columns, two spaces apart; numbers right-aligned."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(isinstance(r[i], int | float) for r in rows) for i in range(len(header))]
    lines = []
    for row in cells:
        out = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True)]
        lines.append("  ".join(out).rstrip())
    return "\n".join(lines)


def _dtype_name(dtype: int) -> str:
    try:
        return dtype_name(dtype)
    except KVStoreClientError:
        return pb.DType.Name(dtype) if dtype in pb.DType.values() else str(dtype)


# ---------------------------------------------------------------- stats


_STATS_FIELDS = (
    *("pages_total", "pages_free", "pages_reserved", "pages_sealed", "pages_pinned", "hit_tokens"),
    *("miss_tokens", "evictions", "lookups", "deduplicated_pages", "sequences", "page_bytes", "policy"),
)


def stats_dict(stats: pb.StatsResponse) -> dict[str, Any]:
    """The `stats --json` object: counters as the daemon reports them, plus `hit_rate`."""
    namespaces = {
        ns.name: {k: getattr(ns, k) for k in _STATS_FIELDS}
        | {"hit_rate": hit_rate(ns.hit_tokens, ns.miss_tokens)}
        for ns in stats.namespaces
    }
    out: dict[str, Any] = {
        "version": stats.version,
        "uptime_s": round(stats.uptime_s, 3),
        "sessions": stats.sessions,
        "namespaces": namespaces,
    }
    if stats.HasField("tiers"):
        out["tiers"] = MessageToDict(
            stats.tiers, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        for key, value in out["tiers"].items():  # protobuf's JSON writes 64-bit ints as strings
            if isinstance(value, str) and value.isdigit():
                out["tiers"][key] = int(value)
    return out


def render_tiers(t: pb.TierStats) -> list[str]:
    """The tiers below the pools, for the stats table."""
    rows = []
    if t.host_capacity_bytes:
        used = t.host_bytes_used / t.host_capacity_bytes
        rows.append(
            (
                "host tier",
                f"{human_bytes(t.host_capacity_bytes)}: {_pct(used)} used, {_n(t.host_pages)} pages",
            )
        )
    if t.disk_capacity_bytes:
        used = t.disk_bytes_used / t.disk_capacity_bytes
        full = f", full {_n(t.disk_full_events)} times" if t.disk_full_events else ""
        queued = f", {_n(t.disk_queued)} writes queued" if t.disk_queued else ""
        rows.append(
            (
                "disk tier",
                f"{human_bytes(t.disk_capacity_bytes)}: {_pct(used)} used, {_n(t.disk_pages)} pages"
                f"{full}{queued}{' (write-through)' * t.write_through}",
            )
        )
        if t.reindex_running:
            rows.append(("re-index", f"running: {_n(t.reindex_done)} of {_n(t.reindex_total)} pages"))
    rows += [
        (
            "moved",
            f"{_n(t.demoted_pages)} pages demoted, {_n(t.promoted_pages)} promoted "
            f"({_n(t.prefetched_pages)} prefetched, {_n(t.promotion_failures)} failed)",
        ),
        ("corrupt", f"{_n(t.corrupt_pages)} pages dropped (never served)"),
        ("swapped", f"{_n(t.swapped_pages)} pages of swapped-out sequences"),
    ]
    width = max(len(k) for k, _ in rows)
    return ["", "tiers", *(f"  {k.ljust(width)}  {v}" for k, v in rows)]


def render_stats(stats: pb.StatsResponse, target: str = "") -> str:
    """The human-readable stats: a header line, then one small table per namespace."""
    where = f" at {target}" if target else ""
    out = [
        f"kvstore {stats.version or '?'}{where}: up {human_duration(stats.uptime_s)}, "
        f"{stats.sessions} session{'s' * (stats.sessions != 1)}"
    ]
    for ns in stats.namespaces:
        total = ns.pages_total
        used = (total - ns.pages_free) / total if total else 0.0
        rate = hit_rate(ns.hit_tokens, ns.miss_tokens)
        rows = [
            ("policy", ns.policy),
            (
                "page size",
                f"{human_bytes(ns.page_bytes)}  (KV capacity {human_bytes(ns.page_bytes * total)})",
            ),
            (
                "pages",
                f"{_n(total)} total: {_n(ns.pages_free)} free, {_n(ns.pages_reserved)} reserved, "
                f"{_n(ns.pages_sealed)} sealed ({_n(ns.pages_pinned)} pinned)",
            ),
            ("used", f"{_pct(used)}  ({_n(total - ns.pages_free)} of {_n(total)} pages)"),
            (
                "hit rate",
                f"{_pct(rate)}  ({_n(ns.hit_tokens)} hit / {_n(ns.miss_tokens)} miss tokens "
                f"in {_n(ns.lookups)} lookup{'s' * (ns.lookups != 1)})",
            ),
            ("evictions", f"{_n(ns.evictions)} pages"),
            ("deduplicated", f"{_n(ns.deduplicated_pages)} pages"),
            ("sequences", f"{_n(ns.sequences)} open"),
        ]
        width = max(len(k) for k, _ in rows)
        out += ["", f"namespace {ns.name}", *(f"  {k.ljust(width)}  {v}" for k, v in rows)]
    if not stats.namespaces:
        out += ["", "no namespaces"]
    if stats.HasField("tiers"):
        out += render_tiers(stats.tiers)
    return "\n".join(out)


def cmd_stats(kv: Client, args: argparse.Namespace) -> int:
    def show() -> None:
        stats = kv.stats(args.namespace)
        if args.json:
            print(json.dumps(stats_dict(stats), indent=None if args.watch else 2), flush=True)
            return
        if args.watch and sys.stdout.isatty():
            print("\x1b[H\x1b[2J", end="")  # home + clear: redraw in place
        print(render_stats(stats, kv.target), flush=True)
        if args.watch:
            print(f"\nevery {args.watch:g}s, Ctrl-C to stop ({time.strftime('%H:%M:%S')})", flush=True)

    show()
    if not args.watch:
        return 0
    # Ctrl-C sets a flag instead of raising KeyboardInterrupt wherever the main thread is: one
    # raised inside a gRPC call can leave the channel's state half-updated, and closing the
    # channel afterwards hangs (the test of this command once hung on exit that way).
    interrupted = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.set())
    try:
        while not interrupted.wait(args.watch):  # the operator's chosen refresh interval
            if not args.json and not sys.stdout.isatty():
                print()
            show()
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0


# ---------------------------------------------------------------- namespaces, sessions


def namespace_dict(info: pb.NamespaceInfo) -> dict[str, Any]:
    g, p = info.geometry, info.pool
    return {
        "num_layers": g.num_layers,
        "num_kv_heads": g.num_kv_heads,
        "head_dim": g.head_dim,
        "dtype": _dtype_name(g.dtype),
        "page_tokens": g.page_tokens,
        "vocab_size": g.vocab_size,
        "page_bytes": p.page_bytes,
        "page_stride": p.page_stride,
        "num_pages": p.num_pages,
        "pool_bytes": p.nbytes,
        "device": p.device,
        "shm_segment": f"/dev/shm/{p.shm_name}" if p.shm_name else "",
        "layout": p.layout,
        "page_shape": list(p.page_shape),
        "policy": info.policy,
        "model_fingerprint": info.model_fingerprint,
    }


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
                d["shm_segment"] or d["device"],
            )
        )
    header = ("NAMESPACE", "LAYERSxHEADSxDIM", "DTYPE", "PAGE TOKENS", "PAGE", "PAGES", "POOL")
    print(table((*header, "POLICY", "SEGMENT"), rows))
    fingerprints = [(i.name, i.model_fingerprint) for i in infos if i.model_fingerprint]
    for name, fp in fingerprints:
        print(f"{name}: model {fp}")
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
    skipped = f"; {_n(result.pages_skipped_pinned)} pinned pages skipped" * bool(result.pages_skipped_pinned)
    print(
        f"evicted {_n(result.pages_evicted)} pages ({human_bytes(result.bytes_freed)}) "
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
        f"flushed: {_n(result.pages_written)} pages written, {_n(result.disk_pages)} pages on disk, "
        f"committed and fsynced in {result.seconds:.2f}s"
    )
    return 0


def cmd_health(kv: Client, args: argparse.Namespace) -> int:
    status = kv.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1


# ---------------------------------------------------------------- parser and main


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a number of seconds > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect and manage a running kvstore daemon over gRPC.",
        epilog="Exit status: 0 ok, 1 the daemon refused or could not be reached, 2 bad usage.",
    )
    parser.add_argument(
        "--target",
        default=default_target(),
        help="daemon address: a socket path, unix:PATH or HOST:PORT "
        "(default %(default)s, from $KVSTORE_SOCKET when set)",
    )
    parser.add_argument(
        "--timeout", type=_positive_seconds, default=10.0, help="deadline of each call, seconds (default 10)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Callable[[Client, argparse.Namespace], int], **kw: Any) -> Any:
        sub = commands.add_parser(name, **kw)
        sub.set_defaults(run=run)
        return sub

    stats = command("stats", cmd_stats, help="counters per namespace: pages, hit rate, evictions")
    stats.add_argument("--namespace", default="", metavar="NS", help="only this namespace")
    stats.add_argument("--json", action="store_true", help="one JSON object (one per line with --watch)")
    stats.add_argument("--watch", type=_positive_seconds, metavar="SECONDS", help="refresh every SECONDS")

    ns = command("namespaces", cmd_namespaces, help="geometry, dtype, pool size, shm segment, policy")
    ns.add_argument("--json", action="store_true")
    delete = command(
        "delete-namespace",
        cmd_delete_namespace,
        help="delete a namespace and unlink its pool",
        description="Refused while a session holds a sequence or pin in it, unless --force "
        "(which releases them). Its pages in the host and disk tiers are kept.",
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

    from kvstore.cli import admin_explain  # explain, mrc (it imports this module's helpers)

    admin_explain.add_commands(command)
    return parser


def _one_line(text: str) -> str:
    return " ".join(text.split())


def connect(target: str, timeout_s: float) -> Client:
    """A client with no session: admin calls need none, and an operator is not a client."""
    resolved = resolve_target(target)
    return Client(grpc.insecure_channel(resolved), resolved, timeout_s=timeout_s)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        kv = connect(args.target, args.timeout)
    except ValueError as e:  # grpc refuses a malformed target
        print(f"error: bad --target {args.target!r}: {_one_line(str(e))}", file=sys.stderr)
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
            print(f"error: {_one_line(str(e))}", file=sys.stderr)
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
    why = _one_line(reason.group(1)) if reason else ""
    why = why.rsplit(": ", 1)[-1] if why else ""
    return f"no kvstore daemon answered at {target}" + (f" ({why})" if why else "") + "; is it running?"


if __name__ == "__main__":
    raise SystemExit(main())
