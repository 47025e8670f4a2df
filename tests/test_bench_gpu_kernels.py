"""`kvstore_bench.gpu_kernels.measure` on a CPU, one page (the Triton kernel on the
interpreter, CuPy said missing): its keys, its ratios, and that the kernels it timed moved the
bytes the torch reference does. On the GPU it runs inside `kvstore-bench gpu`."""

from __future__ import annotations

import pytest
from triton_mode import native

ON_GPU = native()

import torch  # noqa: E402
from kvstore_bench import gpu_kernels  # noqa: E402


@pytest.mark.skipif(
    ON_GPU, reason="the CPU run of the benchmark's logic (on a GPU, kvstore-bench gpu runs it)"
)
def test_measure_runs_the_kernels_against_the_reference_on_a_cpu() -> None:
    got = gpu_kernels.measure(torch, repeat=1, mib=0, device="cpu")
    assert got["kernel_pages"] == 1
    assert got["kernels_exact"] is True
    for key in ("gather_vs_d2d", "scatter_vs_d2d", "gather_vs_index_select", "scatter_vs_index_copy"):
        assert got[key] > 0, key
    assert got["cupy_gather_vs_d2d"] is None
    assert set(got["not_measured"]) == {"cupy_gather_vs_d2d", "cupy_scatter_vs_d2d"}
