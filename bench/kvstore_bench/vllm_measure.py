"""The phases of `kvstore-bench vllm` (vllm.py says what each measures): process A's stores,
TTFT of B / C / D, B's and C's greedy outputs, and the miss tax of B against C."""

from __future__ import annotations

import time
from typing import Any

from .harness import (
    BenchDaemon,
    BenchError,
    median,
    proc_cpu_seconds,
    progress,
    self_cpu_seconds,
    system_busy_seconds,
)
from .vllm_engines import EngineProcess


def rotated(items: list[Any], r: int) -> list[Any]:
    k = r % len(items)
    return items[k:] + items[:k]


def process_a(a: EngineProcess, client: Any, namespace: str, prompts: list[list[int]]) -> dict[str, Any]:
    """A runs each prompt once (max_tokens=1): its connector stores the pages."""
    progress("engine A: storing %d prompts (%s tokens)", len(prompts), [len(p) for p in prompts])
    answer = a.generate(prompts, 1)
    ns = client.stats(namespace).namespaces[0]
    progress(
        "engine A: done in %.1fs; the namespace holds %d sealed pages",
        sum(answer["elapsed_s"]),
        ns.pages_sealed,
    )
    if ns.pages_sealed == 0:
        raise BenchError("engine A stored no page in kvstore")
    return {
        "pid": a.info["pid"],
        "prompt_tokens": [o["prompt_tokens"] for o in answer["outputs"]],
        "hit_tokens": [o["num_cached_tokens"] for o in answer["outputs"]],
        "elapsed_s": [round(t, 3) for t in answer["elapsed_s"]],
        "pages_sealed_after": ns.pages_sealed,
        "page_bytes": ns.page_bytes,
    }


def ttft(
    b: EngineProcess,
    c: EngineProcess,
    d: EngineProcess,
    by_length: dict[int, dict[str, list[int]]],
    lengths: list[int],
    repeat: int,
) -> tuple[list[dict[str, Any]], int]:
    """Per length: TTFTs, ratios, hits. Round 0 is the warmup (and D's first sight of each
    prefix); rounds 1..repeat are timed. Also B's hit tokens over all its requests (vLLM's)."""
    sides = {"kvstore": b, "recompute": c, "apc": d}
    times: dict[int, dict[str, list[float]]] = {n: {s: [] for s in sides} for n in lengths}
    hits: dict[int, dict[str, list[int]]] = {n: {s: [] for s in sides} for n in lengths}
    external = 0
    failed = dict.fromkeys(lengths, 0)  # B's loads that failed (vLLM recomputed those pages)
    for r in range(1 + repeat):
        for n in lengths:
            prompt = by_length[n][str(r)]
            for side in rotated(list(sides), r):
                failed0 = sides[side].counters.get("failed_loads", 0)
                answer = sides[side].generate([prompt], 1)
                hit = answer["outputs"][0]["num_cached_tokens"]
                if side == "kvstore":
                    external += hit
                    failed[n] += answer["counters"]["failed_loads"] - failed0
                hits[n][side].append(hit)
                if r >= 1:
                    times[n][side].append(answer["elapsed_s"][0])
            progress(
                "%5d tokens, %s: kvstore %.0f ms (hit %d), recompute %.0f ms, apc %.0f ms (hit %d)",
                n,
                "warmup" if r == 0 else f"round {r}",
                1e3 * (times[n]["kvstore"][-1] if r else 0.0),
                hits[n]["kvstore"][-1],
                1e3 * (times[n]["recompute"][-1] if r else 0.0),
                1e3 * (times[n]["apc"][-1] if r else 0.0),
                hits[n]["apc"][-1],
            )
    results = []
    for n in lengths:
        med = {s: median(times[n][s]) for s in sides}
        results.append(
            {
                "prompt_tokens": n,
                "ttft_kvstore_ms": round(1e3 * med["kvstore"], 1),
                "ttft_recompute_ms": round(1e3 * med["recompute"], 1),
                "ttft_apc_ms": round(1e3 * med["apc"], 1),
                "speedup": round(med["recompute"] / med["kvstore"], 2),
                "vs_inprocess_apc": round(med["apc"] / med["kvstore"], 3),
                # (hits of the timed rounds; the warmup's too for B, whose every request hits)
                "hit_tokens_b": sorted(set(hits[n]["kvstore"])),
                "hit_tokens_d": sorted(set(hits[n]["apc"][1:])),
                "hit_tokens_c": sorted(set(hits[n]["recompute"])),
                "failed_loads_b": failed[n],
                "runs_ms": {s: [round(1e3 * t, 1) for t in v] for s, v in times[n].items()},
            }
        )
    return results, external


def exactness(
    b: EngineProcess,
    c: EngineProcess,
    d: EngineProcess,
    by_length: dict[int, dict[str, list[int]]],
    lengths: list[int],
    output_tokens: int,
) -> dict[str, Any]:
    """B (prefix from kvstore), C (recomputed) and D (from vLLM's cache) generate greedily."""
    prompts = [by_length[n]["X"] for n in lengths]
    out = {name: e.generate(prompts, output_tokens)["outputs"] for name, e in (("B", b), ("C", c), ("D", d))}
    ids = {name: [o["token_ids"] for o in outs] for name, outs in out.items()}
    same = ids["B"] == ids["C"]
    progress(
        "greedy %d tokens: B (kvstore) %s C (recompute); D (apc) %s C; B hit %s",
        output_tokens,
        "==" if same else "!=",
        "==" if ids["D"] == ids["C"] else "!=",
        [o["num_cached_tokens"] for o in out["B"]],
    )
    return {
        "outputs_identical": same,
        "apc_outputs_identical": ids["D"] == ids["C"],
        "prompt_tokens": [len(p) for p in prompts],
        "hit_tokens_b": [o["num_cached_tokens"] for o in out["B"]],
        "external_hit_tokens": sum(o["num_cached_tokens"] for o in out["B"]),
        "token_ids": ids,
    }


def miss_tax(b: EngineProcess, c: EngineProcess, batches: list[list[list[int]]]) -> dict[str, Any]:
    """Per round a batch of prompts neither engine has seen, one `generate` each, order rotated;
    round 0 is the warmup. miss_tax = throughput of B (connector on) ÷ C (off)."""
    sides = {"on": b, "off": c}
    times: dict[str, list[float]] = {"on": [], "off": []}
    out_tokens = 16
    for r, batch in enumerate(batches):
        for side in rotated(list(sides), r):
            answer = sides[side].generate(batch, out_tokens, batch=True, ignore_eos=True)
            hits = [o["num_cached_tokens"] for o in answer["outputs"]]
            if any(hits):
                raise BenchError(f"miss-tax prompts hit {hits} tokens with the connector {side}")
            if r >= 1:
                times[side].append(answer["elapsed_s"][0])
        if r >= 1:
            progress(
                "miss tax, round %d: connector on %.2fs, off %.2fs", r, times["on"][-1], times["off"][-1]
            )
    tokens = sum(len(p) + out_tokens for p in batches[0])
    on, off = median(times["on"]), median(times["off"])
    return {
        "miss_tax": round(off / on, 3),
        "tokens_per_s_on": round(tokens / on, 1),
        "tokens_per_s_off": round(tokens / off, 1),
        "batch": {
            "prompts": len(batches[0]),
            "prompt_tokens": len(batches[0][0]),
            "output_tokens": out_tokens,
        },
        "runs_s": {s: [round(t, 3) for t in v] for s, v in times.items()},
    }


class Cpu:
    """CPUs other processes took (system busy minus this process, the daemon and the engines)."""

    def __init__(self, daemon: BenchDaemon, engines: list[EngineProcess]) -> None:
        self.pids = [daemon.pid] + [e.info["pid"] for e in engines]
        self.t0, self.busy0, self.ours0 = time.perf_counter(), system_busy_seconds(), self.ours()

    def ours(self) -> float:
        return self_cpu_seconds() + sum(proc_cpu_seconds(pid) for pid in self.pids)

    def others(self) -> float:
        wall = time.perf_counter() - self.t0
        theirs = system_busy_seconds() - self.busy0 - (self.ours() - self.ours0)
        return round(max(0.0, theirs / wall), 3)
