"""The HF adapter's copies between the model's per-layer KV and pool pages (`_hf_cache.py`).

On a CPU pool: one slice `copy_` per page and layer, as the adapter always did. On a CUDA pool
with the KV on the same device: one batched launch over every page and layer
(`kvstore_kernels.pages`: Triton when it imports, else its torch reference), since a copy
per page and layer is a kernel launch each on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate
from typing import Any

import torch

from .pool import PoolMapping

Run = tuple[int, int, int, int]  # (slot, first token in the page, tokens, position in the KV)


def write_runs(mapping: PoolMapping, layers: Sequence[Any], runs: Sequence[Run]) -> None:
    """Copy each run's tokens of every layer's `keys`/`values` (`[1, heads, seq, dim]`) into
    its page."""
    if not runs:
        return
    keys, values = [la.keys for la in layers], [la.values for la in layers]
    if _batched(mapping, keys + values):
        from kvstore_kernels import pages

        slots, starts, counts, positions = (list(x) for x in zip(*runs, strict=True))
        pages.scatter_hf(mapping.view(), slots, starts, counts, positions, keys, values)
        return
    for slot, a, n, at in runs:
        view = mapping.page(slot)
        for layer_idx, layer in enumerate(layers):
            view[layer_idx, 0, a : a + n].copy_(layer.keys[0, :, at : at + n].transpose(0, 1))
            view[layer_idx, 1, a : a + n].copy_(layer.values[0, :, at : at + n].transpose(0, 1))


def read_pages(
    mapping: PoolMapping, views: Sequence[torch.Tensor], counts: Sequence[int], kv: torch.Tensor
) -> None:
    """Fill `kv` (`[layer, kv, 1, head, token, dim]`) with the first `counts[i]` tokens of page
    `views[i]` (views of `mapping`'s pages), in order."""
    if _batched(mapping, [kv]):
        from kvstore_kernels import pages

        pool = mapping.view()
        page_bytes = pool.stride(0) * pool.element_size()
        slots = [(v.data_ptr() - pool.data_ptr()) // page_bytes for v in views]
        positions = [0, *accumulate(counts)][:-1]
        keys, values = list(kv[:, 0]), list(kv[:, 1])
        pages.gather_hf(pool, slots, [0] * len(slots), counts, positions, keys, values)
        return
    at = 0
    for view, t in zip(views, counts, strict=True):
        kv[:, :, 0, :, at : at + t].copy_(view[:, :, :t].transpose(2, 3))  # the one copy
        at += t


def _batched(mapping: PoolMapping, kv: Sequence[torch.Tensor]) -> bool:
    """Whether the batched copy applies: a CUDA pool, the KV on its device, every layer's K
    (and V) of one shape and strides (as a model's own layers are)."""
    device = getattr(mapping, "torch_device", None)
    if device is None or device.type != "cuda":
        return False
    return all(t.device == device and t.shape == kv[0].shape and t.stride() == kv[0].stride() for t in kv)
