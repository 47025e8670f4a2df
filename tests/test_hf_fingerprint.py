"""Model fingerprints (`kvstore_client.hf.model_fingerprint`): stable across processes, changed
by a config field or a weight, and enforced by the daemon for the adapter: a namespace made for
another model refuses `KVStoreCache` with FAILED_PRECONDITION and nothing stored changes."""

from __future__ import annotations

import dataclasses
import pydoc_data.topics
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kvstore_client
import pytest
from kvstore_client.errors import FailedPrecondition

torch = pytest.importorskip("torch")

HERE = Path(__file__).resolve().parent
FP = re.compile(r"^sha256:[0-9a-f]{16}$")
OTHER = "sha256:0123456789abcdef"


def doc_ids(tokenizer: Any, n: int) -> list[int]:
    return tokenizer(pydoc_data.topics.topics["assert"]).input_ids[:n]


def test_fingerprint_is_the_same_in_another_process(smollm2: Any) -> None:
    from kvstore_client import hf

    model, tokenizer = smollm2
    here = (hf.model_fingerprint(model), hf.model_fingerprint(model, tokenizer))
    assert all(FP.match(fp) for fp in here) and here[0] != here[1]
    assert hf.model_fingerprint(model) == here[0]  # and twice in one process
    code = (
        "from kvstore_client import hf; m, t = hf.load_smollm2(); "
        "print(hf.model_fingerprint(m)); print(hf.model_fingerprint(m, t))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert tuple(out.stdout.split()) == here


def test_fingerprint_changes_with_a_config_field_or_a_weight(smollm2: Any) -> None:
    from kvstore_client import hf

    model, _ = smollm2
    base = hf.model_fingerprint(model)
    eps = model.config.rms_norm_eps
    try:
        model.config.rms_norm_eps = eps * 2
        assert hf.model_fingerprint(model) != base
    finally:
        model.config.rms_norm_eps = eps
    weight = model.model.norm.weight
    old = weight.detach()[7].item()
    try:
        with torch.no_grad():
            weight[7] += 1e-3
        assert hf.model_fingerprint(model) != base
    finally:
        with torch.no_grad():
            weight[7] = old
    assert hf.model_fingerprint(model) == base
    # Runtime flags and load paths are not part of it.
    use_cache = model.config.use_cache
    try:
        model.config.use_cache = not use_cache
        assert hf.model_fingerprint(model) == base
    finally:
        model.config.use_cache = use_cache


# The daemon's own background work (the integrity task checksums sealed pages a few ms after
# their seal, the scrubber re-verifies them, zero-ahead zeroes free pages) moves these counters
# whatever a client does.
BACKGROUND_COUNTERS = ("pages_checksummed", "pages_scrubbed", "pages_zeroed")


def _stats(client: Any, name: str) -> Any:
    """The namespace's stats less the background counters: what a request can change."""
    (ns,) = client.stats(name).namespaces
    return dataclasses.replace(ns, **dict.fromkeys(BACKGROUND_COUNTERS, 0))


def test_adapter_is_refused_by_another_models_namespace(smollm2: Any, daemon_factory: Any) -> None:
    from kvstore_client import hf

    model, tokenizer = smollm2
    mine = hf.model_fingerprint(model)
    ids = doc_ids(tokenizer, 40)
    daemon = daemon_factory().start()
    with kvstore_client.connect(daemon.target) as client:
        spec = hf.namespace_spec_for(model, "ours", num_pages=8)
        assert spec.model_fingerprint == mine
        client.create_namespace(spec)
        client.create_namespace(hf.namespace_spec_for(model, "theirs", num_pages=8, model_fingerprint=OTHER))

        # Our namespace serves the adapter (the fingerprints agree).
        for hit in (0, 32):
            _, cache = hf.prefill(model, ids, client, "ours")
            with cache:
                assert cache.hit_tokens == hit and cache.model_fingerprint == mine

        # Something stored in theirs, by a client that sends no fingerprint (accepted).
        with hf.KVStoreCache(client, "theirs", model, model_fingerprint="") as cache:
            cache.prefill(model, ids)
        before = _stats(client, "theirs")
        assert before.pages_sealed == 2 and before.sequences == 0

        for attempt in (
            lambda: hf.prefill(model, ids, client, "theirs"),
            lambda: hf.generate(model, ids, client, "theirs", max_new_tokens=2, do_sample=False),
        ):
            with pytest.raises(FailedPrecondition) as err:
                attempt()
            msg = str(err.value)
            assert "FAILED_PRECONDITION" in msg and mine in msg and OTHER in msg, msg
        # A cache that would only store (Allocate) is refused too.
        cache = hf.KVStoreCache(client, "theirs", model.config, model_fingerprint=mine)
        with cache, pytest.raises(FailedPrecondition, match=re.escape(OTHER)):
            cache.save(ids)
        after = _stats(client, "theirs")
        assert after == before, (before, after)
        assert (after.pages_sealed, after.hit_tokens, after.miss_tokens, after.sequences) == (
            before.pages_sealed,
            before.hit_tokens,
            before.miss_tokens,
            0,
        )
