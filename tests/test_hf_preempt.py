"""Preempting a generation on the real model: swap the sequence out below the pool (its pool
pages freed, the model's KV tensors freed), bring it back and go on; or drop it and recompute.
Either way the greedy tokens equal an uninterrupted run of the model alone."""

from __future__ import annotations

import pydoc_data.topics
from pathlib import Path
from typing import Any

import kvstore_client
import pytest
from model_fixtures import model_namespace

torch = pytest.importorskip("torch")

NS = "smollm2"


@pytest.fixture
def tiered_daemon(daemon_factory: Any, tmp_path: Path) -> Any:
    server = {
        "host_tier_bytes": 64 << 20,
        "disk_tier_dir": str(tmp_path / "disk"),
        "disk_tier_bytes": 256 << 20,
    }
    return daemon_factory(server=server, namespaces=[model_namespace(NS)]).start()


def uninterrupted(model: Any, ids: list[int], new_tokens: int) -> list[int]:
    batch = torch.tensor([ids])
    out = model.generate(
        batch, attention_mask=torch.ones_like(batch), max_new_tokens=new_tokens, do_sample=False
    )
    return out[0].tolist()


@pytest.mark.parametrize("how", ["swap", "drop"])
def test_preempted_generation_gives_the_uninterrupted_tokens(
    how: str, smollm2: Any, tiered_daemon: Any
) -> None:
    from kvstore_client import hf

    model, tokenizer = smollm2
    ids = tokenizer(pydoc_data.topics.topics["while"]).input_ids[:45]
    want = uninterrupted(model, ids, 30)
    with kvstore_client.connect(tiered_daemon.target) as client, hf.KVStoreCache(client, NS, model) as cache:
        first = cache.generate(model, ids, max_new_tokens=12, do_sample=False)
        assert first[0].tolist() == want[:57]
        before = client.stats(NS)
        if how == "swap":
            result = cache.swap_out(first[0])
            assert result.pages_swapped == 4  # 56 tokens of KV: 3 full pages and a partial one
            after = client.stats(NS)
            assert after.tiers.swapped_pages == 4
            assert after.namespaces[0].pages_free == before.namespaces[0].pages_free + result.pages_freed
            client.evict(NS, all=True)  # nothing of it is left in the pool
            assert client.stats(NS).namespaces[0].pages_sealed == 0
        else:
            result = cache.drop()
            assert result.pages_freed == 4 and cache.sequence.num_tokens == 0
        assert cache.held_tokens == 0  # the model's KV tensors are gone too
        out = cache.resume(model, first[0], max_new_tokens=18, do_sample=False)
        assert out[0].tolist() == want
        if how == "swap":
            assert client.stats(NS).tiers.swapped_pages == 0
