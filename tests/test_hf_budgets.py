"""Budgeted sequences driven by the transformers adapter itself, on the real model and daemon.

`KVStoreCache(..., options=...)` appends to a budgeted sequence as pages fill and cuts the
pages the daemon drops out of the model's KV. The reference here is the model alone with a
plain `DynamicCache` cropped by hand by the window rule (explicit positions and mask, as in
`kvstore-bench budgets`): the adapter's mask offset and absolute positions must give the same
greedy tokens. Pages held are observed on the daemon (sequence page table, stats).
"""

from __future__ import annotations

import math
import pydoc_data.topics
from typing import Any

import kvstore_client
import pytest
from kvstore_client import SequenceOptions
from kvstore_client.errors import KVStoreClientError
from model_fixtures import PAGE_TOKENS, model_namespace

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

NS = "smollm2"
TOL = 1e-4


@pytest.fixture
def model_daemon(daemon_factory: Any) -> Any:
    return daemon_factory(namespaces=[model_namespace(NS)]).start()


def prompt_ids(tokenizer: Any, n: int, topic: str = "if") -> list[int]:
    ids = tokenizer(pydoc_data.topics.topics[topic]).input_ids
    assert len(ids) >= n
    return ids[:n]


def window_reference(model: Any, ids: list[int], new_tokens: int, sinks: int, window: int) -> list[int]:
    """Greedy decoding by the model alone, its cache cropped by hand the way a sliding-window
    budget with sinks drops pages: once the sequence has `total` tokens, pages below
    ceil(sinks / T) and from (total - window) // T on are kept. The crop happens where the
    adapter saves: after the prompt and each time a page fills."""
    T = PAGE_TOKENS
    sink_pages = -(-sinks // T)
    cache = transformers.DynamicCache(config=model.config)
    pages: list[int] = []  # page index of each position the cache holds
    tokens = list(ids)
    saved = 0
    x = torch.tensor([ids])
    start = 0
    with torch.no_grad():
        while True:
            out = model(
                input_ids=x,
                cache=cache,
                use_cache=True,
                position_ids=torch.arange(start, start + x.shape[1]).unsqueeze(0),
                attention_mask=torch.ones(1, len(pages) + x.shape[1], dtype=torch.long),
            )
            pages.extend(t // T for t in range(start, start + x.shape[1]))
            total = start + x.shape[1]
            if saved == 0 or total // T > saved // T:
                saved = total
                lo = max(0, total - window) // T
                keep = [i for i, p in enumerate(pages) if p < sink_pages or p >= lo]
                if len(keep) < len(pages):
                    index = torch.tensor(keep)
                    for layer in cache.layers:
                        layer.keys = layer.keys.index_select(2, index)
                        layer.values = layer.values.index_select(2, index)
                    pages = [pages[i] for i in keep]
            tokens.append(int(out.logits[0, -1].argmax()))
            if len(tokens) == len(ids) + new_tokens:
                return tokens
            start = total
            x = torch.tensor([[tokens[-1]]])


class Observe(transformers.StoppingCriteria):
    """Records, after every generation step, what the adapter's sequence and cache hold."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache
        self.steps: list[dict[str, Any]] = []

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        seq = self.cache.sequence
        held = seq.held_pages if seq is not None else []
        self.steps.append(
            {
                "length": input_ids.shape[1],
                "committed": seq.committed_tokens if seq is not None else 0,
                "held_pages": [p.index for p in held],
                "held_page_tokens": sum(p.token_count for p in held),
                "kv_tokens": self.cache.held_tokens,
            }
        )
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def test_window_generate_equals_hand_cropped_model(smollm2: Any, model_daemon: Any) -> None:
    from kvstore_client import hf

    model, tokenizer = smollm2
    sinks, window, new = 16, 32, 40
    ids = prompt_ids(tokenizer, 70)
    ref = window_reference(model, ids, new, sinks, window)
    options = SequenceOptions.sliding_window(window_tokens=window, sink_tokens=sinks)
    with (
        kvstore_client.connect(model_daemon.target) as client,
        hf.KVStoreCache(client, NS, model, options=options) as cache,
    ):
        observe = Observe(cache)
        out = cache.generate(
            model,
            ids,
            max_new_tokens=new,
            do_sample=False,
            stopping_criteria=transformers.StoppingCriteriaList([observe]),
        )
        assert out[0].tolist() == ref
        limit = 1 + window // PAGE_TOKENS + 1  # sink page + window pages + the page filling
        for step in observe.steps:
            assert len(step["held_pages"]) <= limit, step
            assert step["held_pages"][0] == 0, f"the sink page was dropped: {step}"
            # The model's KV holds exactly the held pages' tokens, plus those computed since the
            # last save (the newest token's KV is not computed yet).
            unsaved = step["length"] - 1 - step["committed"]
            assert step["kv_tokens"] == step["held_page_tokens"] + unsaved, step
        assert cache.layers[0].cut_tokens > 0
        dropped = client.stats(NS).namespaces[0].budget_dropped_pages
        assert dropped == len(cache.sequence.dropped) > 0


def test_generate_seals_pages_while_it_runs(smollm2: Any, model_daemon: Any) -> None:
    """Pages fill and are sealed during generation: another client finds them before it ends."""
    from kvstore_client import hf

    model, tokenizer = smollm2
    ids = prompt_ids(tokenizer, 20, "while")
    seen_by_other: list[tuple[int, int]] = []

    with (
        kvstore_client.connect(model_daemon.target) as client,
        kvstore_client.connect(model_daemon.target) as other,
    ):

        class AskOther(transformers.StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                with other.lookup(NS, input_ids[0].tolist()) as hit:
                    seen_by_other.append((input_ids.shape[1], hit.hit_tokens))
                return torch.zeros(input_ids.shape[0], dtype=torch.bool)

        with hf.KVStoreCache(client, NS, model) as cache:
            out = cache.generate(
                model,
                ids,
                max_new_tokens=30,
                do_sample=False,
                stopping_criteria=transformers.StoppingCriteriaList([AskOther()]),
            )
    assert len(out[0]) == 50
    # The page holding tokens 16..31 fills at length 33 (token 32's KV is computed then);
    # the adapter's criterion runs before ours, so the other client hits it in that same step.
    mid = [hit for length, hit in seen_by_other if length < 50]
    assert max(mid) >= 32, seen_by_other
    for length, hit in seen_by_other:
        assert hit == ((length - 1) // PAGE_TOKENS) * PAGE_TOKENS, seen_by_other


def test_static_budget_reserves_up_front_and_refuses_more(smollm2: Any, model_daemon: Any) -> None:
    from kvstore_client import hf

    model, tokenizer = smollm2
    ids = prompt_ids(tokenizer, 30, "for")
    with kvstore_client.connect(model_daemon.target) as client:
        reference = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, 30, dtype=torch.long),
            max_new_tokens=10,
            do_sample=False,
        )
        out, _ = hf.generate(model, ids, client, NS, max_tokens=48, max_new_tokens=10, do_sample=False)
        assert out.tolist() == reference.tolist()
        before = client.stats(NS).namespaces[0]
        with pytest.raises(KVStoreClientError, match="max_tokens=48"):
            hf.generate(model, ids, client, NS, max_tokens=48, max_new_tokens=40, do_sample=False)
        after = client.stats(NS).namespaces[0]
        assert after.pages_reserved == before.pages_reserved == 0  # the refused sequence freed its pages
        # A budget bigger than the pool fails before the model runs.
        with pytest.raises(KVStoreClientError, match="free pages"):
            hf.generate(model, ids, client, NS, max_tokens=10_000, max_new_tokens=1)


def test_importance_budget_from_attention_during_chunked_prefill(smollm2: Any, model_daemon: Any) -> None:
    from kvstore_client import hf

    model, tokenizer = smollm2
    ids = prompt_ids(tokenizer, 160, "try")
    budget, sinks = 5, 16
    held: list[list[int]] = []

    def report(cache: Any, out: Any) -> None:
        cache.report_importance(out.attentions)
        pages = cache.sequence.held_pages
        held.append([p.index for p in pages])
        assert cache.held_tokens == sum(p.token_count for p in pages)

    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # attention weights are returned by eager attention only
    try:
        with kvstore_client.connect(model_daemon.target) as client:
            options = SequenceOptions.importance(budget_pages=budget, sink_tokens=sinks)
            logits, cache = hf.prefill(
                model,
                ids,
                client,
                NS,
                options=options,
                chunk_tokens=PAGE_TOKENS,
                on_chunk=report,
                output_attentions=True,
            )
            with cache:
                assert logits.shape[:2] == (1, len(ids))
                assert math.isfinite(float(logits.float().abs().max()))
                assert cache.held_tokens <= budget * PAGE_TOKENS
                dropped = client.stats(NS).namespaces[0].budget_dropped_pages
                assert dropped == len(ids) // PAGE_TOKENS - budget
    finally:
        model.set_attn_implementation(previous)
    assert len(held) == len(ids) // PAGE_TOKENS
    for pages in held:
        assert len(pages) <= budget and pages[0] == 0, held


def test_logits_to_keep_and_chunked_prefill_match_full_recompute(smollm2: Any, model_daemon: Any) -> None:
    from kvstore_client import hf

    model, tokenizer = smollm2
    ids = prompt_ids(tokenizer, 61, "with")
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits
    with kvstore_client.connect(model_daemon.target) as client:
        logits, cache = hf.prefill(model, ids, client, NS, logits_to_keep=1)
        with cache:
            assert logits.shape == (1, 1, ref.shape[-1])
            assert (logits[0, -1] - ref[0, -1]).abs().max().item() <= TOL
        client.evict(NS, all=True)
        logits, cache = hf.prefill(model, ids, client, NS, chunk_tokens=PAGE_TOKENS)
        with cache:
            assert cache.prefix_tokens == 0
            assert (logits - ref).abs().max().item() <= TOL
