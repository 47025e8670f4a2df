"""Where the Triton kernels' tests run: natively on a GPU, else on Triton's interpreter. Import
this before anything imports triton (TRITON_INTERPRET is read when each @triton.jit function
is defined, triton's own included)."""

from __future__ import annotations

import importlib.util
import os

import pytest


def native() -> bool:
    """True on a GPU (the kernels run natively); else sets TRITON_INTERPRET=1 and is False.
    Skips the module without torch or Triton. KVSTORE_TRITON_NATIVE=1 (tools/gpu_check.py)
    makes a run that would fall back to the interpreter fail: it would pass the GPU check unseen."""
    torch = pytest.importorskip("torch", reason="the kernels need torch (pip install -e '.[torch]')")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed (pip install -e '.[gpu]')", allow_module_level=True)
    on_gpu = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    if os.environ.get("KVSTORE_TRITON_NATIVE") == "1" and not on_gpu:
        raise RuntimeError(
            "KVSTORE_TRITON_NATIVE=1, but there is no CUDA device for the kernels (or TRITON_INTERPRET=1)"
        )
    if not on_gpu:
        os.environ["TRITON_INTERPRET"] = "1"
    return on_gpu
