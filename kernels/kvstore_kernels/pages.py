"""Batched copies between an engine's per-layer KV and pool pages: one launch per call, over
every page and layer (a 16-token page is tiny: a launch per page reaches a few % of bandwidth).

A pool page is `[layer, kv, token, head, dim]`, contiguous (kvstore_client.pool); the pool is
`[num_pages, *page]` with a page stride that may exceed the page (padding). The engine side
is one K and one V tensor per layer, all of one shape, strides and dtype, in either layout:
- HF (`*_hf`): `[batch, heads, seq, dim]` (transformers' DynamicCache layers);
- blocks (`*_blocks`): `[blocks, block_tokens, heads, dim]` views, as vLLM's paged KV is
  addressed (flash-attn's `[2, blocks, block, heads, dim]` per layer gives them as `kv[0]`,
  `kv[1]`; our CPU connector's `_parts` as permuted views): page `slots[i]` <-> block
  `block_ids[i]`, whole pages.
Any strides on the engine side (non-contiguous views are fine; K's may differ from V's, as in
the CPU connector's blocks, but every layer's K has the same); a page is contiguous. A "run" is tokens `[page_start, page_start + count)` of one page <-> `count`
positions of the engine tensors; `scatter` writes pages, `gather` reads them.

The kernels take integers only (no pointers loaded from memory: the Triton interpreter cannot,
docs/gpu.md): the pool's base plus each run's element offset, and the engine tensor with the
lowest address plus each layer's K/V element offset from it. The engine's layers are separate
allocations, so those offsets cross allocations: fine in one flat address space (a GPU's, or a
CPU process's under the interpreter), never across devices, which `plan` refuses.

`backend`: "torch" (`page_reference`, the oracle: a slice copy per run and layer, no plan), "triton" (`triton_pages`),
"cupy" (`cupy_pages`, a RawKernel), or "auto": Triton when the tensors are on CUDA and it
imports, else torch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from . import page_reference
from .page_plan import Plan  # (what `plan` makes and the kernels take)

BACKENDS = ("auto", "torch", "triton", "cupy")


def plan(
    pool: torch.Tensor,
    slots: Sequence[int],
    starts: Sequence[int],
    counts: Sequence[int],
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    run_index: Sequence[int],
    strides: tuple[Sequence[int], Sequence[int]],
) -> Plan:
    """Check the geometry and turn it into a `Plan`. `keys`/`values` are the engine tensors as
    given (only their addresses, dtype and device are used here); the engine element of token
    t, head h, dim d of run i is at `run_index[i] * strides[kv][0] + t * strides[kv][1] +
    h * strides[kv][2] + d * strides[kv][3]` from its layer's K or V."""
    if pool.dim() != 6:
        raise ValueError(f"pool must be [num_pages, layer, 2, token, head, dim], got {tuple(pool.shape)}")
    _, layers, two, tokens, heads, dim = pool.shape
    if two != 2 or (pool.shape[0] and not pool[0].is_contiguous()):
        raise ValueError("a pool page must be a contiguous [layer, 2, token, head, dim]")
    if len(keys) != layers or len(values) != layers:
        raise ValueError(f"{len(keys)} K and {len(values)} V tensors for a pool of {layers} layers")
    if not len(slots) == len(starts) == len(counts) == len(run_index):
        raise ValueError("slots, starts, counts and offsets must be as long as each other")
    engine = [t for pair in zip(keys, values, strict=True) for t in pair]
    for t in engine:
        if t.dtype != pool.dtype or t.device != pool.device:
            raise ValueError(f"engine KV {t.dtype} on {t.device}; the pool is {pool.dtype} on {pool.device}")
    for s, a, n in zip(slots, starts, counts, strict=True):
        if not 0 <= s < pool.shape[0] or a < 0 or n < 0 or a + n > tokens:
            raise ValueError(f"run (slot {s}, tokens [{a}, {a + n})) is outside the pool's pages")
    item = pool.element_size()
    low = min(engine, key=lambda t: t.data_ptr())
    gaps = [t.data_ptr() - low.data_ptr() for t in engine]
    if any(g % item for g in gaps):
        raise ValueError("engine KV tensors are not aligned to their element size")
    page_stride = pool.stride(0) if pool.shape[0] > 1 else 0
    word = _word(item, dim, page_stride, [pool.data_ptr(), low.data_ptr(), *gaps], strides)
    r = word // item
    dev = pool.device

    def ints(xs: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(list(xs), dtype=dtype).to(dev, non_blocking=True)

    return Plan(
        pool=pool,
        run_pages=ints([s * page_stride // r for s in slots], torch.int64),
        run_starts=ints(starts, torch.int32),
        run_counts=ints(counts, torch.int32),
        engine=low,
        kv_offsets=ints([g // word for g in gaps], torch.int64),
        run_index=ints(run_index, torch.int64),
        strides=tuple(x // r if i % 4 != 3 else x for i, x in enumerate((*strides[0], *strides[1]))),
        tokens=tokens,
        heads=heads,
        dim=dim // r,
        word=word,
        max_count=max(counts, default=0),
    )


def _word(
    item: int, dim: int, page_stride: int, addresses: Sequence[int], strides: tuple[Sequence[int], ...]
) -> int:
    """The widest unit (8, 4, 2 bytes, or the element) the copies can move: whole elements, a
    whole number per row of `dim`, unit dim strides, every address and stride a multiple of it.
    Fewer, wider accesses: a bf16 row of 64 moves as 16 8-byte words."""
    for word in (8, 4, 2):
        r = word // item
        if word <= item or word % item or dim % r or page_stride % r:
            continue
        if any(a % word for a in addresses):
            continue
        if all(s[3] == 1 and not (s[0] % r or s[1] % r or s[2] % r) for s in strides):
            return word
    return item


def plan_hf(
    pool: torch.Tensor,
    slots: Sequence[int],
    starts: Sequence[int],
    counts: Sequence[int],
    positions: Sequence[int],
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    batch: int = 0,
) -> Plan:
    """Run i: tokens [starts[i], + counts[i]) of page slots[i] <-> sequence positions
    [positions[i], + counts[i]) of batch row `batch` of every layer's `[batch, heads, seq, dim]`."""
    k = keys[0]
    _check_same(keys, values, pool)
    if k.shape[1] != pool.shape[4] or k.shape[3] != pool.shape[5]:
        raise ValueError(
            f"HF KV {tuple(k.shape)} does not match the pool's [heads, dim] {tuple(pool.shape[4:])}"
        )
    for p, n in zip(positions, counts, strict=True):
        if p < 0 or p + n > k.shape[2]:
            raise ValueError(f"positions [{p}, {p + n}) are outside the KV's {k.shape[2]} tokens")
    if not 0 <= batch < k.shape[0]:
        raise ValueError(f"batch row {batch} is outside the KV's {k.shape[0]}")
    rows = [t[batch] for t in keys], [t[batch] for t in values]  # (the batch row's address)
    ks, vs = ((s[2], s[2], s[1], s[3]) for s in (keys[0].stride(), values[0].stride()))
    return plan(pool, slots, starts, counts, *rows, positions, (ks, vs))


def plan_blocks(
    pool: torch.Tensor,
    slots: Sequence[int],
    block_ids: Sequence[int],
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
) -> Plan:
    """Whole page slots[i] <-> block block_ids[i] of every layer's `[blocks, tokens, heads, dim]`."""
    k = keys[0]
    _check_same(keys, values, pool)
    if tuple(k.shape[1:]) != tuple(pool.shape[3:]):
        raise ValueError(
            f"blocks {tuple(k.shape)} do not match the pool's [token, head, dim] {tuple(pool.shape[3:])}"
        )
    for b in block_ids:
        if not 0 <= b < k.shape[0]:
            raise ValueError(f"block {b} is outside the KV's {k.shape[0]} blocks")
    n = len(slots)
    strides = keys[0].stride(), values[0].stride()
    return plan(pool, slots, [0] * n, [pool.shape[3]] * n, keys, values, block_ids, strides)


def _check_same(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], pool: torch.Tensor) -> None:
    k = keys[0]
    for group in (keys, values):
        for t in group:
            if t.shape != k.shape or t.stride() != group[0].stride():
                raise ValueError("every layer's K (and V) must have one shape and one set of strides")
    if k.dim() != 4:
        raise ValueError(f"engine KV must be 4-d, got {tuple(k.shape)}")


def run(p: Plan, to_pool: bool, backend: str) -> None:
    """Do the copies of `p` with a kernel: engine -> pages (`to_pool`, a scatter) or back."""
    if not p.runs or not p.layers:
        return
    if backend == "triton":
        from . import triton_pages

        triton_pages.copy(p, to_pool)
    elif backend == "cupy":
        from . import cupy_pages

        cupy_pages.copy(p, to_pool)
    else:
        raise ValueError(f"no kernel backend {backend!r}")


def pick(device: torch.device, backend: str = "auto") -> str:
    """The backend "auto" means on `device`: Triton on CUDA when it imports (and is not the
    interpreter: a GPU tensor cannot go through it), else torch."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1" and triton_available():
        return "triton"
    return "torch"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


Tensors = Sequence[torch.Tensor]
Ints = Sequence[int]


def scatter_hf(
    pool: torch.Tensor, slots: Ints, starts: Ints, counts: Ints, positions: Ints, keys: Tensors, values: Tensors,
    *, batch: int = 0, backend: str = "auto",
) -> None:  # fmt: skip
    """Write HF KV positions into page runs (see `plan_hf`)."""
    _hf(True, pool, slots, starts, counts, positions, keys, values, batch, backend)


def gather_hf(
    pool: torch.Tensor, slots: Ints, starts: Ints, counts: Ints, positions: Ints, keys: Tensors, values: Tensors,
    *, batch: int = 0, backend: str = "auto",
) -> None:  # fmt: skip
    """Read page runs into HF KV positions (`keys`/`values` are written; see `plan_hf`)."""
    _hf(False, pool, slots, starts, counts, positions, keys, values, batch, backend)


def scatter_blocks(
    pool: torch.Tensor, slots: Ints, block_ids: Ints, keys: Tensors, values: Tensors, *, backend: str = "auto"
) -> None:
    """Write whole blocks into pages (see `plan_blocks`)."""
    _blocks(True, pool, slots, block_ids, keys, values, backend)


def gather_blocks(
    pool: torch.Tensor, slots: Ints, block_ids: Ints, keys: Tensors, values: Tensors, *, backend: str = "auto"
) -> None:
    """Read whole pages into blocks (see `plan_blocks`)."""
    _blocks(False, pool, slots, block_ids, keys, values, backend)


def _hf(to_pool: bool, pool, slots, starts, counts, positions, keys, values, batch, backend) -> None:  # type: ignore[no-untyped-def]
    p = plan_hf(pool, slots, starts, counts, positions, keys, values, batch)  # (checks, for every backend)
    chosen = pick(pool.device, backend)
    if chosen == "torch":
        copy = page_reference.scatter_hf if to_pool else page_reference.gather_hf
        copy(pool, slots, starts, counts, positions, keys, values, batch)
    else:
        run(p, to_pool, chosen)


def _blocks(to_pool: bool, pool, slots, block_ids, keys, values, backend) -> None:  # type: ignore[no-untyped-def]
    p = plan_blocks(pool, slots, block_ids, keys, values)
    chosen = pick(pool.device, backend)
    if chosen == "torch":
        copy = page_reference.scatter_blocks if to_pool else page_reference.gather_blocks
        copy(pool, slots, block_ids, keys, values)
    else:
        run(p, to_pool, chosen)
