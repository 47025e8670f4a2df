"""The disk tier's read transactions that are open, so its writer can wait for them to end.

LMDB cannot reuse a page freed after the snapshot of the oldest open read transaction: the
reader may still be looking at it. On a small map with busy readers those pages can use up
the headroom, and a write (or even the delete that makes room) fails with MapFullError
although the tier holds less than its capacity. The writer then waits for the read
transactions open at that moment to end (they are short: one record's copy) and tries
again, rather than dropping the records it was asked to write.

Each read transaction is counted under the epoch it began in; `wait_for_open` starts a new
epoch and waits until none from an earlier one is left. Readers in other processes are not
seen here (LMDB's reader table holds them; `reader_check()` clears the dead ones).
"""

from __future__ import annotations

import threading
from typing import Any


class OpenReads:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._epoch = 0
        self._open: dict[int, int] = {}  # epoch -> read transactions begun in it, still open

    def txn(self, env: Any) -> _Tracked:
        """`with open_reads.txn(env) as txn:` a read transaction (buffers=True), counted."""
        return _Tracked(self, env)

    def begin(self) -> int:
        with self._cond:
            epoch = self._epoch
            self._open[epoch] = self._open.get(epoch, 0) + 1
            return epoch

    def end(self, epoch: int) -> None:
        with self._cond:
            left = self._open[epoch] - 1
            if left:
                self._open[epoch] = left
            else:
                del self._open[epoch]
                self._cond.notify_all()

    def wait_for_open(self, timeout: float) -> bool:
        """Wait until every read transaction open now has ended; False if one outlived
        `timeout` (seconds). Those begun meanwhile are not waited for."""
        with self._cond:
            self._epoch += 1
            now = self._epoch
            return self._cond.wait_for(lambda: not self._open or min(self._open) >= now, timeout)


class _Tracked:
    __slots__ = ("_env", "_epoch", "_owner", "_txn")

    def __init__(self, owner: OpenReads, env: Any) -> None:
        self._owner = owner
        self._env = env

    def __enter__(self) -> Any:
        self._epoch = self._owner.begin()
        try:
            self._txn = self._env.begin(buffers=True)
        except BaseException:
            self._owner.end(self._epoch)
            raise
        return self._txn

    def __exit__(self, *exc: object) -> None:
        try:
            self._txn.abort()  # a read transaction: nothing to commit
        finally:
            self._owner.end(self._epoch)
