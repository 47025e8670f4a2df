"""The CuPy RawKernel's CUDA C (kernels/kvstore_kernels/cupy_pages.py SOURCE) without a GPU:
compiled by g++ as C++ with a loop over the grid and the block's threads standing in for the
launch, run on CPU tensors against the torch reference (tests/page_cases.py). It checks the
kernel's indexing and word widths on every case; tests/test_pages_cupy.py runs the same source
through NVRTC on a GPU."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the kernels need torch")
if shutil.which("g++") is None:
    pytest.skip("no g++ to compile the kernel's source as C++", allow_module_level=True)

from kvstore_kernels import cupy_pages  # noqa: E402
from kvstore_kernels.pages import Plan  # noqa: E402
from page_cases import BLOCK_CASES, HF_CASES, check_blocks, check_hf  # noqa: E402

# What the CUDA built-ins are in a plain C++ build: the launcher below sets them.
PRELUDE = "#define __global__\nstruct dim3_ { unsigned x, y, z; } blockIdx, threadIdx, blockDim;\n"


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    built: dict[int, ctypes.CDLL] = {}
    where = tmp_path_factory.mktemp("kernel")

    def library(word: int) -> ctypes.CDLL:
        if word not in built:
            src = PRELUDE + cupy_pages.SOURCE.replace("WORD", cupy_pages.WORDS[word])
            params = re.search(r"page_copy\((.*?)\)\s*\{", src, re.S).group(1)  # type: ignore[union-attr]
            names = ", ".join(p.split()[-1].lstrip("*") for p in params.split(","))
            src += (
                f'extern "C" void launch(unsigned gx, unsigned gy, unsigned threads, {params}) {{\n'
                "  blockDim.x = threads;\n"
                "  for (blockIdx.x = 0; blockIdx.x < gx; blockIdx.x++)\n"
                "    for (blockIdx.y = 0; blockIdx.y < gy; blockIdx.y++)\n"
                "      for (threadIdx.x = 0; threadIdx.x < threads; threadIdx.x++)\n"
                f"        page_copy({names});\n}}\n"
            )
            cpp, so = Path(where, f"k{word}.cpp"), Path(where, f"k{word}.so")
            cpp.write_text(src)
            subprocess.run(["g++", "-O1", "-shared", "-fPIC", "-o", str(so), str(cpp)], check=True)
            built[word] = ctypes.CDLL(str(so))
        return built[word]

    def run(p: Plan, to_pool: bool) -> None:
        ptrs = (p.pool, p.run_pages, p.run_starts, p.run_counts, p.engine, p.kv_offsets, p.run_index)
        library(p.word).launch(
            ctypes.c_uint(p.runs), ctypes.c_uint(2 * p.layers), ctypes.c_uint(cupy_pages.THREADS),
            *(ctypes.c_void_p(t.data_ptr()) for t in ptrs), *(ctypes.c_longlong(s) for s in p.strides),
            ctypes.c_int(p.tokens), ctypes.c_int(p.heads), ctypes.c_int(p.dim), ctypes.c_int(int(to_pool)),
        )  # fmt: skip

    return run


@pytest.mark.parametrize(
    "case", HF_CASES, ids=lambda c: f"L{c.layers}H{c.heads}D{c.dim}T{c.tokens}-{c.style}"
)
def test_hf_layout_equals_the_reference(case, launch) -> None:  # type: ignore[no-untyped-def]
    check_hf(case, launch, "cpu")


@pytest.mark.parametrize(
    "case", BLOCK_CASES, ids=lambda c: f"L{c.layers}H{c.heads}D{c.dim}T{c.tokens}-{c.style}"
)
def test_block_layout_equals_the_reference(case, launch) -> None:  # type: ignore[no-untyped-def]
    check_blocks(case, launch, "cpu")
