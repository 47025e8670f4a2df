"""The CuPy RawKernel of `pages` (CUDA C through NVRTC): one block per (run, layer, K/V),
its threads striding over the run's `count * heads * dim` elements, moved as unsigned
integers of `Plan.word` bytes. Launched on torch's current stream. Needs a GPU: tested by
tests/test_pages_cupy.py, which skips without one."""

from __future__ import annotations

import functools
from typing import Any

import torch

from .page_plan import Plan

WORDS = {1: "unsigned char", 2: "unsigned short", 4: "unsigned int", 8: "unsigned long long"}
THREADS = 256

SOURCE = r"""
typedef WORD word;
extern "C" __global__ void page_copy(
    word* pool, const long long* run_pages, const int* run_starts, const int* run_counts,
    word* eng, const long long* kv_offsets, const long long* run_index,
    long long k_run_stride, long long k_token_stride, long long k_head_stride, long long k_dim_stride,
    long long v_run_stride, long long v_token_stride, long long v_head_stride, long long v_dim_stride,
    int T, int H, int D, int to_pool)
{
    const int run = blockIdx.x, lk = blockIdx.y;
    // A run is at most a page of one layer's K or V: 32-bit indices (64-bit division is slow).
    const unsigned n = (unsigned)run_counts[run] * H * D;
    const long long page0 = run_pages[run] + ((long long)lk * T + run_starts[run]) * H * D;
    const bool is_v = lk % 2;
    const long long token_stride = is_v ? v_token_stride : k_token_stride;
    const long long head_stride = is_v ? v_head_stride : k_head_stride;
    const long long dim_stride = is_v ? v_dim_stride : k_dim_stride;
    const long long eng0 = kv_offsets[lk] + run_index[run] * (is_v ? v_run_stride : k_run_stride);
    for (unsigned i = threadIdx.x; i < n; i += blockDim.x) {
        const unsigned row = i / D, d = i - row * D;
        const long long e = eng0 + (long long)(row / H) * token_stride + (long long)(row % H) * head_stride
                            + (long long)d * dim_stride;
        if (to_pool) pool[page0 + i] = eng[e];
        else eng[e] = pool[page0 + i];
    }
}
"""


@functools.cache
def kernel(item: int) -> Any:
    import cupy

    return cupy.RawKernel(SOURCE.replace("WORD", WORDS[item]), "page_copy")


def copy(p: Plan, to_pool: bool) -> None:
    """One launch: grid (runs, 2 * layers), THREADS threads a block."""
    import cupy

    def ptr(t: torch.Tensor) -> Any:
        return cupy.uint64(t.data_ptr())

    args = (
        ptr(p.pool), ptr(p.run_pages), ptr(p.run_starts), ptr(p.run_counts),
        ptr(p.engine), ptr(p.kv_offsets), ptr(p.run_index), *(cupy.int64(s) for s in p.strides),
        cupy.int32(p.tokens), cupy.int32(p.heads), cupy.int32(p.dim), cupy.int32(int(to_pool)),
    )  # fmt: skip
    index = p.pool.get_device()
    stream = torch.cuda.current_stream(index)
    with cupy.cuda.Device(index), cupy.cuda.ExternalStream(stream.cuda_stream, index):
        kernel(p.word)((p.runs, 2 * p.layers), (THREADS,), args)
