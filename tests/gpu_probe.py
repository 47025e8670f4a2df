"""Whether this process can run the CUDA tests (probed once per test run), and a reader process
for the device-pool tests.

CuPy imports without a GPU but every device call then fails, so the probe makes one real
call (a device count, an allocation) and keeps the reason it could not. Tests skip with
that reason; tools/gpu_check.py runs them on a GPU machine (docs/gpu.md).
"""

from __future__ import annotations

import functools


@functools.cache
def cuda_missing() -> str | None:
    """None when CuPy and torch both reach a CUDA device, else why not."""
    try:
        import cupy
    except ImportError as e:
        return f"no CuPy ({e}); the `cuda` extra, or cupy-cuda13x on the GPU machine"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy sees no CUDA device"
        cupy.cuda.runtime.free(cupy.cuda.runtime.malloc(1 << 20))
    except Exception as e:  # CUDARuntimeError without a driver, among others
        return f"CuPy cannot use a CUDA device: {e}"
    try:
        import torch
    except ImportError as e:
        return f"no torch ({e})"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


def run_reader(script: str, target: str, tokens: list[int], timeout: float = 120) -> list[str]:
    """Run a reader `script` (argv: target, comma-separated tokens) in another process, with
    this process's environment (its fake devices, its PYTHONPATH); its stdout's words."""
    import os
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", script, target, ",".join(map(str, tokens))],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()
