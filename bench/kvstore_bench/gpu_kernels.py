"""The page gather/scatter kernels (kvstore_kernels.pages) against torch's own copies of the
same bytes: part of `kvstore-bench gpu`.

One call moves the KV of `pages` whole pages of a SmolLM2-135M geometry (30 layers, 3 KV
heads, head_dim 64, 16-token pages, bf16: 720 KiB a page; >= 64 MiB a call) between a pool
(slots shuffled, as a real sequence's are) and HF per-layer K/V tensors `[1, heads, seq, dim]`,
one allocation each. Each rate is bytes moved / median time of `repeat` timed calls after a
warm-up (CUDA events on a GPU), the plan (index tensors) built once outside the timing:
- `gather_vs_d2d`, `scatter_vs_d2d`: the Triton kernel over torch `copy_` of as many bytes
  between two device buffers (goal >= 0.7);
- `gather_vs_index_select`, `scatter_vs_index_copy`: over the torch op that moves the same
  whole pages without the layout change (`index_select` of pool rows into a buffer,
  `index_copy_` back);
- `cupy_*`: the same for the CuPy RawKernel; `reference_gather_gbs`: the torch reference
  (a slice copy per page and layer: what the adapter does without the kernels);
- `kernels_exact`: every backend's gather equals the reference bit for bit, and so do the
  pages each one scattered.
On a CPU (for tests: Triton under TRITON_INTERPRET=1, tiny sizes) wall-clock times stand in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .gpu_timing import timed, wall

LAYERS, HEADS, DIM, TOKENS = 30, 3, 64, 16


def measure(torch: Any, repeat: int, mib: int = 64, device: str = "cuda") -> dict[str, Any]:
    """The kernels' rates and ratios (keys in the module docstring); a backend that cannot run
    here gives None for its keys and its reason under `not_measured`."""
    from kvstore_kernels import page_reference, pages

    dev = torch.device(device)
    page_bytes = LAYERS * 2 * TOKENS * HEADS * DIM * 2
    n_pages = max(1, -(-(mib << 20) // page_bytes))
    g = torch.Generator().manual_seed(0)
    slots = torch.randperm(2 * n_pages, generator=g)[:n_pages].tolist()
    pool = _noise(torch, (2 * n_pages, LAYERS, 2, TOKENS, HEADS, DIM), dev)
    seq = n_pages * TOKENS
    keys = [_noise(torch, (1, HEADS, seq, DIM), dev) for _ in range(LAYERS)]
    values = [_noise(torch, (1, HEADS, seq, DIM), dev) for _ in range(LAYERS)]
    starts, counts = [0] * n_pages, [TOKENS] * n_pages
    positions = [i * TOKENS for i in range(n_pages)]
    plan = pages.plan_hf(pool, slots, starts, counts, positions, keys, values)
    nbytes = plan.nbytes

    def gbs(fn: Callable[[], Any], times: int = repeat) -> float:
        return nbytes / _timed(torch, dev, fn, times) / 1e9

    flat_a = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    flat_b = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    rows = pool.view(pool.shape[0], -1)
    slot_index = torch.tensor(slots, device=dev)
    staged = torch.empty((n_pages, rows.shape[1]), dtype=pool.dtype, device=dev)
    out: dict[str, Any] = {"kernel_mib": nbytes / (1 << 20), "kernel_pages": n_pages}
    out["kernel_d2d_gbs"] = gbs(lambda: flat_b.copy_(flat_a))
    out["index_select_gbs"] = gbs(lambda: torch.index_select(rows, 0, slot_index, out=staged))
    out["index_copy_gbs"] = gbs(lambda: rows.index_copy_(0, slot_index, staged))
    out["reference_gather_gbs"] = gbs(
        lambda: page_reference.gather_hf(pool, slots, starts, counts, positions, keys, values),
        max(1, min(repeat, 3)),
    )

    # what each backend must reproduce: the reference's gather, and pages scattered from it
    want_k = [torch.empty_like(k) for k in keys]
    want_v = [torch.empty_like(v) for v in values]
    page_reference.gather_hf(pool, slots, starts, counts, positions, want_k, want_v)
    want_pool = pool.clone()
    page_reference.scatter_hf(want_pool, slots, starts, counts, positions, want_k, want_v)

    exact, missing = True, {}
    for backend, prefix in (("triton", ""), ("cupy", "cupy_")):
        for key in ("gather_vs_d2d", "scatter_vs_d2d", "gather_gbs", "scatter_gbs"):
            out[prefix + key] = None
        try:
            run = _backend(backend, dev)
            gather_gbs = gbs(lambda r=run: r(plan, False))
            scatter_gbs = gbs(lambda r=run: r(plan, True))
        except Exception as e:  # (no Triton, no CuPy, no GPU for CuPy: said, not fatal)
            missing[prefix + "gather_vs_d2d"] = missing[prefix + "scatter_vs_d2d"] = f"{backend}: {e}"
            continue
        got_k = [torch.empty_like(k) for k in keys]
        got_v = [torch.empty_like(v) for v in values]
        run(pages.plan_hf(pool, slots, starts, counts, positions, got_k, got_v), False)
        got_pool = pool.clone()
        run(pages.plan_hf(got_pool, slots, starts, counts, positions, got_k, got_v), True)
        exact = exact and all(_same(a, b) for a, b in zip(got_k + got_v, want_k + want_v, strict=True))
        exact = exact and _same(got_pool, want_pool)
        out[prefix + "gather_gbs"], out[prefix + "scatter_gbs"] = gather_gbs, scatter_gbs
        out[prefix + "gather_vs_d2d"] = gather_gbs / out["kernel_d2d_gbs"]
        out[prefix + "scatter_vs_d2d"] = scatter_gbs / out["kernel_d2d_gbs"]
        if not prefix:
            out["gather_vs_index_select"] = gather_gbs / out["index_select_gbs"]
            out["scatter_vs_index_copy"] = scatter_gbs / out["index_copy_gbs"]
    out.setdefault("gather_vs_index_select", None)
    out.setdefault("scatter_vs_index_copy", None)
    out["kernels_exact"] = exact if len(missing) < 4 else None
    out["not_measured"] = missing
    return out


def _backend(name: str, dev: Any) -> Callable[[Any, bool], None]:
    if name == "triton":
        from kvstore_kernels import triton_pages

        return triton_pages.copy
    if dev.type != "cuda":
        raise RuntimeError("the RawKernel needs a CUDA device")
    from kvstore_kernels import cupy_pages

    return cupy_pages.copy


def _noise(torch: Any, shape: tuple[int, ...], dev: Any) -> Any:
    return torch.randn(shape, device=dev).to(torch.bfloat16)


def _same(a: Any, b: Any) -> bool:
    import torch

    return bool(torch.equal(a.view(torch.int16), b.view(torch.int16)))


def _timed(torch: Any, dev: Any, fn: Callable[[], Any], repeat: int) -> float:
    """Median seconds of `fn` after one warm-up: CUDA events on a GPU, the wall clock on a CPU."""

    return timed(torch, fn, repeat) if dev.type == "cuda" else wall(fn, repeat)
