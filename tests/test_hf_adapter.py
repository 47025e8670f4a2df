"""The transformers adapter (`kvstore_client.hf`) on the real model and a real daemon: cached
prefix + computed suffix gives the logits and greedy tokens of the model alone, in one process
and across processes.

The model (SmolLM2-135M-Instruct, fp32) is loaded once per session by the `smollm2` fixture.
"""

from __future__ import annotations

import json
import os
import pydoc_data.topics
import subprocess
import sys
from pathlib import Path
from typing import Any

import kvstore_client
import pytest
from model_fixtures import PAGE_TOKENS, model_namespace

torch = pytest.importorskip("torch")

NS = "smollm2"
TOL = 1e-4  # fp32 max abs diff of logits
HERE = Path(__file__).resolve().parent


def doc_ids(tokenizer: Any, *topics: str) -> list[int]:
    text = "\n\n".join(pydoc_data.topics.topics[t] for t in topics)
    return tokenizer(text).input_ids


def full_logits(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def own_cache_logits(model: Any, ids: list[int], prefix: int) -> torch.Tensor:
    """The logits of ids[prefix:] on top of transformers' own cache of ids[:prefix]: the same
    shapes as the adapter's path, so the same fp32 rounding (a 13-row GEMM does not round as the
    61-row one of a full recompute)."""
    from kvstore_client._hf_model import cache_kwarg
    from transformers import DynamicCache

    with torch.no_grad():
        cache = {cache_kwarg(model): DynamicCache()}
        model(torch.tensor([ids[:prefix]]), **cache)
        return model(torch.tensor([ids[prefix:]]), **cache).logits


def assert_recompute_logits(
    model: Any, ids: list[int], prefix: int, logits: torch.Tensor, ref: torch.Tensor, *, same_kv: bool
) -> float:
    """The adapter's logits of ids[prefix:] are a full recompute's (`ref`) within TOL, or within
    what transformers' own cache of ids[:prefix] gives: both differ from a recompute by fp32
    rounding alone (a 13-row GEMM does not round as a 61-row one), which on some CPUs is a
    little over TOL (2 threads: 1.08e-4 at 61 tokens, logits up to 36). `same_kv`: the pages
    were written by one forward of ids[:prefix], as the own cache's KV is, so the adapter adds
    no rounding at all and must equal it bit for bit. The max abs diff."""
    own = own_cache_logits(model, ids, prefix)
    if same_kv:
        assert torch.equal(logits, own), (logits - own).abs().max().item()
    diff = (logits - ref[:, prefix:]).abs().max().item()
    own_diff = (own - ref[:, prefix:]).abs().max().item()
    assert diff <= max(TOL, 1.1 * own_diff), (
        f"max abs diff {diff:.3g} (transformers' own cache: {own_diff:.3g})"
    )
    return diff


def reference_generate(model: Any, ids: list[int], new_tokens: int) -> torch.Tensor:
    batch = torch.tensor([ids])
    return model.generate(
        batch, attention_mask=torch.ones_like(batch), max_new_tokens=new_tokens, do_sample=False
    )


@pytest.fixture
def model_daemon(daemon_factory: Any) -> Any:
    return daemon_factory(namespaces=[model_namespace(NS)]).start()


def test_import_is_light() -> None:
    """`kvstore_client.hf` imports neither transformers (until used) nor the daemon."""
    code = "import sys, kvstore_client.hf; print(sorted({'transformers', 'kvstore'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_namespace_spec_for_model(smollm2: Any) -> None:
    from kvstore_client import hf

    model, _ = smollm2
    spec = hf.namespace_spec_for(model, "m", num_pages=8)
    g = spec.geometry
    assert (g.num_layers, g.num_kv_heads, g.head_dim, g.page_tokens) == (30, 3, 64, PAGE_TOKENS)
    assert kvstore_client.torch_dtype(g.dtype) == torch.float32 == model.dtype
    assert spec.num_pages == 8 and g.vocab_size == model.config.vocab_size
    want = {k: v for k, v in model_namespace().items() if k not in ("name", "num_pages")}
    assert {k: getattr(g, k) for k in want if k != "dtype"} == {k: v for k, v in want.items() if k != "dtype"}


def test_created_namespace_runs_the_model(smollm2: Any, daemon: Any) -> None:
    """A namespace made by `create_namespace(namespace_spec_for(...))` serves the adapter."""
    from kvstore_client import hf

    model, tokenizer = smollm2
    ids = doc_ids(tokenizer, "assert")[:40]
    with kvstore_client.connect(daemon.target) as client:
        client.create_namespace(hf.namespace_spec_for(model, "made", num_pages=8))
        for hit in (0, 32):
            logits, cache = hf.prefill(model, ids, client, "made")
            with cache:
                assert cache.hit_tokens == hit
                diff = (logits - full_logits(model, ids)[:, hit:]).abs().max().item()
                assert diff <= TOL


@pytest.mark.parametrize("prompt_tokens", [61, 64], ids=["mid-page", "page-boundary"])
def test_cached_prefix_logits_equal_full_recompute(
    smollm2: Any, model_daemon: Any, prompt_tokens: int, record_property: Any
) -> None:
    from kvstore_client import hf

    model, tokenizer = smollm2
    ids = doc_ids(tokenizer, "assert", "assignment")[:prompt_tokens]
    ref = full_logits(model, ids)
    with kvstore_client.connect(model_daemon.target) as client:
        # Cache a 48-token prefix (3 pages), then run the whole prompt on top of it.
        logits, cache = hf.prefill(model, ids[:48], client, NS)
        with cache:
            assert cache.hit_tokens == 0 and logits.shape[1] == 48
            assert (logits - ref[:, :48]).abs().max().item() <= TOL
        logits, cache = hf.prefill(model, ids, client, NS)
        with cache:
            assert (cache.hit_tokens, cache.prefix_tokens) == (48, 48)
            assert logits.shape[1] == prompt_tokens - 48
            diff = (logits - ref[:, 48:]).abs().max().item()
            record_property("max_abs_diff", diff)
            # The adapter adds no error of its own: its logits are transformers' own cache's, bit
            # for bit. Against a full recompute both differ by fp32 rounding alone, which on some
            # CPUs (2 threads: 1.08e-4 at 61 tokens, logits up to 36) is a little over TOL.
            own = own_cache_logits(model, ids, 48)
            assert torch.equal(logits, own), (logits - own).abs().max().item()
            own_diff = (own - ref[:, 48:]).abs().max().item()
            record_property("own_cache_max_abs_diff", own_diff)
            assert diff <= max(TOL, own_diff), (
                f"max abs diff {diff:.3g} > {TOL} and > transformers' own {own_diff:.3g}"
            )
            sealed = prompt_tokens // PAGE_TOKENS
            assert client.stats(NS).namespaces[0].pages_sealed == sealed
            # The partial last page (if any) stays writable in the sequence.
            assert [p.writable for p in cache.sequence.pages] == [False] * sealed + [True] * (
                prompt_tokens % PAGE_TOKENS > 0
            )
        # Everything cached now (whole pages): all but the last token come from kvstore.
        logits, cache = hf.prefill(model, ids, client, NS)
        with cache:
            assert cache.hit_tokens == sealed * PAGE_TOKENS
            assert cache.prefix_tokens == min(cache.hit_tokens, prompt_tokens - 1)
            assert_recompute_logits(model, ids, cache.prefix_tokens, logits, ref, same_kv=False)


def test_greedy_generate_identical_with_and_without_kvstore(smollm2: Any, model_daemon: Any) -> None:
    from kvstore_client import hf

    model, tokenizer = smollm2
    ids = doc_ids(tokenizer, "if")[:61]
    ref = reference_generate(model, ids, 12)
    with kvstore_client.connect(model_daemon.target) as client:
        first, hit = hf.generate(model, ids, client, NS, max_new_tokens=12, do_sample=False)
        assert hit == 0
        assert first.tolist() == ref.tolist()
        # The first run stored the prompt and the generated tokens: 72 tokens of KV, 4 full pages.
        assert client.stats(NS).namespaces[0].pages_sealed == (61 + 12 - 1) // PAGE_TOKENS
        again, hit = hf.generate(model, ids, client, NS, max_new_tokens=12, do_sample=False)
        assert hit == 48
        assert again.tolist() == ref.tolist()
        # The whole first output as a prompt: its 64 cached tokens are reused, the rest computed.
        longer = ref[0].tolist()
        ref2 = reference_generate(model, longer, 8)
        out, hit = hf.generate(model, longer, client, NS, max_new_tokens=8, do_sample=False)
        assert hit == 64
        assert out.tolist() == ref2.tolist()


def test_cross_process_prefix_reuse(smollm2: Any, model_daemon: Any, tmp_path: Path) -> None:
    """Process A (its own model) reads a document into kvstore; this process asks a question
    about it, prefills only the question and gets the tokens of the model alone."""
    from kvstore_client import hf

    model, tokenizer = smollm2
    doc = doc_ids(tokenizer, "assert", "pass", "del")[:500]
    question = tokenizer("\n\nQuestion: what does the assert statement do?\nAnswer:").input_ids
    prompt = doc + question
    (tmp_path / "ids.json").write_text(json.dumps(doc))
    worker = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "hf_prefill_worker.py"),
            model_daemon.target,
            NS,
            str(tmp_path / "ids.json"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ref = reference_generate(model, prompt, 12)  # meanwhile: the model alone
        out, err = worker.communicate(timeout=240)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert worker.returncode == 0, err[-3000:]
    a = json.loads(out.strip().splitlines()[-1])
    assert a["pid"] != os.getpid() and a["hit_tokens"] == 0 and a["stored_tokens"] == len(doc)

    cached = len(doc) // PAGE_TOKENS * PAGE_TOKENS
    with kvstore_client.connect(model_daemon.target, client_name="hf-process-b") as client:
        before = client.stats(NS).namespaces[0]
        assert before.pages_sealed == len(doc) // PAGE_TOKENS
        got, hit = hf.generate(model, prompt, client, NS, max_new_tokens=12, do_sample=False)
        after = client.stats(NS).namespaces[0]
    assert hit == cached
    assert after.hit_tokens - before.hit_tokens == cached
    assert got.tolist() == ref.tolist()
