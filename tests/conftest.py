"""Shared fixtures. Daemon tests start the real daemon (tests/daemon.py) and wait for its
health check; nothing of ours is mocked."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from daemon import DaemonProcess

# Without a GPU the Triton kernels' tests (tests/test_quant_triton.py) run on Triton's
# interpreter. Triton reads TRITON_INTERPRET when each @triton.jit function is defined, its own
# library's included, so it is set before any test module can import triton (transformers may).
if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def daemon_factory() -> Iterator[Callable[..., DaemonProcess]]:
    """`make(**kwargs)` -> a DaemonProcess, not started (see DaemonProcess for the kwargs);
    every one made is stopped and cleaned up after the test."""
    made: list[DaemonProcess] = []

    def make(**kwargs: Any) -> DaemonProcess:
        d = DaemonProcess(**kwargs)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


@pytest.fixture
def daemon(daemon_factory: Callable[..., DaemonProcess]) -> DaemonProcess:
    """A running daemon with the small test namespace `test`; `.target` is its address."""
    return daemon_factory().start()


@pytest.fixture(scope="session")
def smollm2() -> tuple[Any, Any]:
    """(model, tokenizer) of SmolLM2-135M-Instruct in fp32, loaded once per test session
    (tests/model_fixtures.py); skips, saying what to install, where the model is missing."""
    from model_fixtures import load_model, missing_reason

    reason = missing_reason()
    if reason is not None:
        pytest.skip(f"model tests need the `model` extra: {reason}")
    return load_model()
