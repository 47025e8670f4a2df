"""The Triton kernel of `pages`: one program per (run, layer, K/V) copies the run's
`count * heads` rows of `dim` elements, a tile of rows at a time. Elements move as integers
(`Plan.word` bytes: a copy needs no arithmetic, and the interpreter does none on bf16). The strides
are scalar arguments, K's and V's apart, so that Triton specializes a unit dim stride and
vectorizes. Native on a GPU; on a CPU under TRITON_INTERPRET=1 (set before importing this
module), which is how CI tests it against `page_reference` (tests/test_pages_triton.py)."""

from __future__ import annotations

import triton
import triton.language as tl

from .page_plan import Plan, words

TILE = 4096  # elements a program moves per loop step (rows * padded dim)


@triton.jit
def _copy_run(
    pool_at, eng_at, n, H, D, token_stride, head_stride, dim_stride,
    TO_POOL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    r = tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    for first in range(0, n * H, BLOCK_R):
        row = first + r
        token = (row // H).to(tl.int64)
        head = (row % H).to(tl.int64)
        mask = (row < n * H)[:, None] & col_ok[None, :]
        at_pool = pool_at + row[:, None] * D + cols[None, :]
        at_eng = eng_at + (token * token_stride + head * head_stride)[:, None] + cols[None, :] * dim_stride
        if TO_POOL:
            tl.store(at_pool, tl.load(at_eng, mask=mask), mask=mask)
        else:
            tl.store(at_eng, tl.load(at_pool, mask=mask), mask=mask)


@triton.jit
def _page_copy(
    pool_ptr, run_pages, run_starts, run_counts, eng_ptr, kv_offsets, run_index, T, H, D,
    k_run_stride, k_token_stride, k_head_stride, k_dim_stride,
    v_run_stride, v_token_stride, v_head_stride, v_dim_stride,
    TO_POOL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    run = tl.program_id(0)
    lk = tl.program_id(1)  # layer * 2 + kv
    n = tl.load(run_counts + run)
    start = tl.load(run_starts + run).to(tl.int64)
    pool_at = pool_ptr + tl.load(run_pages + run) + (lk * T + start) * H * D
    eng_at = eng_ptr + tl.load(kv_offsets + lk)
    index = tl.load(run_index + run)
    if lk % 2 == 0:
        _copy_run(pool_at, eng_at + index * k_run_stride, n, H, D, k_token_stride, k_head_stride, k_dim_stride,
                  TO_POOL, BLOCK_R, BLOCK_D)  # fmt: skip
    else:
        _copy_run(pool_at, eng_at + index * v_run_stride, n, H, D, v_token_stride, v_head_stride, v_dim_stride,
                  TO_POOL, BLOCK_R, BLOCK_D)  # fmt: skip


def copy(p: Plan, to_pool: bool) -> None:
    """One launch: grid (runs, 2 * layers)."""
    block_d = triton.next_power_of_2(p.dim)
    block_r = max(1, min(triton.next_power_of_2(max(1, p.max_count) * p.heads), TILE // block_d))
    _page_copy[(p.runs, 2 * p.layers)](
        words(p.pool, p.word), p.run_pages, p.run_starts, p.run_counts,
        words(p.engine, p.word), p.kv_offsets, p.run_index, p.tokens, p.heads, p.dim, *p.strides,
        TO_POOL=to_pool, BLOCK_R=block_r, BLOCK_D=block_d,
    )  # fmt: skip
