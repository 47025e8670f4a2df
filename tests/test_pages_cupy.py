"""The CuPy RawKernel page gather/scatter (kernels/kvstore_kernels/cupy_pages.py) against the
torch reference on the ugly cases of tests/page_cases.py. Needs a GPU (tools/gpu_check.py);
skips with the reason without one."""

from __future__ import annotations

import pytest
from gpu_probe import cuda_missing

if cuda_missing():
    pytest.skip(f"needs a CUDA device: {cuda_missing()}", allow_module_level=True)

from page_cases import BLOCK_CASES, HF_CASES, check_blocks, check_hf


@pytest.mark.parametrize(
    "case", HF_CASES, ids=lambda c: f"L{c.layers}H{c.heads}D{c.dim}T{c.tokens}-{c.style}"
)
def test_hf_layout_equals_the_reference(case) -> None:  # type: ignore[no-untyped-def]
    check_hf(case, "cupy", "cuda")


@pytest.mark.parametrize(
    "case", BLOCK_CASES, ids=lambda c: f"L{c.layers}H{c.heads}D{c.dim}T{c.tokens}-{c.style}"
)
def test_block_layout_equals_the_reference(case) -> None:  # type: ignore[no-untyped-def]
    check_blocks(case, "cupy", "cuda")
