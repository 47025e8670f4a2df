"""`kvstore-admin explain` (why was this a miss) and `kvstore-admin mrc` (the hit rate the
daemon would have at other capacities). Registered by `admin.build_parser`;
errors follow its rules (one line on stderr, status 1; usage errors status 2)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

from ..client import Client
from .fmt import PROG, count, human_bytes, parse_tokens, table

# ---------------------------------------------------------------- explain


def read_tokens_file(path: str) -> list[int]:
    """Token ids separated by whitespace and/or commas, from a file ('-' = stdin)."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as e:
        raise argparse.ArgumentTypeError(f"--tokens-file {path}: {e.strerror or e}") from None
    bad = re.search(r"[^\d\s,-]", text)
    if bad:
        raise argparse.ArgumentTypeError(
            f"--tokens-file {path}: {bad.group()!r} at offset {bad.start()} is not part of a token id; "
            "give integers separated by whitespace or commas"
        )
    try:
        return parse_tokens(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"--tokens-file {path}: {e}") from None


def verdict_name(v: int) -> str:
    return pb.ExplainVerdict.Name(v).lower() if v else ""


def explain_dict(r: pb.ExplainResponse) -> dict[str, Any]:
    """The `explain --json` object."""
    return {
        "namespace": r.namespace,
        "policy": r.policy,
        "model_fingerprint": r.model_fingerprint,
        "page_tokens": r.page_tokens,
        "num_tokens": r.num_tokens,
        "hit_tokens": r.hit_tokens,
        "summary": r.summary,
        "pages": [
            {
                "index": p.index,
                "token_start": p.token_start,
                "token_count": p.token_count,
                "block_hash": p.block_hash.hex(),
                "verdict": verdict_name(p.verdict),
                "where": verdict_name(p.where),
                "evicted_unix_ms": p.evicted_unix_ms,
                "evicted_by": p.evicted_by,
                "evicted_for": p.evicted_for,
                "other_namespace": p.other_namespace,
                "detail": p.detail,
            }
            for p in r.pages
        ],
    }


def render_explain(r: pb.ExplainResponse) -> str:
    rows = []
    for p in r.pages:
        verdict = verdict_name(p.verdict)
        if p.where:
            verdict += f" ({verdict_name(p.where)})"
        rows.append((p.index, f"{p.token_start}-{p.token_start + p.token_count - 1}", verdict, p.detail))
    out = [table(("PAGE", "TOKENS", "VERDICT", "DETAIL"), rows)] if rows else []
    return "\n".join([*out, *([""] if out else []), r.summary])


def cmd_explain(kv: Client, args: argparse.Namespace) -> int:
    tokens = args.tokens
    if tokens is None:
        try:
            tokens = read_tokens_file(args.tokens_file)
        except argparse.ArgumentTypeError as e:
            print(f"{PROG} explain: error: {e}", file=sys.stderr)
            return 2
    r = kv.explain(args.namespace, tokens, args.extra_keys, model_fingerprint=args.model_fingerprint)
    print(json.dumps(explain_dict(r), indent=2) if args.json else render_explain(r))
    return 0


# ---------------------------------------------------------------- mrc


def _numbers(kind: Callable[[str], Any], what: str) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            values = [kind(p) for p in re.split(r"[,\s]+", text.strip()) if p]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a list of {what} like 1,2,3") from None
        if not values:
            raise argparse.ArgumentTypeError(f"need at least one of {what}")
        return values

    return parse


def mrc_dict(r: pb.MrcResponse, observed: float | None) -> dict[str, Any]:
    """The `mrc --json` object."""
    return {
        "namespace": r.namespace,
        "policy": r.policy,
        "pool_pages": r.pool_pages,
        "page_bytes": r.page_bytes,
        "sample_rate": r.sample_rate,
        "sampled_accesses": r.sampled_accesses,
        "accesses": r.accesses,
        "sampled_blocks": r.sampled_blocks,
        "observed_hit_rate": observed,
        "points": [
            {
                "capacity_pages": p.capacity_pages,
                "capacity_bytes": p.capacity_bytes,
                "hit_rate": p.hit_rate,
                "current": p.current,
            }
            for p in r.points
        ],
    }


def render_mrc(r: pb.MrcResponse, observed: float | None) -> str:
    head = (
        f"namespace {r.namespace} (policy {r.policy}, {count(r.pool_pages)} pages x {human_bytes(r.page_bytes)}): "
        f"{count(r.sampled_accesses)} of {count(r.accesses)} block accesses sampled "
        f"(rate {100 * r.sample_rate:.3g}%, {count(r.sampled_blocks)} distinct blocks)"
    )
    rows = [
        (
            p.capacity_pages,
            human_bytes(p.capacity_bytes),
            f"{100 * p.hit_rate:.1f}%",
            "<- the pool now" if p.current else "",
        )
        for p in r.points
    ]
    out = [head, "", table(("CAPACITY PAGES", "CAPACITY", "EST. HIT RATE", ""), rows)]
    if observed is not None:
        out += ["", f"observed hit rate of lookups (tokens, all time): {100 * observed:.1f}%"]
    out.append(
        "estimates: LRU of each capacity under prefix semantics (SHARDS sample of the daemon's accesses)"
    )
    return "\n".join(out)


def plot_mrc(r: pb.MrcResponse, path: str) -> str | None:
    """Write the curve to a PNG; returns why not (matplotlib missing) or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "--plot needs matplotlib (pip install matplotlib); no plot written"
    xs = [p.capacity_pages for p in r.points]
    ys = [p.hit_rate for p in r.points]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(xs, ys, marker="o", label="estimated LRU hit rate")
    ax.axvline(r.pool_pages, color="grey", linestyle="--", label=f"pool now ({r.pool_pages} pages)")
    ax.set_xlabel(f"capacity (pages of {human_bytes(r.page_bytes)})")
    ax.set_ylabel("block hit rate")
    ax.set_ylim(0, max(0.05, min(1.0, max(ys, default=0) * 1.1)))
    ax.set_title(f"{r.namespace}: miss-ratio curve ({r.sampled_accesses:,} sampled accesses)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def cmd_mrc(kv: Client, args: argparse.Namespace) -> int:
    r = kv.mrc(args.namespace, args.capacities or (), args.fractions or ())
    stats = kv.stats(args.namespace).namespaces
    observed = stats[0].hit_rate if stats else None
    print(json.dumps(mrc_dict(r, observed), indent=2) if args.json else render_mrc(r, observed))
    if args.plot:
        why = plot_mrc(r, args.plot)
        if why is not None:
            print(f"{PROG} mrc: {why}", file=sys.stderr)
        elif not args.json:
            print(f"wrote {args.plot}")
    return 0


# ---------------------------------------------------------------- registration


def add_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `explain` and `mrc` through build_parser's `command(name, run, **kw)`."""
    explain = command(
        "explain",
        cmd_explain,
        help="why was this a miss: each page of a prompt, hit (which tier) or why not",
        description="For each full page of the prompt: hit_pool/hit_host/hit_disk/in_flight, or "
        "never_stored, evicted (when, by which policy, to make room for what), dropped_corrupt, "
        "other_namespace, other_model, after_miss. Read-only.",
    )
    explain.add_argument("--namespace", required=True, metavar="NS")
    source = explain.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokens", type=parse_tokens, metavar="IDS", help="token ids, e.g. 1,2,3")
    source.add_argument(
        "--tokens-file", metavar="FILE", help="token ids separated by whitespace or commas ('-': stdin)"
    )
    explain.add_argument(
        "--extra-keys", type=bytes.fromhex, default=b"", metavar="HEX", help="extra_keys of the prompt"
    )
    explain.add_argument(
        "--model-fingerprint", default="", metavar="FP", help="the model the prompt is for (empty: any)"
    )
    explain.add_argument("--json", action="store_true", help="one JSON object")

    mrc = command(
        "mrc",
        cmd_mrc,
        help="estimated hit rate at other capacities, from the daemon's sampled accesses",
        description="A miss-ratio curve from a spatially hashed sample (SHARDS) of the namespace's "
        "block accesses: the hit rate an LRU pool of each size would have had. Default capacities: "
        "0.1x to 4x the pool.",
    )
    mrc.add_argument("--namespace", required=True, metavar="NS")
    mrc.add_argument(
        "--capacities",
        type=_numbers(int, "page counts"),
        metavar="PAGES",
        help="capacities in pages, e.g. 64,128",
    )
    mrc.add_argument(
        "--fractions", type=_numbers(float, "fractions"), metavar="F", help="of the pool, e.g. 0.5,1,2"
    )
    mrc.add_argument("--json", action="store_true", help="one JSON object")
    mrc.add_argument("--plot", metavar="FILE.png", help="write the curve as a PNG (needs matplotlib)")
