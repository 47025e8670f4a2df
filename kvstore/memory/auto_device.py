"""`device = "auto"`: the first visible GPU when CuPy can use one, else the CPU pool, saying why.

One image (docs/docker.md: the CUDA variant) runs on hosts with and without a GPU: CuPy is in
the image, but the driver (libcuda.so.1) comes from the host at run time, through the NVIDIA
container toolkit. `auto` lets one config serve both, and the log says which pool a namespace
got and why. Probed once per process: the answer does not change while the daemon runs."""

from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)


@functools.cache
def probe() -> tuple[str, str]:
    """("cuda:0", what was found) when a CUDA device can be used, else ("cpu", why not)."""
    try:
        import cupy
    except ImportError as e:
        return "cpu", f"CuPy is not installed ({e})"
    runtime = cupy.cuda.runtime
    try:
        driver = runtime.driverGetVersion()  # 0 without a driver: CuPy's CUDA runtime is static
        if driver == 0:
            return "cpu", (
                "no CUDA driver (libcuda.so.1 is not loadable; in a container it comes from the host's "
                "NVIDIA container toolkit: docker run --gpus ...)"
            )
        count = runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError: a driver older than CuPy's runtime, no device, ...
        return "cpu", f"CUDA is not usable: {e}"
    if count < 1:
        return "cpu", "no CUDA device is visible"
    return (
        "cuda:0",
        f"{count} CUDA device(s) visible (driver {driver}, runtime {runtime.runtimeGetVersion()})",
    )


def resolve(namespace: str) -> str:
    """The device an `auto` namespace's pool goes on; logs the choice and its reason."""
    device, why = probe()
    log.info("namespace %r: device auto -> %s: %s", namespace, device, why)
    return device
