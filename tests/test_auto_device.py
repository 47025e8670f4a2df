"""`device = "auto"` (kvstore/memory/auto_device.py, the image's config: docs/docker.md): where
CuPy cannot use a GPU the namespace gets the CPU pool, the log says why, and workers store
and read pages through it. Here CuPy is not installed; docker/test-cuda.sh runs the same
choice in the CUDA image, where CuPy is there but no driver is."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from daemon import DaemonProcess

WORKER = Path(__file__).resolve().parent.parent / "docker" / "kv_worker.py"
NAMESPACE = {"name": "default", "num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "dtype": "float16",
             "page_tokens": 4, "num_pages": 64, "device": "auto"}  # fmt: skip


@pytest.mark.skipif(
    importlib.util.find_spec("cupy") is not None, reason="CuPy is installed: tools/gpu_check.py"
)
def test_auto_without_cupy_serves_a_cpu_pool_and_says_why(
    daemon_factory: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    d = daemon_factory(namespaces=[NAMESPACE], server={"disk_tier_dir": str(tmp_path / "disk")}).start()
    assert "namespace 'default': device auto -> cpu: CuPy is not installed" in d.stderr_text()
    env = os.environ | {"KVSTORE_SOCKET": str(d.socket_path)}
    for mode in (["write"], ["read", "--expect", "hit"]):  # through the worker's own mmap of the pool
        r = subprocess.run(
            [sys.executable, str(WORKER), *mode, "--prompts", "2", "--tokens", "16"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
    assert '"wrong_pages": 0' in r.stdout and '"full_hits": 2' in r.stdout, r.stdout
