"""vLLM's paged KV blocks <-> kvstore pool pages: one copy of each byte, no staging buffer.

vLLM's CPU attention keeps one tensor per attention layer, `[num_blocks, kv_heads,
block_size, 2 * head_dim]` ("LBHNC"), which its kernels read per (block, head) as the K part
then the V part, `block_size * head_dim` elements each (cpu_attn.py views it as `[blocks,
heads, 2 * block_size, head_dim]` and splits dim 2 in halves). Inside a part the order depends
on the kernel's ISA: its "vec" kernels keep K dim-major (`[dim, token]`) and V token-major
(`[token, dim]`). `probe_part_orders` asks vLLM's own cache-writing op where a token's values
land, so the copies follow whatever the kernel does, and refuses an order it cannot name.

A kvstore page is `[layer, kv, token, head, dim]` (docs/api.md), page_tokens == block_size, so
page `p` <-> block `b` is a K copy and a V copy per layer, each one strided `copy_`: the pages
hold the model's KV in the pool's own layout, whichever kernel wrote it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVGeometry:
    """What a kvstore namespace for this model must hold (page_tokens = vLLM's block size)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_size: int


TOKEN_MAJOR, DIM_MAJOR = "token-major", "dim-major"


def probe_part_orders(g: KVGeometry, kv_cache_dtype: str = "auto") -> tuple[str, str]:
    """The order of the K and V parts of a vLLM CPU block, as vLLM's cache-writing op for this
    geometry lays them out: TOKEN_MAJOR (`[token, dim]`) or DIM_MAJOR (`[dim, token]`)."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(g.dtype, g.block_size, g.head_dim, kv_cache_dtype)
    T, H, D = g.block_size, g.num_kv_heads, g.head_dim
    slots = torch.arange(T)
    orders = []
    # Token t's K (and V) is t + 1 in every dim, then dim d is d + 1 for every token: small
    # integers, exact in every float type (T, D <= 256).
    by_token = (torch.arange(T, dtype=torch.float32) + 1).view(T, 1, 1).expand(T, H, D)
    by_dim = (torch.arange(D, dtype=torch.float32) + 1).view(1, 1, D).expand(T, H, D)
    parts = []
    for src in (by_token, by_dim):
        cache = torch.zeros(1, H, 2 * T, D, dtype=g.dtype)
        k_part, v_part = cache.chunk(2, dim=2)
        x = src.to(g.dtype).contiguous()
        ops.cpu_attn_reshape_and_cache(x, x.clone(), k_part, v_part, slots, isa)
        parts.append((k_part[0, 0].reshape(-1).float(), v_part[0, 0].reshape(-1).float()))
    for which in (0, 1):
        token_of, dim_of = parts[0][which], parts[1][which]
        t = torch.arange(T, dtype=torch.float32) + 1
        d = torch.arange(D, dtype=torch.float32) + 1
        if torch.equal(token_of, t.repeat_interleave(D)) and torch.equal(dim_of, d.repeat(T)):
            orders.append(TOKEN_MAJOR)
        elif torch.equal(token_of, t.repeat(D)) and torch.equal(dim_of, d.repeat_interleave(T)):
            orders.append(DIM_MAJOR)
        else:
            raise NotImplementedError(
                f"vLLM's CPU attention ({isa!r} kernels, {g.dtype}) packs the {'KV'[which]} of a block in an "
                "order KVStoreConnector does not know (neither [token, dim] nor [dim, token])"
            )
    return orders[0], orders[1]


def _check_layer(t: torch.Tensor, g: KVGeometry) -> None:
    _, heads, tokens, width = t.shape
    if (heads, tokens, width) != (g.num_kv_heads, g.block_size, 2 * g.head_dim) or t.dtype != g.dtype:
        raise ValueError(
            f"a vLLM KV cache tensor has shape {tuple(t.shape)} {t.dtype}; the connector expects "
            f"[blocks, {g.num_kv_heads}, {g.block_size}, {2 * g.head_dim}] {g.dtype} (CPU attention's "
            "layout): this attention backend's layout is not supported"
        )


def _parts(x: torch.Tensor, g: KVGeometry, orders: tuple[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Layers `[layer, block, head, token, 2 * dim]` -> their K and V as `[layer, block, token,
    head, dim]` views (`view`, never `reshape`: a copy here would be written instead of vLLM's)."""
    n, blocks, heads, tokens, _ = x.shape
    halves = x.view(n, blocks, heads, 2, tokens * g.head_dim)
    out = []
    for which, order in enumerate(orders):
        part = halves[:, :, :, which]
        if order == TOKEN_MAJOR:
            out.append(part.view(n, blocks, heads, tokens, g.head_dim).permute(0, 1, 3, 2, 4))
        else:
            out.append(part.view(n, blocks, heads, g.head_dim, tokens).permute(0, 1, 4, 2, 3))
    return out[0], out[1]


class BlockCopier:
    """Copies whole blocks of every layer between vLLM's KV tensors and pool pages."""

    def __init__(self, layers: Sequence[torch.Tensor], g: KVGeometry, orders: tuple[str, str]) -> None:
        if len(layers) != g.num_layers:
            raise ValueError(f"{len(layers)} KV cache tensors for {g.num_layers} layers")
        for t in layers:
            _check_layer(t, g)
        # Each layer's K and V as [block, token, head, dim] views. One copy_ per layer and part:
        # torch's copy of a [layer, token, head, dim] view across vLLM's layer stride ran 5-15x
        # slower here (5.9 MB pages: ~4 ms a page per layer, 20-30 ms as one copy).
        self._layers = [tuple(x[0] for x in _parts(t.unsqueeze(0), g, orders)) for t in layers]

    def load(self, pages: Iterable[torch.Tensor], block_ids: Iterable[int]) -> None:
        """Copy each pool page `[layer, kv, token, head, dim]` into its vLLM block."""
        for page, block in zip(pages, block_ids, strict=True):
            for layer, (k, v) in enumerate(self._layers):
                k[block].copy_(page[layer, 0])
                v[block].copy_(page[layer, 1])

    def save(self, block_ids: Iterable[int], pages: Iterable[torch.Tensor]) -> None:
        """Copy each vLLM block (every layer) into its pool page."""
        for block, page in zip(block_ids, pages, strict=True):
            for layer, (k, v) in enumerate(self._layers):
                page[layer, 0].copy_(k[block])
                page[layer, 1].copy_(v[block])
