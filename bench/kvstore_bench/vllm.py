"""`kvstore-bench vllm`: vLLM with kvstore's KV connector, a prefix computed by another process.

Needs vLLM: run it with the vLLM venv's Python (`make vllm-venv`):
`build/vllm-venv/bin/kvstore-bench vllm`. A daemon and four vLLM engines, each in an OS process
of its own (vllm_worker.py; SmolLM2-135M-Instruct, float32, eager, vLLM's CPU build):

- A: connector on (`kvstore_client.vllm.KVStoreConnector`, which creates the namespace):
     runs each prefix (+ a suffix of its own) once, so the connector stores it, then exits;
- B: connector on, vLLM's prefix caching off: every hit is kvstore's (`num_cached_tokens`);
- C: connector off, prefix caching off: recomputes everything (the baseline);
- D: connector off, prefix caching on: vLLM's own prefix cache in one process (the ceiling).

Prompts are real text (Python's `pydoc_data.topics`, tokenized) of 1k and 2k tokens: a prefix
and a short question that differs per request. TTFT = one `generate` with max_tokens=1, timed in
the engine's process; per length a warmup round (which also puts the prefix in D's cache) then
`--repeat` rounds, B, C and D in a rotated order, medians. speedup = C / B (goal >= 10x at 2k);
vs_inprocess_apc = D / B (goal >= 0.8). Exact: B's greedy tokens (`--output-tokens`) equal C's;
`external_hit_tokens` (vLLM's count in B) equals `kvstore_hit_tokens` (the daemon's hit_tokens
over the same requests). miss_tax: batches of distinct prompts never seen (lookups miss, the
connector stores every page), throughput of B ÷ C, per round in rotated order (goal >= 0.97).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .harness import BenchDaemon, BenchError, emit, machine_info, now_iso, progress
from .vllm_engines import EngineProcess, engine_env
from .vllm_measure import Cpu, exactness, miss_tax, process_a, ttft

NAMESPACE = "vllm-bench"
SPEEDUP_GOAL = 10.0
APC_GOAL = 0.8
MISS_TAX_GOAL = 0.97
START_TIMEOUT = 600.0
QUESTION = "\n\nQuestion {tag}: in one short sentence, what is the main topic of the text above?\nAnswer:"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--lengths", default="1024,2048", help="prompt lengths in tokens (default 1024,2048)")
    p.add_argument("--repeat", type=int, default=3, help="timed TTFT rounds after the warmup (default 3)")
    p.add_argument("--output-tokens", type=int, default=32, help="greedy tokens compared (default 32)")
    p.add_argument("--miss-prompts", type=int, default=4, help="prompts per miss-tax batch (default 4)")
    p.add_argument("--miss-tokens", type=int, default=512, help="tokens per miss-tax prompt (default 512)")
    p.add_argument("--miss-repeat", type=int, default=5, help="timed miss-tax rounds (default 5)")
    p.add_argument("--block-size", type=int, default=0, help="vLLM block size (default: vLLM's, 128 on CPU)")
    p.add_argument(
        "--kvcache-gib", type=float, default=1.0, help="VLLM_CPU_KVCACHE_SPACE per engine (default 1)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: --lengths 512 --repeat 1 --output-tokens 8 --miss-prompts 2 "
        "--miss-tokens 256 --miss-repeat 1",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="exit 1 unless the outputs are identical, the hit tokens agree and B loaded pages",
    )


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.lengths, args.repeat, args.output_tokens = "512", 1, 8
        args.miss_prompts, args.miss_tokens, args.miss_repeat = 2, 256, 1
    try:
        lengths = sorted({int(x) for x in args.lengths.split(",") if x.strip()})
    except ValueError:
        raise SystemExit("vllm: --lengths takes comma-separated integers") from None
    if not lengths or min(lengths) < 64 or min(args.repeat, args.miss_repeat, args.miss_prompts) < 1:
        raise SystemExit("vllm: lengths must be >= 64; --repeat, --miss-repeat, --miss-prompts >= 1")
    why = missing()
    if why:
        raise BenchError(why)
    model_dir, tokenizer = load_model_files()
    prompts = make_prompts(tokenizer, lengths, args)
    result = measure(model_dir, prompts, lengths, args)
    import transformers
    import vllm

    result["machine"] = machine_info(
        vllm=vllm.__version__,
        torch=__import__("torch").__version__,
        transformers=transformers.__version__,
        model=f"SmolLM2-135M-Instruct (GGUF converted to safetensors, {model_dir.name}), float32, eager",
    )
    emit(result, args.json, format_text(result))
    ok = result["outputs_identical"] and result["hit_tokens_agree"] and result["loaded_tokens"] > 0
    return 1 if args.check and not ok else 0


def missing() -> str | None:
    """Why this Python cannot run the benchmark, or None."""
    where = "; run it with the vLLM venv's Python: make vllm-venv; build/vllm-venv/bin/kvstore-bench vllm"
    if importlib.util.find_spec("vllm") is None:
        return f"vllm is not installed in {sys.executable}{where}"
    if importlib.util.find_spec("kvstore_client.vllm") is None:
        return "kvstore_client.vllm (the KV connector) is not in this tree"
    from kvstore_client import hf

    why = hf.smollm2_missing()
    return f"the model cannot be loaded: {why}{where}" if why else None


def load_model_files() -> tuple[Path, Any]:
    from kvstore_client import hf
    from transformers import AutoTokenizer

    progress("model: converting or finding SmolLM2's safetensors directory")
    model_dir = hf.smollm2_converted_dir(hf.find_smollm2())
    if model_dir is None:
        raise BenchError("no writable cache directory for the converted model (set KVSTORE_MODEL_CACHE)")
    return model_dir, AutoTokenizer.from_pretrained(model_dir)


def make_prompts(tokenizer: Any, lengths: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """Token ids: per length a text segment whose prompts are its start + a question filling
    the prompt to exactly that length (A's, the rounds', the exactness check's); and the
    miss-tax batches, each prompt a segment of its own."""
    from .ttft import text_ids

    ids = text_ids(tokenizer)
    cursor = 0

    def take(n: int) -> list[int]:
        nonlocal cursor
        if cursor + n > len(ids):
            raise BenchError(f"the text has {len(ids)} tokens; these sizes need more")
        cursor += n
        return ids[cursor - n : cursor]

    def question(tag: str) -> list[int]:
        return list(tokenizer(QUESTION.format(tag=tag), add_special_tokens=False)["input_ids"])

    tags = ["A", "X", *(str(r) for r in range(1 + args.repeat))]
    by_length: dict[int, dict[str, list[int]]] = {}
    for n in lengths:
        segment = take(n)
        by_length[n] = {tag: segment[: n - len(q)] + q for tag in tags for q in [question(tag)]}
    miss = [[take(args.miss_tokens) for _ in range(args.miss_prompts)] for _ in range(1 + args.miss_repeat)]
    return {"by_length": by_length, "miss": miss}


def measure(
    model_dir: Path, prompts: dict[str, Any], lengths: list[int], args: argparse.Namespace
) -> dict[str, Any]:
    import kvstore_client

    t_start = time.monotonic()
    daemon = BenchDaemon([], server={"max_pool_bytes": "64GiB"})
    with (
        tempfile.TemporaryDirectory(prefix="kvsb-vllm-") as logs,
        daemon,
        kvstore_client.connect(daemon.target, client_name="bench-vllm") as client,
    ):
        env = engine_env(args.kvcache_gib)
        base = {
            "model": str(model_dir),
            "max_model_len": max(4096, max(lengths)),
            "block_size": args.block_size,
        }
        conn = {"target": daemon.target, "namespace": NAMESPACE}
        configs = {
            "A": base | {"connector": conn, "prefix_caching": False},
            "B": base | {"connector": conn, "prefix_caching": False},
            "C": base | {"connector": None, "prefix_caching": False},
            "D": base | {"connector": None, "prefix_caching": True},
        }
        engines = {name: EngineProcess(name, cfg, env, Path(logs)) for name, cfg in configs.items()}
        try:
            # A first, up before the others start: the namespace is created once, by A.
            engines["A"].start().wait_ready(START_TIMEOUT)
            for name in "BCD":
                engines[name].start()
            a = process_a(engines["A"], client, NAMESPACE, [prompts["by_length"][n]["A"] for n in lengths])
            engines["A"].stop()
            b, c, d = (engines[name] for name in "BCD")
            info = {name: e.wait_ready(START_TIMEOUT) for name, e in engines.items() if name != "A"}
            cpu = Cpu(daemon, [b, c, d])
            hits0 = client.stats(NAMESPACE).namespaces[0].hit_tokens
            by_length, ttft_hits = ttft(b, c, d, prompts["by_length"], lengths, args.repeat)
            exact = exactness(b, c, d, prompts["by_length"], lengths, args.output_tokens)
            kvstore_hits = client.stats(NAMESPACE).namespaces[0].hit_tokens - hits0
            counters = {"hits": b.counters}
            miss = miss_tax(b, c, prompts["miss"])
            counters["all"] = b.counters
            busy = cpu.others()
        finally:
            for e in engines.values():
                e.stop()
    external = ttft_hits + exact["external_hit_tokens"]
    by_n = {r["prompt_tokens"]: r for r in by_length}

    def at(n: int, key: str) -> float | None:
        return by_n[n][key] if n in by_n else None

    return {
        "benchmark": "vllm",
        "date": now_iso(),
        "speedup_1k": at(1024, "speedup"),
        "speedup_2k": at(2048, "speedup"),
        "vs_inprocess_apc_2k": at(2048, "vs_inprocess_apc"),
        "miss_tax": miss["miss_tax"],
        "outputs_identical": exact["outputs_identical"],
        "external_hit_tokens": external,
        "kvstore_hit_tokens": kvstore_hits,
        "hit_tokens_agree": external == kvstore_hits,
        # B's connector: pages it loaded (every hit is loaded unless a load failed and vLLM
        # recomputed it), after the TTFT and exactness requests and after the miss batches too
        "loaded_tokens": counters["hits"]["loaded_pages"] * info["B"]["block_size"],
        "failed_loads": counters["hits"]["failed_loads"],
        "connector_counters": counters,
        "goals": {"speedup_2k": SPEEDUP_GOAL, "vs_inprocess_apc_2k": APC_GOAL, "miss_tax": MISS_TAX_GOAL},
        "goals_met": {
            "speedup_2k": None if 2048 not in by_n else by_n[2048]["speedup"] >= SPEEDUP_GOAL,
            "vs_inprocess_apc_2k": None if 2048 not in by_n else by_n[2048]["vs_inprocess_apc"] >= APC_GOAL,
            "miss_tax": miss["miss_tax"] >= MISS_TAX_GOAL,
        },
        "results": by_length,
        "exactness": exact,
        "miss": miss,
        "process_a": a,
        "engines": info,
        "options": {k: v for k, v in vars(args).items() if k not in ("run", "command", "json")},
        "others_cpus": busy,
        "wall_s": round(time.monotonic() - t_start, 1),
    }


def format_text(result: dict[str, Any]) -> str:
    lines = [
        f"vllm: TTFT medians of {result['options']['repeat']} rounds (after 1 warmup), "
        f"block_size {result['engines']['B']['block_size']}, {result['machine']['model']}",
        f"{'prompt':>7} {'kvstore ms':>11} {'recompute ms':>13} {'apc ms':>8} {'speedup':>8} {'vs apc':>7}  hits B / D",
    ]
    for r in result["results"]:
        lines.append(
            f"{r['prompt_tokens']:>7} {r['ttft_kvstore_ms']:>11.1f} {r['ttft_recompute_ms']:>13.1f} "
            f"{r['ttft_apc_ms']:>8.1f} {r['speedup']:>7.2f}x {r['vs_inprocess_apc']:>7.2f}  "
            f"{r['hit_tokens_b']} / {r['hit_tokens_d']}"
        )
    m = result["miss"]
    lines.append(
        f"miss tax: {m['miss_tax']:.3f} (connector on {m['tokens_per_s_on']:.0f} tok/s, "
        f"off {m['tokens_per_s_off']:.0f} tok/s)"
    )
    lines.append(
        f"outputs identical (B vs C, {result['options']['output_tokens']} greedy tokens): "
        f"{result['outputs_identical']}; external hit tokens {result['external_hit_tokens']}, "
        f"kvstore hit tokens {result['kvstore_hit_tokens']} ({'agree' if result['hit_tokens_agree'] else 'DIFFER'}), "
        f"loaded {result['loaded_tokens']} ({result['failed_loads']} loads failed, recomputed)"
    )
    met = ", ".join(
        f"{k} {'met' if v else 'MISSED'}" for k, v in result["goals_met"].items() if v is not None
    )
    lines.append(f"goals: {met}; others: {result['others_cpus']:.3f} CPUs")
    return "\n".join(lines)
