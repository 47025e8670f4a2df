"""Ugly cases for the page gather/scatter kernels (kernels/kvstore_kernels/pages.py), shared by
tests/test_pages_triton.py and tests/test_pages_cupy.py: odd heads and head_dim, partial last
pages, slots and blocks out of order, a padded pool, non-contiguous engine tensors, layers
in separate allocations and as views of one. Small: the Triton interpreter runs every program
in Python."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def noise(shape: tuple[int, ...], dtype: torch.dtype, seed: int, device: str) -> torch.Tensor:
    """Random bits of `dtype` (NaNs included: the copies move bits, compared as bits)."""
    g = torch.Generator().manual_seed(seed)
    size = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(-(2**15), 2**15, (*shape, size), generator=g, dtype=torch.int32).to(torch.uint8)
    return raw.view(dtype).reshape(shape).to(device)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(BITS[t.element_size()]).cpu()


def pool(pages: int, layers: int, tokens: int, heads: int, dim: int, dtype: torch.dtype, pad: int,
         seed: int, device: str) -> torch.Tensor:  # fmt: skip
    """A `[pages, layer, 2, token, head, dim]` pool of noise whose pages are `pad` elements
    apart beyond their size (as a pool's page_stride may be)."""
    page = layers * 2 * tokens * heads * dim
    flat = noise((pages, page + pad), dtype, seed, device)
    return flat[:, :page].unflatten(1, (layers, 2, tokens, heads, dim))


def hf_layers(layers: int, batch: int, heads: int, seq: int, dim: int, dtype: torch.dtype, style: str,
              seed: int, device: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:  # fmt: skip
    """Per-layer K and V `[batch, heads, seq, dim]`: "separate" (one allocation each, as a model
    makes them), "one" (views of one `[layer, 2, batch, heads, seq, dim]`, as the adapter's
    load makes them), "seq-major" (views of `[batch, seq, heads, dim]`: not contiguous)."""
    if style == "one":
        kv = noise((layers, 2, batch, heads, seq, dim), dtype, seed, device)
        return [kv[i, 0] for i in range(layers)], [kv[i, 1] for i in range(layers)]
    out: list[list[torch.Tensor]] = [[], []]
    for i in range(2 * layers):
        if style == "seq-major":
            t = noise((batch, seq, heads, dim), dtype, seed + i, device).transpose(1, 2)
        else:
            t = noise((batch, heads, seq, dim), dtype, seed + i, device)
        out[i % 2].append(t)
    return out[0], out[1]


def block_layers(layers: int, blocks: int, tokens: int, heads: int, dim: int, dtype: torch.dtype, style: str,
                 seed: int, device: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:  # fmt: skip
    """Per-layer K and V `[blocks, tokens, heads, dim]` views: "flash" (vLLM's GPU layout, a
    `[2, blocks, tokens, heads, dim]` tensor a layer), "cpu" (our CPU connector's: a
    `[blocks, heads, 2 * tokens * dim]` tensor, K token-major, V dim-major)."""
    keys, values = [], []
    for i in range(layers):
        if style == "flash":
            kv = noise((2, blocks, tokens, heads, dim), dtype, seed + i, device)
            keys.append(kv[0])
            values.append(kv[1])
        else:
            x = noise((blocks, heads, 2, tokens * dim), dtype, seed + i, device)
            keys.append(x[:, :, 0].unflatten(2, (tokens, dim)).permute(0, 2, 1, 3))
            values.append(x[:, :, 1].unflatten(2, (dim, tokens)).permute(0, 3, 1, 2))
    return keys, values


@dataclass(frozen=True)
class HFCase:
    layers: int
    heads: int
    dim: int
    tokens: int  # page_tokens
    dtype: torch.dtype
    style: str
    batch: int  # the row copied, of batch + 1
    # (slot, first token in the page, count, sequence position)
    runs: tuple[tuple[int, int, int, int], ...]
    pad: int = 0

    @property
    def seq(self) -> int:
        return max(p + n for _, _, n, p in self.runs) + 3


HF_CASES = [
    # a prompt of 37 tokens in 16-token pages, slots out of order, partial last page
    HFCase(3, 3, 5, 16, torch.float32, "separate", 0, ((5, 0, 16, 0), (1, 0, 16, 16), (3, 0, 5, 32)), pad=7),
    # a save that starts mid-page (the adapter's _write), head_dim past 128, bf16
    HFCase(2, 1, 130, 4, torch.bfloat16, "one", 0, ((2, 3, 1, 3), (0, 0, 4, 4), (4, 0, 2, 8))),
    # non-contiguous K/V, batch row 1, fp16, one token pages
    HFCase(2, 2, 64, 1, torch.float16, "seq-major", 1, ((3, 0, 1, 0), (0, 0, 1, 2), (1, 0, 1, 1))),
    # one layer, one head, dim 1, 8-bit
    HFCase(1, 1, 1, 3, torch.uint8, "separate", 0, ((1, 1, 2, 0), (0, 0, 3, 2)), pad=1),
]


@dataclass(frozen=True)
class BlockCase:
    layers: int
    heads: int
    dim: int
    tokens: int
    dtype: torch.dtype
    style: str
    pairs: tuple[tuple[int, int], ...]  # (slot, block)
    pad: int = 0


BLOCK_CASES = [
    BlockCase(3, 3, 5, 4, torch.float32, "flash", ((4, 2), (0, 5), (2, 0)), pad=3),
    BlockCase(2, 2, 7, 3, torch.bfloat16, "cpu", ((1, 3), (3, 1), (0, 4))),
    BlockCase(2, 1, 130, 2, torch.float16, "cpu", ((2, 0), (0, 2))),
    # bf16 rows of 8 that move as 8-byte words (Plan.word)
    BlockCase(2, 2, 8, 2, torch.bfloat16, "flash", ((1, 0), (0, 1))),
]


def hf_tensors(
    c: HFCase, device: str, seed: int
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    pages = max(s for s, *_ in c.runs) + 2
    p = pool(pages, c.layers, c.tokens, c.heads, c.dim, c.dtype, c.pad, seed, device)
    k, v = hf_layers(c.layers, c.batch + 1, c.heads, c.seq, c.dim, c.dtype, c.style, seed + 100, device)
    return p, k, v


def block_tensors(
    c: BlockCase, device: str, seed: int
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    pages = max(s for s, _ in c.pairs) + 2
    blocks = max(b for _, b in c.pairs) + 2
    p = pool(pages, c.layers, c.tokens, c.heads, c.dim, c.dtype, c.pad, seed, device)
    k, v = block_layers(c.layers, blocks, c.tokens, c.heads, c.dim, c.dtype, c.style, seed + 100, device)
    return p, k, v


def clone_all(p: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor]) -> tuple:  # type: ignore[type-arg]
    """Copies of a pool (its whole storage: padding included) and the engine tensors, which
    keep their strides and their sharing of one allocation where they had it."""

    def storage_copy(t: torch.Tensor, memo: dict[int, torch.Tensor]) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in memo:
            s = t.untyped_storage()
            memo[key] = torch.empty(0, dtype=torch.uint8, device=t.device).set_(s.clone())
        base = memo[key]
        return torch.empty(0, dtype=t.dtype, device=t.device).set_(
            base.untyped_storage(), t.storage_offset(), t.shape, t.stride()
        )

    memo: dict[int, torch.Tensor] = {}
    return storage_copy(p, memo), [storage_copy(t, memo) for t in k], [storage_copy(t, memo) for t in v]


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Every byte of the two tensors' allocations equal (what a copy must not touch too)."""
    return torch.equal(
        torch.empty(0, dtype=torch.uint8).set_(a.untyped_storage().cpu()),
        torch.empty(0, dtype=torch.uint8).set_(b.untyped_storage().cpu()),
    )


Kernel = Callable[[Any, bool], None]  # (pages.Plan, to_pool)


def _copy(backend: str | Kernel, to_pool: bool, plan: Any) -> None:
    from kvstore_kernels import pages

    if callable(backend):
        backend(plan, to_pool)
    else:
        pages.run(plan, to_pool, backend)


def check_hf(c: HFCase, backend: str | Kernel, device: str) -> None:
    """Scatter then gather with `backend` (a kernel backend's name, or a function that runs a
    plan) and with the torch reference, from equal copies of the same tensors: every byte of
    the pool's and the engine's allocations equal after each."""
    from kvstore_kernels import pages

    p, k, v = hf_tensors(c, device, seed=len(c.runs) + c.dim)
    rp, rk, rv = clone_all(p, k, v)
    slots, starts, counts, positions = (list(x) for x in zip(*c.runs, strict=True))
    _copy(backend, True, pages.plan_hf(p, slots, starts, counts, positions, k, v, c.batch))
    pages.scatter_hf(rp, slots, starts, counts, positions, rk, rv, batch=c.batch, backend="torch")
    _sync(device)
    assert same_storage(p, rp)
    # gather back into fresh noise (positions not copied must stay as they were)
    _, k2, v2 = hf_tensors(c, device, seed=7)
    _, rk2, rv2 = clone_all(p, k2, v2)
    _copy(backend, False, pages.plan_hf(p, slots, starts, counts, positions, k2, v2, c.batch))
    pages.gather_hf(rp, slots, starts, counts, positions, rk2, rv2, batch=c.batch, backend="torch")
    _sync(device)
    for a, b in zip(k2 + v2, rk2 + rv2, strict=True):
        assert same_storage(a, b)
    # and the positions copied hold what was scattered
    for kk, kk2 in zip(k, k2, strict=True):
        for _, _, n, pos in c.runs:
            assert torch.equal(bits(kk[c.batch, :, pos : pos + n]), bits(kk2[c.batch, :, pos : pos + n]))


def check_blocks(c: BlockCase, backend: str | Kernel, device: str) -> None:
    from kvstore_kernels import pages

    p, k, v = block_tensors(c, device, seed=c.dim)
    rp, rk, rv = clone_all(p, k, v)
    slots, blocks = (list(x) for x in zip(*c.pairs, strict=True))
    _copy(backend, True, pages.plan_blocks(p, slots, blocks, k, v))
    pages.scatter_blocks(rp, slots, blocks, rk, rv, backend="torch")
    _sync(device)
    assert same_storage(p, rp)
    _, k2, v2 = block_tensors(c, device, seed=9)
    _, rk2, rv2 = clone_all(p, k2, v2)
    _copy(backend, False, pages.plan_blocks(p, slots, blocks, k2, v2))
    pages.gather_blocks(rp, slots, blocks, rk2, rv2, backend="torch")
    _sync(device)
    for a, b in zip(k2 + v2, rk2 + rv2, strict=True):
        assert same_storage(a, b)
    for vv, vv2 in zip(v, v2, strict=True):
        assert torch.equal(bits(vv[blocks]), bits(vv2[blocks]))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
