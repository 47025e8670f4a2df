"""`ttft_speedup_2k` and `exact` of `kvstore-bench gpu`: SmolLM2 time to first token with a
2048-token prefix served from the GPU pool, against recompute, on CUDA.

`kvstore-bench ttft`'s measurement (bench/kvstore_bench/ttft.py), on the GPU: a daemon with a
namespace on the pool device (`cuda:0`); process A (`kvstore_bench.ttft_worker`, its own OS
process, model on CUDA) caches the prompt; this process (B, model on CUDA) times, from token ids
to the first token's logits, cached (lookup + load the pages from the pool + prefill the
question + store its KV) against recompute (the model alone on prompt + question) and miss
(a fresh prompt, stored as it goes), each clock read after `torch.cuda.synchronize()`.
`ttft_speedup_2k` = recompute / cached (medians); `exact`: the cached side's first token was
the recompute's on every run. `ttft_2k` has the rest (times, parts, the logits' max diff).
"""

from __future__ import annotations

import traceback
from typing import Any

from .harness import BenchDaemon, BenchError, progress

PROMPT_TOKENS = 2048
MODEL_DEVICE = "cuda"  # torch's name for the current GPU, in A and B
POOL_DEVICE_PREFIX = "cuda:"  # what a CUDA pool's descriptor names its device with


def measure(device: str, repeat: int) -> dict[str, Any]:
    """Run it; raises BenchError when it cannot (no model, the pool not on a GPU)."""
    import kvstore_client
    import torch
    from kvstore_client import hf

    from . import ttft

    model, tokenizer = ttft.load_model()
    model.to(MODEL_DEVICE)
    prompts, questions, num_pages = ttft.make_prompts(model, tokenizer, [PROMPT_TOKENS], repeat)
    spec = hf.namespace_spec_for(
        model, ttft.NAMESPACE, num_pages=num_pages, page_tokens=ttft.PAGE_TOKENS, device=device
    )
    with (
        BenchDaemon([], server={"max_pool_bytes": "64GiB"}) as daemon,
        kvstore_client.connect(daemon.target, client_name="bench-gpu-ttft-b") as client,
    ):
        ns = client.create_namespace(spec)
        if not ns.info.pool.device.startswith(POOL_DEVICE_PREFIX):
            raise BenchError(f"namespace on {device!r}: its pool is on {ns.info.pool.device!r}, not a GPU")
        progress(
            "gpu ttft: %d pages of %d KiB on %s",
            num_pages,
            ns.info.pool.page_bytes >> 10,
            ns.info.pool.device,
        )
        process_a = ttft.cache_in_process_a(
            daemon.target, [prompts[PROMPT_TOKENS]["cached"]], device=MODEL_DEVICE
        )
        got = ttft.measure(model, client, prompts, questions, [PROMPT_TOKENS], repeat, daemon)
    row = got["results"][0]
    progress(
        "gpu ttft: 2k cached %.1f ms, recompute %.1f ms: %.2fx, first token %s",
        row["ttft_cached_ms"],
        row["ttft_recompute_ms"],
        row["speedup"],
        "equal" if row["first_token_equal"] else "DIFFERENT",
    )
    return {
        "ttft_speedup_2k": row["speedup"],
        "exact": row["first_token_equal"],
        "ttft_2k": row
        | {
            "pool_device": ns.info.pool.device,
            "process_a": process_a,
            "repeat": repeat,
            "warmup": 1,
            "torch_cuda": torch.version.cuda,
            "transformers": __import__("transformers").__version__,
        },
    }


def measure_or_why(device: str, repeat: int) -> tuple[dict[str, Any], str | None]:
    """(`ttft_speedup_2k`, `exact`, `ttft_2k`) and None, or nulls and why not: the rest of the GPU
    benchmark stands when the model is missing or this part fails."""
    from kvstore_client import hf

    missing = hf.smollm2_missing()
    if missing is None:
        try:
            return measure(device, repeat), None
        except Exception as e:  # (a CUDA or transformers error too: the other numbers still count)
            traceback.print_exc()
            missing = f"failed: {type(e).__name__}: {e}"[:2000]
    else:
        missing = f"the model is missing: {missing} (docs/gpu.md, the HF adapter on a GPU)"
    progress("gpu ttft: %s", missing)
    return {"ttft_speedup_2k": None, "exact": None}, missing
