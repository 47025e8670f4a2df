"""The adapter takes only a namespace whose geometry and dtype are the model's: any other is
refused up front, naming both, before anything is looked up or stored (an int8 namespace used to
truncate the KV and change the generated text without a word; a float8 one failed with a torch
error after storing lossy pages). And it calls transformers through its current Cache API."""

from __future__ import annotations

import copy
import pydoc_data.topics
import re
import warnings
from typing import Any

import kvstore_client
import pytest
from kvstore_client.errors import InvalidArgument
from model_fixtures import model_namespace

torch = pytest.importorskip("torch")

BASE = model_namespace("fp32", num_pages=8)  # the model's own: 30 layers, 3 KV heads, 64 dims, fp32
MISMATCHED = {
    "int8": ("dtype", "int8", "float32"),
    "fp8": ("dtype", "float8_e4m3fn", "float32"),
    "fp16": ("dtype", "float16", "float32"),
    "dim32": ("head_dim", "32", "64"),
    "layers29": ("num_layers", "29", "30"),
    "heads1": ("num_kv_heads", "1", "3"),
}
OVERRIDES = {
    "int8": {"dtype": "int8"},
    "fp8": {"dtype": "float8_e4m3fn"},
    "fp16": {"dtype": "float16"},
    "dim32": {"head_dim": 32},
    "layers29": {"num_layers": 29},
    "heads1": {"num_kv_heads": 1},
}


def doc_ids(tokenizer: Any, n: int) -> list[int]:
    return tokenizer(pydoc_data.topics.topics["assert"]).input_ids[:n]


@pytest.fixture
def geometry_daemon(daemon_factory: Any) -> Any:
    namespaces = [BASE, *({**BASE, "name": name, **o} for name, o in OVERRIDES.items())]
    return daemon_factory(namespaces=namespaces).start()


def _untouched(client: Any, name: str) -> None:
    (ns,) = client.stats(name).namespaces
    assert (ns.pages_sealed, ns.hit_tokens, ns.miss_tokens, ns.sequences) == (0, 0, 0, 0), ns


def test_a_namespace_of_another_geometry_or_dtype_is_refused_up_front(
    smollm2: Any, geometry_daemon: Any
) -> None:
    from kvstore_client import hf

    model, tokenizer = smollm2
    ids = doc_ids(tokenizer, 40)
    with kvstore_client.connect(geometry_daemon.target) as client:
        for name, (field, theirs, ours) in MISMATCHED.items():
            for attempt in (
                lambda name=name: hf.KVStoreCache(client, name, model),
                lambda name=name: hf.KVStoreCache(client, name, model.config),
                lambda name=name: hf.prefill(model, ids, client, name),
                lambda name=name: hf.generate(model, ids, client, name, max_new_tokens=2, do_sample=False),
            ):
                with pytest.raises(InvalidArgument) as err:
                    attempt()
                msg = str(err.value)
                assert f"namespace {name!r}" in msg and f"{field}={theirs}" in msg, msg
                assert re.search(rf"the model has {field}={ours}\b", msg), msg
            _untouched(client, name)
        # The model's own namespace serves it.
        logits, cache = hf.prefill(model, ids, client, "fp32")
        with cache:
            assert logits.shape[1] == len(ids)


def test_a_cache_made_from_a_config_checks_the_model_it_runs(smollm2: Any, geometry_daemon: Any) -> None:
    """A config that says float16 passes for the fp16 namespace; the fp32 model given to
    prefill/generate is then refused before anything is looked up or stored."""
    from kvstore_client import hf

    model, tokenizer = smollm2
    ids = doc_ids(tokenizer, 40)
    config = copy.deepcopy(model.config)
    config.dtype = torch.float16
    with kvstore_client.connect(geometry_daemon.target) as client:
        for run in (
            lambda cache: cache.prefill(model, ids),
            lambda cache: cache.generate(model, ids, max_new_tokens=2, do_sample=False),
        ):
            with (
                hf.KVStoreCache(client, "fp16", config) as cache,
                pytest.raises(InvalidArgument, match=r"dtype=float16.*the model has dtype=float32"),
            ):
                run(cache)
        _untouched(client, "fp16")


def test_no_deprecated_transformers_api(smollm2: Any, geometry_daemon: Any) -> None:
    """prefill and generate pass the cache as transformers' current API wants it (5.x warns
    that `past_key_values=` goes away in 5.40 / 6.0)."""
    from kvstore_client import hf

    model, tokenizer = smollm2
    ids = doc_ids(tokenizer, 40)
    with kvstore_client.connect(geometry_daemon.target) as client, warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        _, cache = hf.prefill(model, ids, client, "fp32")
        cache.release()
        out, hit = hf.generate(model, ids, client, "fp32", max_new_tokens=2, do_sample=False)
        assert hit == 32 and out.shape[1] == len(ids) + 2
