"""The stream a device pool's Commit and Release wait for (kvstore_client.device.stream)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

# The stream whose work Commit and Release wait for; None = the current stream of the thread
# (torch's). A context variable, so it follows an asyncio task as well as a thread.
_stream: contextvars.ContextVar[Any] = contextvars.ContextVar("kvstore_stream", default=None)


@contextlib.contextmanager
def stream(s: Any) -> Iterator[None]:
    """Calls inside wait for the work queued on `s` (a torch CUDA stream) before Commit and
    Release, instead of the current stream's: `with kvstore_client.device.stream(s): seq.commit()`."""
    token = _stream.set(s)
    try:
        yield
    finally:
        _stream.reset(token)


def current_stream() -> Any:
    return _stream.get()
