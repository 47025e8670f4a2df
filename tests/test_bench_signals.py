"""`kvstore-bench` on SIGTERM: the first one ends the run through its `finally`/`with` blocks
(which stop the daemons and servers it started); one more during that cleanup, as `timeout`
and make deliver them, must not cut it short."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest
from kvstore_bench.harness import install_signal_exit


@pytest.fixture
def sigterm_restored() -> Iterator[None]:
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.usefixtures("sigterm_restored")
def test_the_first_sigterm_exits_and_a_second_one_leaves_the_cleanup_to_finish() -> None:
    install_signal_exit()
    cleaned: list[str] = []
    with pytest.raises(SystemExit) as exited:
        try:
            signal.raise_signal(signal.SIGTERM)  # (its handler runs in this thread, next)
            cleaned.append("not reached")
        finally:
            signal.raise_signal(signal.SIGTERM)  # a second one while the children are stopped
            cleaned.append("children stopped")
    assert exited.value.code == 128 + signal.SIGTERM
    assert cleaned == ["children stopped"]
