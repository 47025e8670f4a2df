"""What a sync session holds: sequences and lookups, released by `release()` or `with` exit
(the blocking client's; kvstore_client.client builds them)."""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType
from typing import Protocol, TypeVar

from . import _wire
from ._core import Held, LookupBase, SequenceBase
from .errors import KVStoreClientError
from .results import AppendResult, CommitResult, PreemptResult, ReleaseResult

T = TypeVar("T")


class _Runs(Protocol):
    """The client's side these use (kvstore_client.client.Client)."""

    def _run(self, call: _wire.Call[T]) -> T: ...


_R = TypeVar("_R", bound="_ReleaseOnExit")


class _ReleaseOnExit(Held):
    """`release()` and `with` support for what the session holds (sequences, pins)."""

    _client: _Runs

    def release(self) -> ReleaseResult | None:
        """Free reserved pages / unpin shared ones. Idempotent; None when nothing was sent
        (already released, or the session is over and the daemon released it all)."""
        call = self._release_call()
        return None if call is None else self._client._run(call)

    def __enter__(self: _R) -> _R:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.release()
        except KVStoreClientError as err:
            self._release_failed(exc, err)


class Sequence(SequenceBase, _ReleaseOnExit):
    """A growing request (see `SequenceBase` for the page table). Releases on `with` exit."""

    _client: _Runs

    def append(self, tokens: _wire.Tokens) -> AppendResult:
        """Add tokens; the reply lists the pages they landed in. Write the WRITABLE ones."""
        return self._client._run(self._append_call(tokens))

    def commit(
        self, num_tokens: int | None = None, *, written_slots: Iterable[int] | None = None
    ) -> CommitResult:
        """Declare the KV of the first `num_tokens` tokens written (default: all appended).
        Full pages among them are sealed; pages deduplicated to another slot are updated
        in `pages`. `written_slots` asks the daemon to check they are all ours."""
        return self._client._run(self._commit_call(num_tokens, written_slots))

    def report_importance(self, scores: Iterable[float]) -> int:
        """IMPORTANCE sequences: scores[i] = page i's importance, one per page index
        (dropped ones included, ignored). Returns the pages held."""
        return self._client._run(self._report_importance_call(scores))

    def refresh(self) -> Sequence:
        """Replace the client-side page table with the daemon's (GetSequence)."""
        return self._client._run(self._refresh_call())

    def swap_out(self) -> PreemptResult:
        """Preempt: move every page below the pool (host/disk tier) and free the pool pages.
        The sequence keeps its tokens; `swap_in()` brings the pages back (new slots)."""
        return self._client._run(self._preempt_call(drop=False))

    def swap_in(self) -> Sequence:
        """Bring a swapped-out sequence's pages back; `pages` has their new slots. DataLoss
        (and the sequence emptied) if one was lost below the pool: recompute it then."""
        return self._client._run(self._swap_in_call())

    def drop(self) -> PreemptResult:
        """Preempt by dropping: free every page and empty the sequence (same id and budget);
        append the tokens again to recompute (cached pages still hit)."""
        return self._client._run(self._preempt_call(drop=True))


class Lookup(LookupBase, _ReleaseOnExit):
    """A lookup result; a pinned one holds its pages until `release()` / `with` exit."""

    def wait(self, pages: int = 0) -> Lookup:
        """With `return_in_flight=True`: wait until the first `pages` pages (0 = all) are in
        the pool. Updates `ready_pages`, `slots` and `hit_tokens` (which shrinks if a page
        failed its checksum below the pool)."""
        if self.ready_pages >= (pages or len(self.slots)):
            return self
        return self._client._run(self._wait_call(pages))
