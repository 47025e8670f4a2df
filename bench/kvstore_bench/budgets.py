"""`kvstore-bench budgets`: perplexity vs KV bytes held under each kvstore budget mode.

SmolLM2-135M-Instruct reads the first `--tokens` tokens of a long real text (Python's
`pydoc_data.topics`, joined) one page (16 tokens) per step, through the adapter:
`KVStoreCache(options=...).prefill(chunk_tokens=16)` appends each chunk to a budgeted kvstore
sequence, writes its KV, and cuts the pages the daemon drops (`AppendResult.dropped`) out of
the model's KV tensors, so the model attends to exactly the pages kvstore holds. Positions
stay absolute (RoPE: HF caches post-RoPE keys). Modes:

- unconstrained: no budget (must match the model alone, chunked the same way, within 1e-3);
- sliding window with attention sinks (sink_tokens S, window_tokens W);
- importance (budget_pages B, sink_tokens S): after each step the importance of page i is
  the attention mass the step's queries put on page i's tokens (summed over layers, heads and
  the chunk's queries; eager attention, `output_attentions=True`), sent with
  `report_importance`; the daemon drops the lowest-scored non-sink page when it needs room.

KV bytes held = pages the sequence holds after each append x the namespace's page_bytes;
mean and max over steps, and their ratio to unconstrained. The budget logic is the daemon's,
the cutting the adapter's (tests/test_hf_budgets.py checks it against a hand-cropped model).
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
                client.evict(NAMESPACE, all=True)  # each mode reads the text from scratch
                t0 = time.monotonic()
                with hf.KVStoreCache(client, ns, model, options=options) as cache:
                    r = evaluate(model, ids, cache, importance=(kind == "importance"))
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
        "budget_dropped_pages": stats.namespaces[0].budget_dropped_pages if stats.namespaces else None,
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


def evaluate(model: Any, ids: list[int], seq_cache: Any, importance: bool = False) -> dict[str, Any]:
    """Mean next-token NLL over ids[1:], one page per model call. `seq_cache` None: the model
    alone (plain DynamicCache). Else a budgeted `KVStoreCache`: its chunked prefill appends each
    chunk, writes its KV and cuts the pages the daemon dropped out of the model's cache."""
    import torch
    from transformers import DynamicCache

    pages_held: list[int] = []
    if seq_cache is None:
        cache = DynamicCache(config=model.config)
        logits = torch.cat(
            [
                model(input_ids=torch.tensor([ids[s : s + PAGE_TOKENS]]), cache=cache).logits
                for s in range(0, len(ids), PAGE_TOKENS)
            ],
            dim=1,
        )
    else:

        def on_chunk(cache: Any, out: Any) -> None:
            if importance:
                cache.report_importance(out.attentions)
            held = cache.sequence.held_pages
            if cache.held_tokens != sum(p.token_count for p in held):
                raise BenchError("the model's cache is out of step with the kvstore sequence")
            pages_held.append(len(held))

        kwargs = {"output_attentions": True} if importance else {}
        logits = seq_cache.prefill(model, ids, chunk_tokens=PAGE_TOKENS, on_chunk=on_chunk, **kwargs)
    logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
    nll = -float(logp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).mean())
    dropped = len(seq_cache.sequence.dropped) if seq_cache is not None else 0
    return {"nll": nll, "pages_held": pages_held, "dropped": dropped}


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
