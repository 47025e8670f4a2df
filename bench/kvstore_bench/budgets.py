"""`kvstore-bench budgets`: perplexity vs KV bytes held under each kvstore budget mode.

SmolLM2-135M-Instruct reads the first `--tokens` tokens of a long real text (Python's
`pydoc_data.topics`, joined) one page (16 tokens) per step. Each step appends the chunk's ids
to a kvstore sequence allocated with a budget (`SequenceOptions`); the pages the daemon drops
(`AppendResult.dropped`) are removed from the model's DynamicCache (every layer's keys and
values) before the model runs the chunk, so the model attends to exactly the pages kvstore
holds. Position ids stay absolute (RoPE: HF caches post-RoPE keys); the causal mask is sized
to the (cropped) cache. Modes:

- unconstrained: no budget (must match the model alone, chunked the same way, within 1e-3);
- sliding window with attention sinks (sink_tokens S, window_tokens W);
- importance (budget_pages B, sink_tokens S): after each step the importance of page i is
  the attention mass the step's queries put on page i's tokens (summed over layers, heads and
  the chunk's queries; eager attention, `output_attentions=True`), sent with
  `report_importance`; the daemon drops the lowest-scored non-sink page when it needs room.

KV bytes held = pages the sequence holds after each append x the namespace's page_bytes;
mean and max over steps, and their ratio to unconstrained. The token ids are written to
kvstore, not the KV itself (nothing here reads pages back): the budget logic is the daemon's.
`--plot FILE.png` draws perplexity vs mean KV bytes (needs matplotlib; skipped if missing).
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

from .harness import BenchDaemon, BenchError, emit, machine_info, now_iso, progress

NAMESPACE = "budgets"
PAGE_TOKENS = 16
MATCH_RTOL = 1e-3

# (label, kind, params)
MODES: list[tuple[str, str, dict[str, int]]] = [
    ("unconstrained", "unconstrained", {}),
    ("window S=0 W=256", "sliding_window", {"sink_tokens": 0, "window_tokens": 256}),
    ("window S=16 W=128", "sliding_window", {"sink_tokens": 16, "window_tokens": 128}),
    ("window S=16 W=256", "sliding_window", {"sink_tokens": 16, "window_tokens": 256}),
    ("window S=32 W=512", "sliding_window", {"sink_tokens": 32, "window_tokens": 512}),
    ("importance S=16 B=10", "importance", {"sink_tokens": 16, "budget_pages": 10}),
    ("importance S=16 B=18", "importance", {"sink_tokens": 16, "budget_pages": 18}),
    ("importance S=32 B=35", "importance", {"sink_tokens": 32, "budget_pages": 35}),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--tokens", type=int, default=1024, help="tokens of text evaluated (default 1024)")
    p.add_argument("--plot", metavar="FILE.png", help="also draw perplexity vs KV bytes held (matplotlib)")


def run(args: argparse.Namespace) -> int:
    n = args.tokens
    if n < 2 * PAGE_TOKENS:
        raise SystemExit(f"budgets: --tokens must be >= {2 * PAGE_TOKENS}")
    import kvstore_client
    import torch
    from kvstore_client import hf

    from .ttft import load_model, text_ids, threads

    progress("loading the model, %d torch threads", threads())
    t0 = time.monotonic()
    model, tokenizer = load_model()
    model.set_attn_implementation("eager")  # attention weights, for importance (and all sides alike)
    progress("model loaded in %.1fs", time.monotonic() - t0)
    ids = text_ids(tokenizer)[:n]
    if len(ids) < n:
        raise BenchError(f"the text has only {len(ids)} tokens")
    if n > model.config.max_position_embeddings:
        raise BenchError(f"{n} tokens exceed the model's {model.config.max_position_embeddings}")

    with torch.inference_mode():
        t0 = time.monotonic()
        ref_nll = evaluate(model, ids, None)["nll"]
        ref_ppl = math.exp(ref_nll)
        progress("model alone, chunked: perplexity %.4f (%.1fs)", ref_ppl, time.monotonic() - t0)

        num_pages = n // PAGE_TOKENS + 64
        spec = hf.namespace_spec_for(model, NAMESPACE, num_pages=num_pages, page_tokens=PAGE_TOKENS)
        rows: list[dict[str, Any]] = []
        with (
            BenchDaemon([], server={}) as daemon,
            kvstore_client.connect(daemon.target, client_name="bench-budgets") as client,
        ):
            ns = client.create_namespace(spec)
            page_bytes = ns.info.pool.page_bytes
            progress("namespace %r: %d pages of %d KiB", NAMESPACE, num_pages, page_bytes >> 10)
            for label, kind, params in MODES:
                options = None
                if kind == "sliding_window":
                    options = kvstore_client.SequenceOptions.sliding_window(**params)
                elif kind == "importance":
                    options = kvstore_client.SequenceOptions.importance(**params)
                t0 = time.monotonic()
                with client.allocate(ns, options=options) as seq:
                    r = evaluate(model, ids, seq, importance=(kind == "importance"))
                held = r["pages_held"]
                row = {
                    "mode": label,
                    "kind": kind,
                    **params,
                    "perplexity": math.exp(r["nll"]),
                    "mean_kv_bytes": sum(held) / len(held) * page_bytes,
                    "max_kv_bytes": max(held) * page_bytes,
                    "max_pages_held": max(held),
                    "pages_dropped": r["dropped"],
                    "seconds": round(time.monotonic() - t0, 2),
                }
                rows.append(row)
                progress(
                    "%-22s ppl %.4f  mean %.0f KiB  max %.0f KiB  (%.1fs)",
                    label,
                    row["perplexity"],
                    row["mean_kv_bytes"] / 1024,
                    row["max_kv_bytes"] / 1024,
                    row["seconds"],
                )
            stats = client.stats(NAMESPACE)
    base = rows[0]
    rel = abs(base["perplexity"] - ref_ppl) / ref_ppl
    if rel > MATCH_RTOL:
        raise BenchError(f"unconstrained perplexity {base['perplexity']:.6f} != model alone {ref_ppl:.6f}")
    for row in rows:
        row["ppl_ratio"] = row["perplexity"] / base["perplexity"]
        row["mean_kv_ratio"] = row["mean_kv_bytes"] / base["mean_kv_bytes"]
        row["max_kv_ratio"] = row["max_kv_bytes"] / base["max_kv_bytes"]
    result: dict[str, Any] = {
        "benchmark": "budgets",
        "time": now_iso(),
        "tokens": n,
        "page_tokens": PAGE_TOKENS,
        "page_bytes": page_bytes,
        "text": "pydoc_data.topics, joined (sorted keys), first N tokens",
        "importance_score": "attention mass of the step's queries on the page's tokens (sum over layers, heads)",
        "model_alone_perplexity": ref_ppl,
        "unconstrained_rel_diff": rel,
        "budget_dropped_pages": int(getattr(stats.namespaces[0], "budget_dropped_pages", -1))
        if getattr(stats, "namespaces", None)
        else None,
        "modes": rows,
    }
    if args.plot:
        result["plot"] = plot(rows, args.plot, n)
    result["machine"] = machine_info(
        torch=torch.__version__,
        transformers=__import__("transformers").__version__,
        torch_threads=torch.get_num_threads(),
        model=f"SmolLM2-135M-Instruct ({hf.SMOLLM2_GGUF}, dequantized to float32), eager attention",
    )
    emit(result, args.json, format_text(result))
    return 0


def evaluate(model: Any, ids: list[int], seq: Any, importance: bool = False) -> dict[str, Any]:
    """Mean next-token NLL over ids[1:], one page per model call. `seq` None: the model alone
    (plain DynamicCache, no explicit positions or mask). Else: append each chunk to `seq`,
    crop the dropped pages from the cache, run with absolute positions."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    page_of: list[int] = []  # page index of each cache position
    total = 0.0
    count = 0
    prev_last: torch.Tensor | None = None
    pages_held: list[int] = []
    dropped_total = 0
    for start in range(0, len(ids), PAGE_TOKENS):
        chunk = ids[start : start + PAGE_TOKENS]
        x = torch.tensor([chunk])
        kwargs: dict[str, Any] = {}
        if seq is not None:
            res = seq.append(chunk)
            dropped = set(res.dropped)
            dropped_total += len(dropped)
            pages_held.append(len(seq.held_pages))
            if dropped and page_of:
                keep = [i for i, p in enumerate(page_of) if p not in dropped]
                if len(keep) != len(page_of):
                    idx = torch.tensor(keep, dtype=torch.long)
                    for layer in cache.layers:
                        layer.keys = layer.keys.index_select(2, idx)
                        layer.values = layer.values.index_select(2, idx)
                    page_of = [page_of[i] for i in keep]
            kwargs["position_ids"] = torch.arange(start, start + len(chunk)).unsqueeze(0)
            kwargs["attention_mask"] = torch.ones(1, len(page_of) + len(chunk), dtype=torch.long)
            if importance:
                kwargs["output_attentions"] = True
        out = model(input_ids=x, past_key_values=cache, use_cache=True, **kwargs)
        logits = out.logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        if prev_last is not None:
            total -= float(prev_last[chunk[0]])
            count += 1
        if len(chunk) > 1:
            tgt = torch.tensor(chunk[1:])
            total -= float(logp[:-1].gather(1, tgt.unsqueeze(1)).sum())
            count += len(chunk) - 1
        prev_last = logp[-1]
        if seq is not None:
            page_of.extend([start // PAGE_TOKENS] * len(chunk))
            if importance:
                # attentions: per layer [1, heads, q, kv]; kv = the cache after this step
                mass = torch.stack([a[0].sum(dim=(0, 1)) for a in out.attentions]).sum(0)
                n_pages = (start + len(chunk) + PAGE_TOKENS - 1) // PAGE_TOKENS
                scores = [0.0] * n_pages
                for pos, page in enumerate(page_of):
                    scores[page] += float(mass[pos])
                seq.report_importance(scores)
        if cache.get_seq_length() != (len(page_of) if seq is not None else start + len(chunk)):
            raise BenchError("the model's cache is out of step with the kvstore sequence")
    return {"nll": total / count, "pages_held": pages_held, "dropped": dropped_total}


def format_text(r: dict[str, Any]) -> str:
    lines = [
        f"kvstore-bench budgets: SmolLM2-135M, {r['tokens']} tokens of pydoc_data.topics, "
        f"{r['page_tokens']} tokens/page ({r['page_bytes'] >> 10} KiB/page), one page per step",
        f"model alone (chunked): perplexity {r['model_alone_perplexity']:.4f}; unconstrained "
        f"differs by {r['unconstrained_rel_diff']:.1e} relative",
        "",
        f"{'mode':<22} {'ppl':>9} {'ppl x':>7} {'mean KV KiB':>12} {'max KV KiB':>11} {'mean x':>7} {'max x':>7}",
    ]
    for m in r["modes"]:
        lines.append(
            f"{m['mode']:<22} {m['perplexity']:9.4f} {m['ppl_ratio']:7.3f} {m['mean_kv_bytes'] / 1024:12.0f} "
            f"{m['max_kv_bytes'] / 1024:11.0f} {m['mean_kv_ratio']:7.3f} {m['max_kv_ratio']:7.3f}"
        )
    lines.append("")
    lines.append("importance score: " + r["importance_score"])
    if "plot" in r:
        lines.append(f"plot: {r['plot']}")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str, n: int) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress("--plot: matplotlib is not installed; no plot drawn")
        return "skipped: matplotlib is not installed"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, marker in (("unconstrained", "s"), ("sliding_window", "o"), ("importance", "^")):
        pts = [r for r in rows if r["kind"] == kind]
        ax.scatter(
            [r["mean_kv_bytes"] / 1024 for r in pts],
            [r["perplexity"] for r in pts],
            marker=marker,
            label=kind,
        )
        for r in pts:
            ax.annotate(r["mode"], (r["mean_kv_bytes"] / 1024, r["perplexity"]), fontsize=7)
    ax.set_xlabel("mean KV held (KiB)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"SmolLM2-135M, {n} tokens of pydoc_data.topics")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
