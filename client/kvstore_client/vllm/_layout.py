"""vLLM's paged KV blocks <-> kvstore pool pages: one copy each way, no staging buffer.

vLLM's CPU attention backend keeps one tensor per attention layer, `[num_blocks, kv_heads,
block_size, 2 * head_dim]` in its "LBHNC" layout, but its kernels read each (block, head) as the
block's K rows `[block_size, head_dim]` followed by its V rows (cpu_attn.py views it as
`[blocks, heads, 2 * block_size, head_dim]` and splits dim 2 in halves). So a block of one layer
is `[head, kv, token, dim]`. A kvstore page is `[layer, kv, token, head, dim]` (docs/api.md) with
page_tokens == block_size, so page `p` <-> block `b` is one permuted copy of every layer.

The per-layer tensors vLLM registers are views of one allocation at a fixed layer stride
(KVCacheTensor.layer_stride); when they are, all layers are seen as one strided
`[layer, block, head, kv, token, dim]` tensor and a page moves in a single `copy_`.
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


def _block_view(t: torch.Tensor, g: KVGeometry) -> torch.Tensor:
    blocks, heads, tokens, width = t.shape
    if (heads, tokens, width) != (g.num_kv_heads, g.block_size, 2 * g.head_dim) or t.dtype != g.dtype:
        raise ValueError(
            f"a vLLM KV cache tensor has shape {tuple(t.shape)} {t.dtype}; the connector expects "
            f"[blocks, {g.num_kv_heads}, {g.block_size}, {2 * g.head_dim}] {g.dtype} (CPU attention's "
            "layout): this attention backend's layout is not supported"
        )
    return t.view(blocks, heads, 2, tokens, g.head_dim)  # [block, head, kv, token, dim]


class BlockCopier:
    """Copies whole blocks of every layer between vLLM's KV tensors and pool pages."""

    def __init__(self, layers: Sequence[torch.Tensor], g: KVGeometry) -> None:
        if len(layers) != g.num_layers:
            raise ValueError(f"{len(layers)} KV cache tensors for {g.num_layers} layers")
        views = [_block_view(t, g) for t in layers]
        stacked = _as_one_tensor(views)
        # [layer, block, head, kv, token, dim], as one tensor or one per layer
        self._groups = [stacked] if stacked is not None else [v.unsqueeze(0) for v in views]
        self.one_tensor = stacked is not None
        self.num_blocks = views[0].shape[0]

    def load(self, pages: Iterable[torch.Tensor], block_ids: Iterable[int]) -> None:
        """Copy each pool page `[layer, kv, token, head, dim]` into its vLLM block."""
        for page, block in zip(pages, block_ids, strict=True):
            src = page.permute(0, 3, 1, 2, 4)  # -> [layer, head, kv, token, dim]
            at = 0
            for group in self._groups:
                n = group.shape[0]
                group[:, block].copy_(src[at : at + n])
                at += n

    def save(self, block_ids: Iterable[int], pages: Iterable[torch.Tensor]) -> None:
        """Copy each vLLM block (every layer) into its pool page."""
        for block, page in zip(block_ids, pages, strict=True):
            dst = page.permute(0, 3, 1, 2, 4)
            at = 0
            for group in self._groups:
                n = group.shape[0]
                dst[at : at + n].copy_(group[:, block])
                at += n


def _as_one_tensor(views: list[torch.Tensor]) -> torch.Tensor | None:
    """The layers as one strided tensor when they are equally spaced views of one storage."""
    first = views[0]
    if len(views) == 1:
        return first.unsqueeze(0)
    storage = first.untyped_storage().data_ptr()
    step = views[1].storage_offset() - first.storage_offset()
    for i, v in enumerate(views):
        if (
            v.untyped_storage().data_ptr() != storage
            or v.stride() != first.stride()
            or v.storage_offset() != first.storage_offset() + i * step
        ):
            return None
    if step <= 0:
        return None
    size = (len(views), *first.shape)
    try:
        return first.as_strided(size, (step, *first.stride()), first.storage_offset())
    except RuntimeError:  # (the storage does not reach that far: not one allocation after all)
        return None
