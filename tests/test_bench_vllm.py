"""`kvstore-bench vllm` without vLLM (the core venv has none; `make vllm-test` runs the benchmark
itself): it refuses to start, naming the Python to use, and its prompts have the lengths and
the shared prefixes the measures rely on (the real SmolLM2 tokenizer)."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from typing import Any

import pytest
from kvstore_bench import vllm


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_without_vllm_it_exits_naming_the_venv_to_use() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kvstore_bench.cli", "vllm", "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert f"vllm is not installed in {sys.executable}" in proc.stderr
    assert "build/vllm-venv/bin/kvstore-bench vllm" in proc.stderr


def test_prompts_have_their_length_and_share_the_prefix(smollm2: Any) -> None:
    _, tokenizer = smollm2
    args = argparse.Namespace(repeat=2, miss_prompts=3, miss_tokens=128, miss_repeat=1)
    prompts = vllm.make_prompts(tokenizer, [256, 512], args)
    for n in (256, 512):
        by_tag = prompts["by_length"][n]
        assert sorted(by_tag) == ["0", "1", "2", "A", "X"]
        assert {len(p) for p in by_tag.values()} == {n}
        shared = n - 32  # (every question is shorter than 32 tokens)
        assert len({tuple(p[:shared]) for p in by_tag.values()}) == 1
        assert len({tuple(p[shared:]) for p in by_tag.values()}) == len(by_tag)  # the questions differ
    miss = [p for batch in prompts["miss"] for p in batch]
    assert len(miss) == 3 * 2 and {len(p) for p in miss} == {128}
    starts = {tuple(p[:16]) for p in miss} | {tuple(prompts["by_length"][n]["A"][:16]) for n in (256, 512)}
    assert len(starts) == len(miss) + 2  # no miss prompt starts like another or like a prefix
