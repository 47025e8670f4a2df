"""The GPU check of the Triton KV quantization kernels (issue 17), for a machine with CUDA:

1. tests/test_quant_triton.py natively (without TRITON_INTERPRET): each kernel against the torch
   reference on ugly shapes (codes within one step, values within 1e-5: see the test);
2. throughput on a batch of pages (SmolLM2-135M's geometry, 64-token pages, float32), as a ratio
   to a device copy (`clone`) of the same fp32 bytes, timed with CUDA events.

    python tools/gpu_check_quant.py [--pages 256] [--no-tests]   # exit status 0 = the tests passed

(tools/gpu_check.py runs the tests itself, with a junit report, and passes --no-tests.)

Without a GPU it says so and exits 2 (CI covers the kernels under the interpreter).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def timed(fn, repeat: int = 20) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat / 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pages", type=int, default=256)
    p.add_argument("--no-tests", action="store_true", help="only the throughput")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check_quant: no CUDA device here")
        return 2
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"KVSTORE_TRITON_NATIVE": "1"}
    rc = 0
    if not args.no_tests:
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "tests/test_quant_triton.py"], env=env)
    from kvstore_kernels import triton_quant

    layers, tokens, heads, dim = 30, 64, 3, 64
    x = torch.randn(args.pages * layers, tokens, heads, dim, device="cuda")
    copy_s = timed(lambda: x.clone())
    for bits, gran, k in ((8, "vector", 1), (4, "channel", 2), (4, "vector", 2)):
        q = triton_quant.quantize(x, bits, gran, k)
        qs = timed(lambda bits=bits, gran=gran, k=k: triton_quant.quantize(x, bits, gran, k))
        ds = timed(lambda q=q, gran=gran: triton_quant.dequantize(q, gran, dim))
        print(
            f"int{bits} {gran} k={k}: quantize {x.nbytes / qs / 1e9:.0f} GB/s ({copy_s / qs:.2f}x clone), "
            f"dequantize {x.nbytes / ds / 1e9:.0f} GB/s ({copy_s / ds:.2f}x clone); clone {x.nbytes / copy_s / 1e9:.0f} GB/s"
        )
    return rc


if __name__ == "__main__":
    sys.exit(main())
