"""The two inference processes of examples/demo.py, each run as its own OS process:

    python examples/demo_worker.py write --target T --namespace NS --tokens N --seed S
    python examples/demo_worker.py read  --target T --namespace NS --tokens N --seed S \\
        --question-tokens Q --writer-pid PID --writer-digest HEX

`write` (process A) computes KV for a prompt and writes it straight into its pages of the
shared pool, then commits. `read` (process B) looks the prompt up, reads A's pages through
its own mapping of the pool (torch views, no copy) and checks them byte for byte, then
appends the same prompt plus a question of its own and gets A's pages back as CACHED.

Each prints one JSON report on stdout for examples/demo.py to narrate. Only `kvstore_client`
is used: this is what an inference engine would do.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import kvstore_client
import torch
from kvstore_client import Namespace

_VOCAB = 32000  # ids look like a real tokenizer's


def prompt_tokens(seed: int, n: int, offset: int = 0, vocab_size: int = 0) -> torch.Tensor:
    """Token ids `offset..offset+n` of the demo's deterministic text for `seed`."""
    i = torch.arange(offset, offset + n, dtype=torch.int64)
    return (i * 2_654_435_761 + seed * 40_503 + 12_345) % 2_147_483_629 % (vocab_size or _VOCAB)


def fake_kv(ns: Namespace, tokens: torch.Tensor, start: int) -> torch.Tensor:
    """Deterministic stand-in for a model's KV of `tokens` at positions `start...`:
    `[layers, 2, len(tokens), heads, head_dim]` in the pool's dtype. Integer arithmetic, then
    one rounding to the dtype, so any process recomputes the very same bytes."""
    g = ns.geometry
    shape = (g.num_layers, 2, len(tokens), g.num_kv_heads, g.head_dim)
    layer, kv, tok, head, dim = (
        torch.arange(s, dtype=torch.int64).view([-1 if j == d else 1 for j in range(5)])
        for d, s in enumerate(shape)
    )
    tok_id = tokens.to(torch.int64).view(1, 1, -1, 1, 1)
    pos = tok + start
    x = (tok_id * 1_000_003 + pos * 7_919 + layer * 131 + kv * 17 + head * 5 + dim) % 65_521
    x = (x * 2_654_435_761) >> 7
    if not ns.dtype.is_floating_point:  # int8 / uint8 pools: every byte value
        return (x % 256 - (0 if ns.dtype == torch.uint8 else 128)).to(ns.dtype)
    return ((x % 2048 - 1024).to(torch.float32) / 1024).to(ns.dtype)  # exact in float16


def _pages_digest(views: Sequence[torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for v in views:
        h.update(v.contiguous().view(torch.uint8).cpu().numpy())  # (a GPU pool's views: copied to hash)
    return h.hexdigest()


def _write_pages(ns: Namespace, seq: Any, pages: Sequence[Any], tokens: torch.Tensor) -> int:
    """Write the KV of each WRITABLE page's token range in place; returns tokens written.
    `tokens` are the sequence's tokens from position 0."""
    T = ns.page_tokens
    written = 0
    for page, view in zip(pages, seq.views(pages), strict=True):
        a = page.index * T + page.token_start
        b = a + page.token_count
        view[:, :, page.token_start : page.token_start + page.token_count].copy_(fake_kv(ns, tokens[a:b], a))
        written += b - a
    return written


def write(kv: kvstore_client.Client, args: argparse.Namespace) -> dict[str, Any]:
    """Process A: look the prompt up (a fresh cache misses), write its KV, commit."""
    ns = kv.namespace(args.namespace)
    tokens = prompt_tokens(args.seed, args.tokens, vocab_size=ns.geometry.vocab_size)
    t0 = time.perf_counter()
    with kv.lookup(ns, tokens) as lk:
        hit_before = lk.hit_tokens
    with kv.allocate(ns) as seq:
        res = seq.append(tokens)
        written = _write_pages(ns, seq, res.writable_pages, tokens)
        commit = seq.commit()
        # What A leaves in the pool for the full pages of its prompt, read back through A's mapping.
        full = seq.pages[: args.tokens // ns.page_tokens]
        digest = _pages_digest(seq.views(full))
        slots = [p.slot for p in full]
    return {
        "pid": os.getpid(),
        "session_id": kv.session_id,
        "tokens": args.tokens,
        "hit_before": hit_before,
        "pages": len(res.pages),
        "writable_pages": len(res.writable_pages),
        "written_tokens": written,
        "written_bytes": len(res.writable_pages) * ns.pool.page_bytes,
        "sealed_pages": commit.sealed_pages,
        "deduplicated_pages": commit.deduplicated_pages,
        "slots": slots,
        "digest": digest,
        "seconds": time.perf_counter() - t0,
    }


def read(kv: kvstore_client.Client, args: argparse.Namespace) -> dict[str, Any]:
    """Process B: the prompt plus a question. Look up, verify A's pages, then append."""
    ns = kv.namespace(args.namespace)
    vocab = ns.geometry.vocab_size
    prompt = prompt_tokens(args.seed, args.tokens, vocab_size=vocab)
    question = prompt_tokens(args.seed + 1, args.question_tokens, offset=args.tokens, vocab_size=vocab)
    tokens = torch.cat([prompt, question])
    T = ns.page_tokens
    t0 = time.perf_counter()
    with kv.lookup(ns, tokens, pin=True) as lk:  # pinned: nothing can evict them while we read
        views = lk.views()  # views of the pool, mapped by this process: no bytes copied
        page0 = ns.pool.view().data_ptr()  # where page 0 lies in this process's mapping
        zero_copy = all(
            v.data_ptr() == page0 + s * ns.pool.page_stride for v, s in zip(views, lk.slots, strict=True)
        )
        digest = _pages_digest(views)
        expected = all(
            torch.equal(
                v.view(torch.uint8).cpu(), fake_kv(ns, prompt[i * T : (i + 1) * T], i * T).view(torch.uint8)
            )
            for i, v in enumerate(views)
        )
        hit = {"hit_tokens": lk.hit_tokens, "hit_pages": len(lk), "slots": lk.slots}
    read_s = time.perf_counter() - t0
    with kv.allocate(ns) as seq:
        res = seq.append(tokens)
        written = _write_pages(ns, seq, res.writable_pages, tokens)
        commit = seq.commit()
        cached_slots = [p.slot for p in res.cached_pages]
    return {
        "pid": os.getpid(),
        "session_id": kv.session_id,
        "tokens": len(tokens),
        **hit,
        "zero_copy": zero_copy,
        "digest": digest,
        "digest_matches_writer": digest == args.writer_digest,
        "matches_recomputed": expected,
        "read_bytes": hit["hit_pages"] * ns.pool.page_bytes,
        "read_seconds": read_s,
        "cached_pages": len(res.cached_pages),
        "cached_tokens": res.cached_tokens,
        "cached_slots_are_writers": cached_slots == hit["slots"],
        "writable_pages": len(res.writable_pages),
        "written_tokens": written,
        "sealed_pages": commit.sealed_pages,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python examples/demo_worker.py")
    parser.add_argument("role", choices=("write", "read"))
    parser.add_argument("--target", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--question-tokens", type=int, default=37)
    parser.add_argument("--writer-pid", type=int, default=0)
    parser.add_argument("--writer-digest", default="")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = "demo-A-writer" if args.role == "write" else "demo-B-reader"
    try:
        with kvstore_client.connect(args.target, client_name=name) as kv:
            report = (write if args.role == "write" else read)(kv, args)
    except kvstore_client.KVStoreClientError as e:
        print(f"{name} (pid {os.getpid()}): error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
