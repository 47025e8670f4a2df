"""The torch reference of `pages` (the oracle the kernels are tested against): one slice
`copy_` per run, layer and K/V, straight from the layouts, with none of the kernels' offset
arithmetic. Correct anywhere, slow on a GPU (a launch per copy)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensors = Sequence[torch.Tensor]
Ints = Sequence[int]


def scatter_hf(pool: torch.Tensor, slots: Ints, starts: Ints, counts: Ints, positions: Ints,
               keys: Tensors, values: Tensors, batch: int = 0) -> None:  # fmt: skip
    for s, a, n, p in zip(slots, starts, counts, positions, strict=True):
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            pool[s, layer, 0, a : a + n].copy_(k[batch, :, p : p + n].transpose(0, 1))
            pool[s, layer, 1, a : a + n].copy_(v[batch, :, p : p + n].transpose(0, 1))


def gather_hf(pool: torch.Tensor, slots: Ints, starts: Ints, counts: Ints, positions: Ints,
              keys: Tensors, values: Tensors, batch: int = 0) -> None:  # fmt: skip
    for s, a, n, p in zip(slots, starts, counts, positions, strict=True):
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            k[batch, :, p : p + n].copy_(pool[s, layer, 0, a : a + n].transpose(0, 1))
            v[batch, :, p : p + n].copy_(pool[s, layer, 1, a : a + n].transpose(0, 1))


def scatter_blocks(pool: torch.Tensor, slots: Ints, block_ids: Ints, keys: Tensors, values: Tensors) -> None:
    for s, b in zip(slots, block_ids, strict=True):
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            pool[s, layer, 0].copy_(k[b])
            pool[s, layer, 1].copy_(v[b])


def gather_blocks(pool: torch.Tensor, slots: Ints, block_ids: Ints, keys: Tensors, values: Tensors) -> None:
    for s, b in zip(slots, block_ids, strict=True):
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            k[b].copy_(pool[s, layer, 0])
            v[b].copy_(pool[s, layer, 1])
