"""The model side of `kvstore-bench quant`: windows of real text, a prefix's KV through the
quantized page record (encode -> bytes -> decode, exactly what a tier stores), the continuation
scored on the dequantized prefix against the full-precision one, and the codec's speed."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvstore.quant import QuantScheme, codec, decode, encode_array, native

from .harness import BenchError, median


def windows(ids: list[int], n: int, length: int) -> Any:
    """n windows of `length` tokens, disjoint, spread evenly over the text."""
    import torch

    if n * length > len(ids):
        raise BenchError(f"the text has {len(ids)} tokens; {n} windows of {length} need {n * length}")
    stride = (len(ids) - length) // max(1, n - 1)
    return torch.tensor([ids[i * stride : i * stride + length] for i in range(n)])


def prefill(model: Any, prefix: Any) -> np.ndarray:
    """The prefix's KV as pages want it: float32 [B, layer, kv, token, head, dim]."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=prefix, cache=cache, use_cache=True, logits_to_keep=1)
    kv = torch.stack([torch.stack([layer.keys, layer.values]) for layer in cache.layers])  # [L,2,B,H,P,D]
    return kv.permute(2, 0, 1, 4, 3, 5).contiguous().numpy()


@dataclass
class Stored:
    """What the record format stored for a row: every byte, and what each layer got."""

    stored_bytes: int = 0
    represented_bytes: int = 0
    precisions: Counter = field(default_factory=Counter)
    fallbacks: int = 0
    max_error: float = 0.0

    def add(self, enc: Any) -> None:
        self.stored_bytes += enc.stored_bytes
        self.represented_bytes += enc.represented_bytes
        self.precisions.update(enc.precisions)
        self.fallbacks += enc.fallbacks
        self.max_error = max(self.max_error, enc.error)

    @property
    def compression(self) -> float:
        return self.represented_bytes / self.stored_bytes if self.stored_bytes else 0.0


def through_records(
    kv: np.ndarray, scheme: QuantScheme, page_tokens: int, sinks: int, stored: Stored
) -> np.ndarray:
    """kv [B, L, 2, P, H, D] after a trip through quantized page records: each window's
    prefix cut into pages of `page_tokens`; the first page of each keeps `sinks` tokens raw."""
    out = np.empty_like(kv)
    for b in range(kv.shape[0]):
        for p in range(kv.shape[3] // page_tokens):
            span = slice(p * page_tokens, (p + 1) * page_tokens)
            enc = encode_array(
                np.ascontiguousarray(kv[b, :, :, span]), scheme, sink_tokens=sinks if p == 0 else 0
            )
            stored.add(enc)
            out[b, :, :, span] = decode(enc.record).view(np.float32).reshape(out[b, :, :, span].shape)
    return out


def _cache(model: Any, kv: np.ndarray) -> Any:
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    t = torch.from_numpy(kv).permute(1, 2, 0, 4, 3, 5)  # [L, 2, B, H, P, D]
    for layer in range(t.shape[0]):
        cache.update(t[layer, 0].contiguous(), t[layer, 1].contiguous(), layer)
    return cache


def score(model: Any, kv: np.ndarray, cont: Any) -> Any:
    """log-probabilities [B, S, vocab] of the S next tokens, after the prefix `kv`."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=cont, cache=_cache(model, kv), use_cache=True).logits
    return torch.log_softmax(logits.float(), dim=-1)


def greedy(model: Any, kv: np.ndarray, first: Any, steps: int) -> Any:
    """[B, steps] tokens generated greedily after the prefix `kv` and the token `first`."""
    import torch

    cache = _cache(model, kv)
    out, inp = [], first
    with torch.no_grad():
        for _ in range(steps):
            inp = model(input_ids=inp, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            out.append(inp)
    return torch.cat(out, dim=1)


@dataclass
class Accuracy:
    """Sums over windows of one row against the full-precision prefix."""

    nll: float = 0.0
    base_nll: float = 0.0
    kl: float = 0.0
    top1: int = 0
    tokens: int = 0
    greedy_equal: int = 0  # windows whose greedy tokens are all equal
    greedy_prefix: int = 0  # tokens equal before the first difference, summed
    greedy_windows: int = 0

    def add(self, base: Any, got: Any, targets: Any) -> None:
        t = targets.unsqueeze(-1)
        self.nll -= float(got.gather(-1, t).sum())
        self.base_nll -= float(base.gather(-1, t).sum())
        self.kl += float((base.exp() * (base - got)).sum())
        self.top1 += int((base.argmax(-1) == got.argmax(-1)).sum())
        self.tokens += targets.numel()

    def add_greedy(self, base: Any, got: Any) -> None:
        same = (base == got).int()
        self.greedy_equal += int(same.all(dim=1).sum())
        self.greedy_prefix += int(same.cumprod(dim=1).sum())
        self.greedy_windows += base.shape[0]

    def summary(self, greedy_tokens: int) -> dict[str, Any]:
        ppl, base = np.exp(self.nll / self.tokens), np.exp(self.base_nll / self.tokens)
        g = self.greedy_windows
        return {
            "dppl_pct": round(float(ppl / base - 1) * 100, 4),
            "ppl": round(float(ppl), 4),
            "base_ppl": round(float(base), 4),
            "kl": float(f"{self.kl / self.tokens:.3g}"),
            "top1_agreement": round(self.top1 / self.tokens, 4),
            "scored_tokens": self.tokens,
            "greedy_windows": g,
            "greedy_all_equal": round(self.greedy_equal / g, 4) if g else None,
            "greedy_prefix_mean": round(self.greedy_prefix / g, 2) if g else None,
            "greedy_tokens": greedy_tokens if g else None,
        }


def codec_speed(pages: list[np.ndarray], scheme: QuantScheme, repeat: int) -> dict[str, float]:
    """Medians over `repeat` interleaved rounds, each over all `pages` (float32 [L,2,T,H,D]):
    memcpy of the same bytes (the baseline), encode (quantize, measure the error, build the
    record) and decode (verify, dequantize into a page buffer). Ratios are memcpy time / codec
    time: 1.0 = as fast as copying the fp32 bytes."""
    dst = [np.empty_like(p) for p in pages]
    recs = [encode_array(p, scheme).record for p in pages]
    times: dict[str, list[float]] = {"memcpy": [], "encode": [], "decode": []}
    for _ in range(repeat):
        t0 = time.perf_counter()
        for p, d in zip(pages, dst, strict=True):
            np.copyto(d, p)
        t1 = time.perf_counter()
        for p in pages:
            encode_array(p, scheme)
        t2 = time.perf_counter()
        for r, d in zip(recs, dst, strict=True):
            decode(r, out=d)
        t3 = time.perf_counter()
        for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            times[k].append(v)
    m = {k: median(v) for k, v in times.items()}
    nbytes = sum(p.nbytes for p in pages)
    return {
        "codec": "C (kvstore/_quant.c)" if native.available and codec.USE_NATIVE else "numpy",
        "pages": len(pages),
        "memcpy_gbps": round(nbytes / m["memcpy"] / 1e9, 2),
        "encode_ms_per_page": round(m["encode"] / len(pages) * 1e3, 3),
        "decode_ms_per_page": round(m["decode"] / len(pages) * 1e3, 3),
        "quant_memcpy_ratio": round(m["memcpy"] / m["encode"], 4),
        "dequant_memcpy_ratio": round(m["memcpy"] / m["decode"], 4),
    }
