"""The torch reference page kernels on ugly shapes and several dtypes."""

import pytest
import torch
from kvstore_kernels import copy_pages, gather_pages, scatter_pages

SHAPES = [(1, 16), (7, 4096), (3, 2, 5, 3, 7)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.uint8]


@pytest.mark.parametrize("page_shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_scatter_round_trip(page_shape, dtype):
    gen = torch.Generator().manual_seed(0)
    pool = (torch.rand((11, *page_shape), generator=gen) * 100).to(dtype)
    slots = [9, 0, 4]
    pages = gather_pages(pool, slots)
    assert pages.is_contiguous()
    for i, slot in enumerate(slots):
        assert torch.equal(pages[i], pool[slot])
    pages[0].zero_()
    assert not torch.equal(pages[0], pool[9]), "gather must copy, not alias"

    new = (torch.rand((3, *page_shape), generator=gen) * 100).to(dtype)
    before = pool.clone()
    scatter_pages(pool, [2, 5, 10], new)
    for i, slot in enumerate([2, 5, 10]):
        assert torch.equal(pool[slot], new[i])
    untouched = [s for s in range(11) if s not in (2, 5, 10)]
    assert torch.equal(pool[untouched], before[untouched])


def test_copy_pages_between_pools():
    src = torch.arange(5 * 6, dtype=torch.float32).reshape(5, 6)
    dst = torch.zeros(4, 6)
    copy_pages(src, [4, 1], dst, [0, 3])
    assert torch.equal(dst[0], src[4]) and torch.equal(dst[3], src[1])
    assert torch.count_nonzero(dst[1:3]) == 0


def test_scatter_rejects_wrong_shape():
    pool = torch.zeros(4, 2, 3)
    with pytest.raises(ValueError, match=r"expected \(2, 2, 3\)"):
        scatter_pages(pool, [0, 1], torch.zeros(2, 3, 2))
