"""The arithmetic of `kvstore-bench quant` without the model: pages through real records, the
bytes counted, and the accuracy measures on log-probabilities of known difference."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the benchmark needs torch")

from kvstore_bench import quant, quant_eval  # noqa: E402

from kvstore.quant import QuantScheme  # noqa: E402


def test_through_records_counts_every_byte_and_keeps_sinks() -> None:
    rng = np.random.default_rng(0)
    kv = rng.standard_normal((2, 3, 2, 128, 2, 64)).astype(np.float32)  # 2 windows of 2 pages
    stored = quant_eval.Stored()
    out = quant_eval.through_records(kv, QuantScheme.preset("int4"), 64, 1, stored)
    assert out.shape == kv.shape
    assert np.array_equal(out[:, :, :, :1], kv[:, :, :, :1])  # the first page's sink, exact
    assert not np.array_equal(out[:, :, :, 64:65], kv[:, :, :, 64:65])  # the second page has none
    assert stored.represented_bytes == kv.nbytes
    assert stored.precisions == {"int4": 2 * 2 * 3}
    assert 5.5 < stored.compression < 6.1  # 42 B per 256 B vector, plus the sinks and headers


def test_accuracy_measures() -> None:
    base = torch.log_softmax(torch.randn(2, 5, 11), dim=-1)
    targets = torch.randint(0, 11, (2, 5))
    same = quant_eval.Accuracy()
    same.add(base, base, targets)
    s = same.summary(4)
    assert (s["dppl_pct"], s["kl"], s["top1_agreement"]) == (0.0, 0.0, 1.0)
    worse = quant_eval.Accuracy()
    worse.add(base, torch.log_softmax(base * 0.5, dim=-1), targets)
    gen = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    worse.add_greedy(gen, torch.tensor([[1, 2, 9, 4], [5, 6, 7, 8]]))
    w = worse.summary(4)
    assert w["kl"] > 0 and w["greedy_all_equal"] == 0.5 and w["greedy_prefix_mean"] == 3.0


def test_report_and_text() -> None:
    args = argparse.Namespace(
        greedy_tokens=4, windows=2, page_tokens=64, prefix_pages=2, score_tokens=5, greedy_windows=1
    )
    table = quant.rows(3, early=1, bound=0.1)
    base = torch.log_softmax(torch.randn(1, 5, 11), dim=-1)
    acc, stored = {}, {}
    for i, (name, *_) in enumerate(table):
        acc[name] = quant_eval.Accuracy()
        acc[name].add(
            base, torch.log_softmax(base * (1 - 0.05 * i), dim=-1), torch.zeros(1, 5, dtype=torch.long)
        )
        stored[name] = quant_eval.Stored(stored_bytes=100, represented_bytes=400)
    sp = {
        "codec": "C",
        "quant_memcpy_ratio": 0.1,
        "dequant_memcpy_ratio": 0.3,
        "encode_ms_per_page": 1,
        "decode_ms_per_page": 1,
        "memcpy_gbps": 9,
    }
    r = quant.report(args, table, acc, stored, {"int8": sp, "int4": sp}, "text", 1000)
    for key in (
        "int8_dppl_pct",
        "int8_kl",
        "int4_dppl_pct",
        "outlier_recovery",
        "int8_compression",
        "int4_compression",
        "quant_memcpy_ratio",
        "dequant_memcpy_ratio",
    ):
        assert key in r and key in r["goals_met"]
    assert r["int8_compression"] == 4.0
    r["others_cpus"] = 0.0
    assert "int4_plain" in quant.format_text(r)
