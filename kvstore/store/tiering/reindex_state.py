"""How far the disk tier's re-index at start has come (reindex.py; kvstore/daemon.py runs it),
for Stats, the metrics and its log line. Written by the re-index thread, read by the loop:
each field is one int or bool, replaced whole."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ReindexState:
    running: bool = False
    done: int = 0  # records scanned (pages), of
    total: int = 0  # the records on disk when the scan began
    bytes_done: int = 0  # payload bytes of the pages indexed
    # Unknown until every record is read (a record's size is in it): pages on disk x the mean
    # record so far while running, exact once done.
    bytes_total: int = 0

    def progress(self, done: int, total: int, finished: bool = False) -> None:
        self.done, self.total = done, total
        if finished:
            self.bytes_total = self.bytes_done
        elif done:
            self.bytes_total = max(self.bytes_done, self.bytes_done * total // done)
