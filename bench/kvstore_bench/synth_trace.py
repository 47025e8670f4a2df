"""A synthetic Mooncake-schema trace: real request sizes and arrival times, a Zipf model of
prefix sharing. Used to sanity-check replay results on a trace nobody tuned a policy to.

Sizes and timestamps come from an Azure LLM inference CSV (`TIMESTAMP,ContextTokens,
GeneratedTokens`), cycled if more requests are asked for. Each request is one of:

- a new conversation (probability 1 - `p_continue`): a shared prefix (a system prompt or
  document, drawn from `documents` with Zipf(`zipf`) popularity, of `doc_blocks` blocks,
  truncated to the request) followed by private blocks up to the request's size;
- the next turn of a recent conversation (probability `p_continue`, the conversation drawn
  Zipf-ly by recency among the last `active` ones): its previous prompt, its previous output
  and the new user turn, so the previous prompt is an exact prefix.

Block ids are chained: equal id = equal prefix. `python -m kvstore_bench.synth_trace CSV OUT`.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from collections.abc import Iterator
from typing import Any


def _zipf_index(rng: random.Random, n: int, s: float) -> int:
    # Inverse-CDF over n ranks; n is small (documents, active conversations).
    weights = [1.0 / (k + 1) ** s for k in range(n)]
    return rng.choices(range(n), weights=weights)[0]


def synthesize(
    sizes: list[tuple[float, int, int]],
    n_requests: int,
    *,
    block_tokens: int = 512,
    documents: int = 200,
    doc_blocks: tuple[int, int] = (2, 24),
    zipf: float = 1.0,
    p_continue: float = 0.4,
    active: int = 300,
    seed: int = 0,
) -> Iterator[dict[str, Any]]:
    """Requests as dicts (timestamp ms, input_length, output_length, hash_ids)."""
    rng = random.Random(seed)
    next_id = 0

    def fresh(n: int) -> list[int]:
        nonlocal next_id
        ids = list(range(next_id, next_id + n))
        next_id += n
        return ids

    docs = [fresh(rng.randint(*doc_blocks)) for _ in range(documents)]
    convs: list[list[int]] = []  # most recent last: the hash ids of each conversation's last prompt
    t0 = sizes[0][0]
    for i in range(n_requests):
        ts, ctx, out = sizes[i % len(sizes)]
        blocks = max(1, -(-ctx // block_tokens))
        if convs and rng.random() < p_continue:
            k = len(convs) - 1 - _zipf_index(rng, min(active, len(convs)), zipf)
            prev = convs.pop(k)
            turn = max(1, -(-(ctx // 2 + out) // block_tokens))
            ids = prev + fresh(turn)
        else:
            doc = docs[_zipf_index(rng, documents, zipf)]
            shared = doc[: max(1, blocks - 1)]
            ids = shared + fresh(max(0, blocks - len(shared)))
        convs.append(ids)
        if len(convs) > 4 * active:
            del convs[0]
        yield {
            "timestamp": int((ts - t0) * 1000) if i < len(sizes) else int(i),
            "input_length": len(ids) * block_tokens,
            "output_length": out,
            "hash_ids": ids,
        }


def read_azure_csv(path: str) -> list[tuple[float, int, int]]:
    from datetime import datetime

    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            ts = datetime.fromisoformat(row["TIMESTAMP"][:26]).timestamp()
            out.append((ts, int(row["ContextTokens"]), int(row["GeneratedTokens"])))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", help="Azure LLM inference trace CSV (sizes and arrival times)")
    p.add_argument("out", help="output JSONL ('-' for stdout)")
    p.add_argument("--requests", type=int, default=0, help="how many (default: one per CSV row)")
    p.add_argument("--block-tokens", type=int, default=64)
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--p-continue", type=float, default=0.4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    sizes = read_azure_csv(args.csv)
    reqs = synthesize(
        sizes,
        args.requests or len(sizes),
        block_tokens=args.block_tokens,
        zipf=args.zipf,
        p_continue=args.p_continue,
        seed=args.seed,
    )
    if args.out == "-":
        _write(sys.stdout, reqs)
    else:
        with open(args.out, "w") as f:
            _write(f, reqs)
    return 0


def _write(f: Any, reqs: Iterator[dict[str, Any]]) -> None:
    for r in reqs:
        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    sys.exit(main())
