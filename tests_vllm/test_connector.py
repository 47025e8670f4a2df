"""KVStoreConnector on real vLLM (CPU build) and a real daemon: what one vLLM process computed,
another one loads, with the same greedy output as computing it itself.

Four engine processes, each started once (~15-40 s on 2 cores): `off` (no connector: the
reference outputs), A (stores its prompt's pages), B (hits them), C (its loads fail, then the
daemon dies under it). Page = vLLM block = 128 tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kvstore_client
import pytest
from conftest import run_engine
from daemon import DaemonProcess

NS = "vllm-test"
PAGE = 128  # vLLM's CPU block size (the namespace's page_tokens)
README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def prompts(model_dir: str) -> dict[str, list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    doc = tok(README.read_text()[:4000]).input_ids
    prefix = doc[:400]  # 3 whole pages and part of a 4th
    q = {
        k: tok(text).input_ids
        for k, text in {"a": " Summarize the text above:", "b": " Who uses this?"}.items()
    }
    return {
        "a": prefix + q["a"],  # A's prompt
        "b": prefix + q["b"],  # the same 3 pages, then its own
        "a_again": prefix + q["a"],  # A's prompt once more: also 3 pages
        "aligned": doc[: 3 * PAGE],  # exactly 3 pages held, but its last token must be computed
        "short": q["b"],  # under a page: never looked up
    }


def expected_hit(prompt: list[int], stored: list[int]) -> int:
    """Tokens kvstore serves for `prompt` when `stored`'s whole pages are in it: the common
    whole pages, and never the prompt's last token."""
    common = 0
    while common < min(len(prompt), len(stored)) and prompt[common] == stored[common]:
        common += 1
    return min(common // PAGE, len(stored) // PAGE, (len(prompt) - 1) // PAGE) * PAGE


B_PROMPTS = ("b", "a_again", "aligned", "short")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: Any, model_dir: str, prompts: dict[str, list[int]]) -> dict[str, list[int]]:
    """Greedy outputs of every prompt with the connector off."""
    names = list(prompts)
    out = run_engine(
        tmp_path_factory.mktemp("off"),
        "off",
        {"model": model_dir, "connector": None, "phases": [[prompts[n] for n in names]]},
    )
    return dict(zip(names, out["phases"][0]["token_ids"], strict=True))


def extra(daemon: DaemonProcess, **more: Any) -> dict[str, Any]:
    return {"target": daemon.target, "namespace": NS, "num_pages": 24} | more


@pytest.fixture(scope="module")
def stored_by_a(
    tmp_path_factory: Any, model_dir: str, daemon: DaemonProcess, prompts: dict[str, list[int]]
) -> dict[str, Any]:
    return run_engine(
        tmp_path_factory.mktemp("a"),
        "A",
        {"model": model_dir, "connector": extra(daemon), "phases": [[prompts["a"]]]},
    )


@pytest.fixture(scope="module")
def b_run(
    tmp_path_factory: Any,
    model_dir: str,
    daemon: DaemonProcess,
    prompts: dict[str, list[int]],
    stored_by_a: Any,
) -> dict[str, Any]:
    """Process B's run, with the daemon's counters before and after it."""
    with kvstore_client.connect(daemon.target) as kv:
        before = kv.stats(NS).namespaces[0]
    job = {"model": model_dir, "connector": extra(daemon), "phases": [[prompts[n] for n in B_PROMPTS]]}
    out = run_engine(tmp_path_factory.mktemp("b"), "B", job)
    with kvstore_client.connect(daemon.target) as kv:
        out["stats_before"], out["stats_after"] = before, kv.stats(NS).namespaces[0]
        out["sessions_after_exit"] = [
            s.client_name for s in kv.list_sessions() if s.client_name.startswith("vllm-")
        ]
    return out


def test_a_stores_its_prompt_pages(
    stored_by_a: dict[str, Any], prompts: dict[str, list[int]], daemon: DaemonProcess
) -> None:
    assert stored_by_a["phases"][0]["num_cached_tokens"] == [0]  # nothing there before
    assert stored_by_a["counters"]["saved_pages"] == len(prompts["a"]) // PAGE == 3
    with kvstore_client.connect(daemon.target) as kv:
        assert kv.lookup(NS, prompts["a"]).hit_tokens == 3 * PAGE


def test_b_gets_a_prefix_with_identical_greedy_output(
    b_run: dict[str, Any], reference: dict[str, list[int]], prompts: dict[str, list[int]]
) -> None:
    phase = b_run["phases"][0]
    assert phase["token_ids"] == [reference[n] for n in B_PROMPTS]
    assert all(len(t) == 12 for t in phase["token_ids"])  # (greedy ran its course: real tokens)
    want = [expected_hit(prompts[n], prompts["a"]) for n in B_PROMPTS]
    assert want == [3 * PAGE, 3 * PAGE, 2 * PAGE, 0]  # (the aligned prompt keeps its last page)
    assert phase["num_cached_tokens"] == want
    assert b_run["counters"]["loaded_pages"] == sum(want) // PAGE
    assert b_run["counters"]["failed_loads"] == 0


def test_vllm_external_hits_equal_kvstore_hit_tokens(b_run: dict[str, Any]) -> None:
    before, after = b_run["stats_before"], b_run["stats_after"]
    assert after.hit_tokens - before.hit_tokens == sum(b_run["phases"][0]["num_cached_tokens"]) > 0
    assert after.lookups - before.lookups == 3  # one per prompt of a page or more


def test_nothing_held_once_requests_finish(b_run: dict[str, Any]) -> None:
    sessions = b_run["phases"][0]["sessions"]
    assert len(sessions) == 2  # the scheduler's and the worker's, while the engine lives
    assert all(s["pins"] == 0 and s["sequences"] == 0 for s in sessions), sessions
    assert b_run["stats_after"].pages_pinned == 0 and b_run["stats_after"].sequences == 0
    assert b_run["sessions_after_exit"] == []


def test_failed_loads_and_a_dead_daemon_recompute_identically(
    tmp_path_factory: Any,
    model_dir: str,
    daemon: DaemonProcess,
    prompts: dict[str, list[int]],
    reference: dict[str, list[int]],
    b_run: Any,
) -> None:
    """C's pins last 1 ms, so every copy ends after its pin's deadline: the connector reports
    the blocks and vLLM recomputes them. Then the daemon is killed under C: lookups fail, and
    C computes everything itself. Same outputs all along. (Runs last: the daemon dies.)"""
    assert daemon.proc is not None
    job = {
        "model": model_dir,
        "connector": extra(daemon, pin_ttl_s=0.001),
        "phases": [[prompts["b"], prompts["a_again"]], [prompts["b"], prompts["aligned"]]],
        "kill_before_phase": [1, daemon.proc.pid],
    }
    out = run_engine(tmp_path_factory.mktemp("c"), "C", job)
    first, second = out["phases"]
    assert first["token_ids"] == [reference["b"], reference["a_again"]]
    assert out["counters"]["failed_loads"] == 2 and out["counters"]["loaded_pages"] == 0
    assert all(s["pins"] == 0 and s["sequences"] == 0 for s in first["sessions"]), first["sessions"]
    assert second["token_ids"] == [reference["b"], reference["aligned"]]
    assert second["num_cached_tokens"] == [0, 0]
