"""Fixtures of the vLLM connector's tests (run with the vLLM venv: `make vllm-venv`, then
`build/vllm-venv/bin/python -m pytest -q tests_vllm`). Each vLLM engine runs in a process of its
own (engine.py), against a real daemon (tests/daemon.py); nothing is mocked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # tests/daemon.py, the core suite's daemon helper

from daemon import DaemonProcess  # noqa: E402

pytest.importorskip("vllm", reason="the vLLM venv runs these tests (make vllm-venv)")


@pytest.fixture(scope="session")
def model_dir() -> str:
    """SmolLM2-135M-Instruct as safetensors (converted once per machine, kvstore_client.hf)."""
    from kvstore_client import hf

    missing = hf.smollm2_missing()
    if missing:
        pytest.skip(missing)
    found = hf.find_smollm2()
    assert found is not None
    d = hf.smollm2_converted_dir(found)
    assert d is not None, "the model cache directory cannot be written"
    return str(d)


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    """A daemon with no namespace: the connector creates its own. A 10 s lease: an engine
    starting up may hold the GIL for seconds."""
    with DaemonProcess(namespaces=[], server={"lease_ttl_s": 10.0}) as d:
        yield d.start()


def run_engine(tmp: Path, name: str, job: dict[str, Any], timeout: float = 240) -> dict[str, Any]:
    """Run one vLLM engine process on `job` (see engine.py) and return what it wrote."""
    job_path, out_path, log_path = tmp / f"{name}.json", tmp / f"{name}.out.json", tmp / f"{name}.log"
    job_path.write_text(json.dumps(job))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    with open(log_path, "wb") as log:
        proc = subprocess.run(
            [sys.executable, str(HERE / "engine.py"), str(job_path), str(out_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=timeout,
        )
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-6000:]
        raise AssertionError(f"engine {name} exited with status {proc.returncode}:\n{tail}")
    return json.loads(out_path.read_text())
