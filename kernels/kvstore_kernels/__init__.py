"""Page kernels: pure functions of tensors. The torch reference runs everywhere;
GPU implementations (Triton/CuPy, the `gpu` extra) are tested against it."""

from kvstore_kernels.reference import copy_pages, gather_pages, scatter_pages

__all__ = ["copy_pages", "gather_pages", "scatter_pages"]
