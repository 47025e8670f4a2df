"""The Triton page gather/scatter (kernels/kvstore_kernels/triton_pages.py) against the torch
reference on ugly cases (tests/page_cases.py): under TRITON_INTERPRET=1 on a CPU, natively on
a GPU (KVSTORE_TRITON_NATIVE=1 there: a run on the interpreter fails instead of passing)."""

from __future__ import annotations

import pytest
from triton_mode import native

ON_GPU = native()

import torch  # noqa: E402
from kvstore_kernels import pages  # noqa: E402
from page_cases import BLOCK_CASES, HF_CASES, check_blocks, check_hf, pool, same_storage  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.mark.parametrize(
    "case", HF_CASES, ids=lambda c: f"L{c.layers}H{c.heads}D{c.dim}T{c.tokens}-{c.style}"
)
def test_hf_layout_equals_the_reference(case) -> None:  # type: ignore[no-untyped-def]
    check_hf(case, "triton", DEVICE)


@pytest.mark.parametrize(
    "case", BLOCK_CASES, ids=lambda c: f"L{c.layers}H{c.heads}D{c.dim}T{c.tokens}-{c.style}"
)
def test_block_layout_equals_the_reference(case) -> None:  # type: ignore[no-untyped-def]
    check_blocks(case, "triton", DEVICE)


def test_auto_is_triton_on_cuda_and_torch_on_cpu() -> None:
    assert pages.pick(torch.device("cpu")) == "torch"
    if ON_GPU:
        assert pages.pick(torch.device("cuda")) == "triton"


def test_bad_geometry_is_refused_before_any_copy() -> None:
    p = pool(3, 2, 4, 2, 8, torch.float32, 0, 1, DEVICE)
    k = [torch.zeros(1, 2, 10, 8, device=DEVICE) for _ in range(2)]
    v = [torch.zeros(1, 2, 10, 8, device=DEVICE) for _ in range(2)]
    before = p.clone()  # (a contiguous pool: its storage is the tensor)
    with pytest.raises(ValueError, match="outside the pool"):
        pages.scatter_hf(p, [3], [0], [4], [0], k, v, backend="triton")  # slot past the pool
    with pytest.raises(ValueError, match="outside the pool"):
        pages.scatter_hf(p, [0], [2], [3], [0], k, v, backend="triton")  # past the page's tokens
    with pytest.raises(ValueError, match="outside the KV"):
        pages.scatter_hf(p, [0], [0], [4], [8], k, v, backend="triton")  # past the sequence
    with pytest.raises(ValueError, match="layers"):
        pages.scatter_hf(p, [0], [0], [4], [0], k[:1], v[:1], backend="triton")
    with pytest.raises(ValueError, match="float16"):
        pages.scatter_hf(
            p, [0], [0], [4], [0], [t.half() for t in k], [t.half() for t in v], backend="triton"
        )
    assert same_storage(p, before)
