"""KVStoreConnector on real vLLM (CPU build) and a real daemon: what one vLLM process computed,
another one loads, with the same greedy output as computing it itself.

Four engine processes, each started once (~15-40 s on 2 cores): `off` (no connector: the
reference outputs), A (stores its prompt's pages), C (its pins last 1 ms: every load fails and
is recomputed), B (hits A's pages; then the daemon dies under it). Page = vLLM block = 128 tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kvstore_client
import pytest
from conftest import run_engine
from daemon import DaemonProcess

# The first test of a fixture starts its engines (on a busy 2-core machine, minutes).
pytestmark = pytest.mark.timeout(900)

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
        "long": doc[:700],  # A's 3 pages, then 2 more whole pages and part of a third
    }


def expected_hit(prompt: list[int], stored: list[int]) -> int:
    """Tokens kvstore serves for `prompt` when `stored`'s whole pages are in it: the common
    whole pages, and never the prompt's last token."""
    common = 0
    while common < min(len(prompt), len(stored)) and prompt[common] == stored[common]:
        common += 1
    return min(common // PAGE, len(stored) // PAGE, (len(prompt) - 1) // PAGE) * PAGE


B_PROMPTS = ("b", "a_again", "aligned", "short")
C_PROMPTS = ("b", "a_again", "long")


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
    tmp_path_factory: Any, model_dir: str, daemon: DaemonProcess, prompts: dict[str, list[int]], c_run: Any
) -> dict[str, Any]:
    """Process B: its prompts; then (phase 1) the daemon is killed and two of them run again;
    then (2) a new daemon comes up on the same socket and one runs twice (3).
    The daemon's counters are read before B and (by B) after its first phase."""
    assert daemon.proc is not None
    with kvstore_client.connect(daemon.target) as kv:
        before = kv.stats(NS).namespaces[0]
    job = {
        "model": model_dir,
        "connector": extra(daemon, reconnect_s=0.0),
        "phases": [
            [prompts[n] for n in B_PROMPTS],
            [prompts["b"], prompts["aligned"]],
            [prompts["b"]],
            [prompts["b"]],
        ],
        "kill_before_phase": [1, daemon.proc.pid],
        "restart_before_phase": [2, str(daemon.config_path)],
    }
    out = run_engine(tmp_path_factory.mktemp("b"), "B", job)
    out["stats_before"] = before
    return out


@pytest.fixture(scope="module")
def c_run(
    tmp_path_factory: Any,
    model_dir: str,
    daemon: DaemonProcess,
    prompts: dict[str, list[int]],
    stored_by_a: Any,
) -> dict[str, Any]:
    """Process C, whose pins last 1 ms: each copy starts or ends after its pin's deadline."""
    job = {
        "model": model_dir,
        "connector": extra(daemon, pin_ttl_s=0.001),
        "phases": [[prompts[n] for n in C_PROMPTS]],
    }
    return run_engine(tmp_path_factory.mktemp("c"), "C", job)


# (In this order: the daemon must live for C's checks; B kills it.)


def test_a_stores_its_prompt_pages(
    stored_by_a: dict[str, Any], prompts: dict[str, list[int]], daemon: DaemonProcess
) -> None:
    assert stored_by_a["phases"][0]["num_cached_tokens"] == [0]  # nothing there before
    assert stored_by_a["counters"]["saved_pages"] == len(prompts["a"]) // PAGE == 3
    with kvstore_client.connect(daemon.target) as kv:
        assert kv.lookup(NS, prompts["a"]).hit_tokens == 3 * PAGE


def test_failed_loads_recompute_identically(
    c_run: dict[str, Any], reference: dict[str, list[int]], prompts: dict[str, list[int]]
) -> None:
    """Every load of C fails (its pin's deadline passes): vLLM recomputes the blocks."""
    phase = c_run["phases"][0]
    assert phase["token_ids"] == [reference[n] for n in C_PROMPTS]
    assert c_run["counters"]["failed_loads"] == 3 and c_run["counters"]["loaded_pages"] == 0


def test_pages_computed_over_a_failed_load_are_not_stored(
    c_run: dict[str, Any], daemon: DaemonProcess, prompts: dict[str, list[int]], model_dir: str
) -> None:
    """C's "long" hit A's 3 pages, its load failed, and the step computed pages 3-4 over blocks
    holding no KV: those must not be stored. The pages stored later (after vLLM's recompute) are
    the model's KV, as transformers computes it."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = prompts["long"]
    with kvstore_client.connect(daemon.target) as kv:
        hit = kv.get(NS, ids)
        ns = kv.namespace(NS)
        pages = hit.data.view(ns.dtype).view(hit.pages, *ns.page_shape)  # [page, layer, kv, token, head, dim]
    assert hit.hit_tokens == 5 * PAGE
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        cache = model(torch.tensor([ids[: 5 * PAGE]]), use_cache=True).past_key_values
    for layer, kv_layer in enumerate(cache.layers):
        for which, want in enumerate((kv_layer.keys, kv_layer.values)):  # [1, head, token, dim]
            got = pages[3:5, layer, which].reshape(2 * PAGE, *ns.page_shape[3:])  # [token, head, dim]
            torch.testing.assert_close(
                got, want[0, :, 3 * PAGE : 5 * PAGE].transpose(0, 1), atol=2e-3, rtol=2e-3
            )


def test_sessions_end_with_the_engine(c_run: dict[str, Any], daemon: DaemonProcess) -> None:
    with kvstore_client.connect(daemon.target) as kv:
        assert [s.client_name for s in kv.list_sessions() if s.client_name.startswith("vllm-")] == []


def test_b_gets_a_prefix_with_identical_greedy_output(
    b_run: dict[str, Any], reference: dict[str, list[int]], prompts: dict[str, list[int]]
) -> None:
    phase = b_run["phases"][0]
    assert phase["token_ids"] == [reference[n] for n in B_PROMPTS]
    assert all(len(t) == 12 for t in phase["token_ids"])  # (greedy ran its course: real tokens)
    want = [expected_hit(prompts[n], prompts["a"]) for n in B_PROMPTS]
    assert want == [3 * PAGE, 3 * PAGE, 2 * PAGE, 0]  # (the aligned prompt keeps its last page)
    assert phase["num_cached_tokens"] == want
    assert phase["counters"]["loaded_pages"] == sum(want) // PAGE
    assert phase["counters"]["failed_loads"] == 0


def test_vllm_external_hits_equal_kvstore_hit_tokens(b_run: dict[str, Any]) -> None:
    before, after = b_run["stats_before"], b_run["phases"][0]["stats"]
    assert after["hit_tokens"] - before.hit_tokens == sum(b_run["phases"][0]["num_cached_tokens"]) > 0
    assert after["lookups"] - before.lookups == 3  # one per prompt of a page or more


def test_nothing_held_once_requests_finish(b_run: dict[str, Any], c_run: dict[str, Any]) -> None:
    for phase in (b_run["phases"][0], c_run["phases"][0]):
        sessions = phase["sessions"]
        assert len(sessions) == 2  # the scheduler's and the worker's, while the engine lives
        assert all(s["pins"] == 0 and s["sequences"] == 0 for s in sessions), sessions
        assert phase["stats"]["pages_pinned"] == 0 and phase["stats"]["sequences"] == 0


def test_a_dead_daemon_is_a_miss(b_run: dict[str, Any], reference: dict[str, list[int]]) -> None:
    """The daemon is killed under B between two batches: lookups fail, B computes everything
    itself, same outputs."""
    phase = b_run["phases"][1]
    assert phase["token_ids"] == [reference["b"], reference["aligned"]]
    assert phase["num_cached_tokens"] == [0, 0]


def test_a_restarted_daemon_is_used_again(b_run: dict[str, Any], reference: dict[str, list[int]]) -> None:
    """A new daemon on the same socket (empty: no disk tier): B's connector opens new sessions,
    creates the namespace again, stores the prompt's pages and hits them the next time."""
    again, hit = b_run["phases"][2], b_run["phases"][3]
    assert again["token_ids"] == hit["token_ids"] == [reference["b"]]
    assert again["num_cached_tokens"] == [0] and hit["num_cached_tokens"] == [3 * PAGE]
