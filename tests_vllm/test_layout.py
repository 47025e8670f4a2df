"""The block <-> page copies against vLLM's own cache-writing op (no engine: seconds)."""

from __future__ import annotations

import pytest
import torch
from kvstore_client.vllm._layout import DIM_MAJOR, TOKEN_MAJOR, BlockCopier, KVGeometry, probe_part_orders

G = KVGeometry(num_layers=3, num_kv_heads=3, head_dim=64, dtype=torch.float32, block_size=128)


def vllm_caches(g: KVGeometry, blocks: int) -> list[torch.Tensor]:
    """One allocation, a view per layer, as vLLM's CPU worker makes them."""
    whole = torch.zeros(g.num_layers, blocks, g.num_kv_heads, g.block_size, 2 * g.head_dim, dtype=g.dtype)
    return list(whole.unbind(0))


def write_tokens(layer: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """vLLM's own write of K/V `[tokens, head, dim]` into a layer's cache at `slots`."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    blocks, heads, tokens, _ = layer.shape
    k_part, v_part = layer.view(blocks, heads, 2 * tokens, -1).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(
        k, v, k_part, v_part, slots, _get_attn_isa(layer.dtype, tokens, k.shape[-1])
    )


def test_orders_are_named() -> None:
    assert probe_part_orders(G) in {
        (a, b) for a in (TOKEN_MAJOR, DIM_MAJOR) for b in (TOKEN_MAJOR, DIM_MAJOR)
    }


@pytest.mark.parametrize("one_allocation", [True, False])
def test_a_block_saved_is_the_model_kv_and_loads_back_bit_exact(one_allocation: bool) -> None:
    g, T = G, G.block_size
    layers = vllm_caches(g, blocks=4)
    if not one_allocation:  # separate tensors
        layers = [t.clone() for t in layers]
    gen = torch.Generator().manual_seed(0)
    kv = torch.randn(g.num_layers, 2, T, g.num_kv_heads, g.head_dim, generator=gen)  # a page's worth
    slots = torch.arange(2 * T, 3 * T)  # block 2
    for i, layer in enumerate(layers):
        write_tokens(layer, slots, kv[i, 0].contiguous(), kv[i, 1].contiguous())
    copier = BlockCopier(layers, g, probe_part_orders(g))

    page = torch.full((g.num_layers, 2, T, g.num_kv_heads, g.head_dim), float("nan"))
    copier.save([2], [page])
    assert torch.equal(page, kv)  # [layer, kv, token, head, dim]: the pool's layout

    before = [t.clone() for t in layers]
    for t in layers:
        t[2].zero_()
    copier.load([page], [2])
    assert all(torch.equal(a, b) for a, b in zip(layers, before, strict=True))
    assert all(t[[0, 1, 3]].abs().sum() == 0 for t in layers)  # no other block touched
