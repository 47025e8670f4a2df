"""The two model processes of `examples/demo.py --model`, each its own OS process with its
own copy of SmolLM2-135M-Instruct (loaded in ~20 s):

    python examples/demo_model_worker.py read-document --target T --namespace NS
    python examples/demo_model_worker.py ask --target T --namespace NS

`read-document` (process A) creates the model's namespace if the daemon lacks it
(`namespace_spec_for`: the model's geometry and fingerprint), then prefills a long document
through the transformers adapter (`kvstore_client.hf`): its KV goes into the shared pool.
`ask` (process B) asks questions about the same document: each prompt is the document plus a
question, so the adapter loads the document's KV from the pool and the model computes only the
question; B also generates each answer with the model alone and compares the tokens.

Each prints one JSON report on stdout for examples/demo.py to narrate.
"""

from __future__ import annotations

import argparse
import json
import os
import pydoc_data.topics
import sys
import time
from collections.abc import Sequence
from typing import Any

import kvstore_client
from kvstore_client.errors import AlreadyExists

MODEL_NAME = "SmolLM2-135M-Instruct"
NAMESPACE = "smollm2-135m"
NUM_PAGES = 192  # 0.7 MiB each: the document, the questions and the answers fit with room to spare
TOPICS = ("assert", "for", "while", "if", "break", "continue", "return")  # ~1,550 tokens
QUESTIONS = (
    "What happens when the expression of an assert statement is false?",
    "What does a break statement do inside a loop?",
)
NEW_TOKENS = 24
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def document_ids(tokenizer: Any) -> list[int]:
    """The chat prompt up to the end of the document: the prefix every question shares."""
    doc = "\n\n".join(pydoc_data.topics.topics[t].strip() for t in TOPICS)
    text = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nRead this document:\n\n{doc}\n\n"
    return tokenizer(text).input_ids


def question_ids(tokenizer: Any, question: str) -> list[int]:
    """The rest of the prompt: the question, then the assistant's turn."""
    return tokenizer(f"Question: {question} Answer briefly.<|im_end|>\n<|im_start|>assistant\n").input_ids


class _FirstToken:
    """A `generate` streamer that notes when the first new token comes out (TTFT)."""

    def __init__(self, t0: float) -> None:
        self.t0, self.calls, self.ttft = t0, 0, 0.0

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2:  # the first put is the prompt
            self.ttft = time.perf_counter() - self.t0

    def end(self) -> None:
        pass


def _load() -> tuple[Any, Any, float]:
    from kvstore_client import hf

    t0 = time.perf_counter()
    model, tokenizer = hf.load_smollm2()
    return model, tokenizer, time.perf_counter() - t0


def _model_device(kv: kvstore_client.Client, namespace: str) -> str:
    """Where the model runs: on the GPU that holds the namespace's pool (the daemon put it
    there: `device = auto` finds a GPU where CuPy can use one), else on the CPU."""
    pool = kv.namespace(namespace).pool
    device = getattr(pool, "torch_device", None)  # (CUDA mappings have one; shared memory not)
    return str(device) if device is not None and device.type == "cuda" else "cpu"


def read_document(kv: kvstore_client.Client, args: argparse.Namespace) -> dict[str, Any]:
    """Process A: make the namespace if needed, prefill the document through the adapter."""
    import torch
    from kvstore_client import hf

    model, tokenizer, load_s = _load()
    try:
        spec = hf.namespace_spec_for(model, args.namespace, num_pages=NUM_PAGES, device="auto")
        kv.create_namespace(spec)
        created = True
    except AlreadyExists:
        created = False
    device = _model_device(kv, args.namespace)
    model.to(device)
    ids = document_ids(tokenizer)
    t0 = time.perf_counter()
    with torch.no_grad():
        _, cache = hf.prefill(model, ids, kv, args.namespace)
        with cache:
            hit = cache.hit_tokens
    prefill_s = time.perf_counter() - t0
    (stats,) = kv.stats(args.namespace).namespaces
    return {
        "pid": os.getpid(),
        "load_seconds": load_s,
        "device": device,
        "namespace_created": created,
        "fingerprint": hf.cached_fingerprint(model),
        "topics": list(TOPICS),
        "tokens": len(ids),
        "hit_before": hit,
        "prefill_seconds": prefill_s,
        "pages_sealed": stats.pages_sealed,
    }


def ask(kv: kvstore_client.Client, args: argparse.Namespace) -> dict[str, Any]:
    """Process B: each question on top of the cached document; the model alone as reference."""
    import torch
    from kvstore_client import hf

    model, tokenizer, load_s = _load()
    device = _model_device(kv, args.namespace)
    model.to(device)
    doc = document_ids(tokenizer)
    answers = []
    for question in QUESTIONS:
        q = question_ids(tokenizer, question)
        ids = doc + q
        gen = {"max_new_tokens": NEW_TOKENS, "do_sample": False}
        t0 = time.perf_counter()
        first = _FirstToken(t0)
        out, hit = hf.generate(model, ids, kv, args.namespace, streamer=first, **gen)
        cached_s = time.perf_counter() - t0
        batch = torch.tensor([ids], device=device)
        t0 = time.perf_counter()
        alone_first = _FirstToken(t0)
        with torch.no_grad():
            ref = model.generate(batch, attention_mask=torch.ones_like(batch), streamer=alone_first, **gen)
        alone_s = time.perf_counter() - t0
        new = out[0, len(ids) :]
        answers.append(
            {
                "question": question,
                "tokens": len(ids),
                "question_tokens": len(q),
                "hit_tokens": hit,
                "computed_tokens": len(ids) - min(hit, len(ids) - 1),
                "answer": tokenizer.decode(new, skip_special_tokens=True).strip(),
                "same_as_model_alone": bool(torch.equal(out.cpu(), ref.cpu())),
                "ttft_cached_s": first.ttft,
                "ttft_alone_s": alone_first.ttft,
                "seconds_cached": cached_s,
                "seconds_alone": alone_s,
            }
        )
    return {"pid": os.getpid(), "load_seconds": load_s, "device": device, "answers": answers}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python examples/demo_model_worker.py")
    parser.add_argument("role", choices=("read-document", "ask"))
    parser.add_argument("--target", required=True)
    parser.add_argument("--namespace", default=NAMESPACE)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = "demo-A-document" if args.role == "read-document" else "demo-B-questions"
    try:
        with kvstore_client.connect(args.target, client_name=name) as kv:
            report = (read_document if args.role == "read-document" else ask)(kv, args)
    except kvstore_client.KVStoreClientError as e:
        print(f"{name} (pid {os.getpid()}): error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
