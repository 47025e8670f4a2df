"""One vLLM engine of `kvstore-bench vllm`, in a process of its own (run by vllm_engines.py).

    python -m kvstore_bench.vllm_worker CONFIG_JSON

CONFIG_JSON: {"model": dir, "prefix_caching": bool, "connector": null | {"target", "namespace"},
"max_model_len": int, "block_size": int (0: vLLM's default)}. The engine is vLLM's offline `LLM`
(V1 engine in this process: VLLM_ENABLE_V1_MULTIPROCESSING=0), float32, eager. Once it is up,
the worker answers one JSON line per command line on stdin:

    {"op": "generate", "prompts": [[ids...], ...], "max_tokens": n, "batch": bool, "ignore_eos": bool}
        batch=false: one `generate` per prompt, timed each (TTFT when max_tokens=1);
        batch=true: one `generate` of all prompts, timed once (throughput).
        -> {"elapsed_s": [...], "outputs": [{"token_ids", "num_cached_tokens", "prompt_tokens"}],
            "counters": the connector's counts so far (`kvstore_counters()`), {} without it}
    {"op": "exit"}

The answers go to the process's original stdout; vLLM logs to stdout, so stdout is pointed at
stderr once the answer channel is set aside.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any, TextIO


def make_llm(config: dict[str, Any]) -> Any:
    from vllm import LLM

    kwargs: dict[str, Any] = {
        "model": config["model"],
        "dtype": "float32",
        "enforce_eager": True,
        "max_model_len": config["max_model_len"],
        "enable_prefix_caching": config["prefix_caching"],
        "seed": 0,
    }
    if config.get("block_size"):
        kwargs["block_size"] = config["block_size"]
    if config.get("connector"):
        from vllm.config import KVTransferConfig

        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVStoreConnector",
            kv_connector_module_path="kvstore_client.vllm",
            kv_role="kv_both",
            kv_connector_extra_config=dict(config["connector"]),
        )
    return LLM(**kwargs)


def generate(llm: Any, cmd: dict[str, Any]) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(
        temperature=0.0, max_tokens=cmd["max_tokens"], ignore_eos=bool(cmd.get("ignore_eos"))
    )
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in cmd["prompts"]]
    elapsed: list[float] = []
    outputs: list[Any] = []
    groups = [prompts] if cmd.get("batch") else [[p] for p in prompts]
    for group in groups:
        t0 = time.perf_counter()
        outputs += llm.generate(group, params, use_tqdm=False)
        elapsed.append(time.perf_counter() - t0)
    return {
        "elapsed_s": elapsed,
        "counters": connector_counters(),
        "outputs": [
            {
                "token_ids": list(o.outputs[0].token_ids),
                "num_cached_tokens": o.num_cached_tokens or 0,
                "prompt_tokens": len(o.prompt_token_ids),
            }
            for o in outputs
        ],
    }


def connector_counters() -> dict[str, int]:
    """The connector's counts in this process so far (pages loaded, loads failed and so
    recomputed, pages saved, saves failed); {} with the connector off."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    return get_kv_transfer_group().kvstore_counters() if has_kv_transfer_group() else {}


def engine_info(llm: Any) -> dict[str, Any]:
    config = llm.llm_engine.vllm_config
    return {
        "block_size": config.cache_config.block_size,
        "num_gpu_blocks": config.cache_config.num_gpu_blocks,
        "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
        "max_num_seqs": config.scheduler_config.max_num_seqs,
    }


def serve(llm: Any, answers: TextIO) -> None:
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "exit":
            return
        if cmd["op"] != "generate":
            raise ValueError(f"unknown op {cmd['op']!r}")
        answers.write(json.dumps(generate(llm, cmd)) + "\n")


def main() -> int:
    config = json.loads(sys.argv[1])
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        t0 = time.perf_counter()
        llm = make_llm(config)
        ready = {"ready": True, "pid": os.getpid(), "start_s": time.perf_counter() - t0}
        answers.write(json.dumps(ready | engine_info(llm)) + "\n")
        serve(llm, answers)
    except Exception:
        traceback.print_exc()
        answers.write(json.dumps({"error": traceback.format_exc(limit=3)}) + "\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
