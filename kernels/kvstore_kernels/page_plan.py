"""What one gather/scatter call hands a kernel (`Plan`, made by `pages.plan`) and the base
tensor a kernel addresses words from (`words`): apart from `pages`, so the kernel modules
`pages` loads on first use need not import it back."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Plan:
    """One call's copies as the kernels take them (index tensors on the tensors' device)."""

    pool: torch.Tensor  # element 0 of the pool's page 0
    run_pages: torch.Tensor  # int64 [runs]: element offset of each run's page from `pool`
    run_starts: torch.Tensor  # int32 [runs]: first token of the run in its page
    run_counts: torch.Tensor  # int32 [runs]
    engine: torch.Tensor  # the engine K/V tensor with the lowest address
    kv_offsets: torch.Tensor  # int64 [2 * layers]: layer l's K (2l) and V (2l + 1) from `engine`
    run_index: torch.Tensor  # int64 [runs]: each run's sequence position or block, times...
    strides: tuple[int, ...]  # K's (run, token, head, dim) strides, then V's
    tokens: int  # page_tokens
    heads: int
    dim: int  # in words
    word: int  # bytes the kernels move as one unit (elements joined where alignment allows)
    max_count: int  # largest run_count (the kernels' tile loop bound)

    @property
    def runs(self) -> int:
        return self.run_pages.numel()

    @property
    def layers(self) -> int:
        return self.kv_offsets.numel() // 2

    @property
    def nbytes(self) -> int:
        """Bytes one call moves (each counted once)."""
        per_token = 2 * self.layers * self.heads * self.dim * self.word
        return int(self.run_counts.sum()) * per_token


def words(t: torch.Tensor, word: int) -> torch.Tensor:
    """A 1-element tensor of `word`-byte integers at `t`'s address (what the kernels take as a
    base: its address and unit)."""
    dtype = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[word]
    at = t.storage_offset() * t.element_size()
    return torch.empty(0, dtype=dtype, device=t.device).set_(t.untyped_storage(), at // word, (1,), (1,))
