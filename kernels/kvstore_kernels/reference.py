"""Torch reference page kernels: readable, correct on any device, the yardstick
every Triton/CuPy kernel is tested against.

A pool view is a tensor `[num_pages, *page_shape]` (see
`kvstore_client.PoolMapping.view()`); slots index its first dimension.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _index(slots: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(slots, dtype=torch.long, device=device)


def gather_pages(pool: torch.Tensor, slots: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """A new contiguous tensor `[len(slots), *page_shape]` holding the pages in order."""
    return pool.index_select(0, _index(slots, pool.device))


def scatter_pages(pool: torch.Tensor, slots: Sequence[int] | torch.Tensor, pages: torch.Tensor) -> None:
    """Write `pages[i]` into `pool[slots[i]]` in place."""
    if pages.shape[1:] != pool.shape[1:] or pages.shape[0] != len(slots):
        raise ValueError(
            f"pages has shape {tuple(pages.shape)}; expected ({len(slots)}, {', '.join(map(str, pool.shape[1:]))})"
        )
    pool.index_copy_(0, _index(slots, pool.device), pages.to(pool.dtype))


def copy_pages(
    src: torch.Tensor,
    src_slots: Sequence[int] | torch.Tensor,
    dst: torch.Tensor,
    dst_slots: Sequence[int] | torch.Tensor,
) -> None:
    """Copy pages between two pools (or within one) of the same page shape."""
    scatter_pages(dst, dst_slots, gather_pages(src, src_slots).to(dst.device))
