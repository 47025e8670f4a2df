"""The quarantine: reserved device pages of a client that went away without closing.

A client's GPU work is asynchronous: its socket can close (a crash, a kill, a lost
connection) while kernels it queued still write its RESERVED pages. Freed at once, such a
page could be handed to another writer and overwritten by the dead client's late write.
So when a session ends without CloseSession (the library synchronizes before it sends
that), its reserved pages in device pools stay RESERVED under `QUARANTINE_OWNER` until its
process is gone: the daemon holds a pidfd of the pid the client told at OpenSession, taken
when the session opened (so a reused pid is never mistaken for it) and only when the
client's pid namespace is the daemon's. When the pid cannot be watched (another pid
namespace, pidfd_open failing) they stay for a fixed grace (`quarantine_grace_s`). Its
pins are dropped at once: a sealed page never changes, reading it harms nobody.

CPU pools never quarantine: a store through a shared mapping is done when the call
returns. `Store.reap_expired` (the lease reaper's tick) frees what is due.
"""

from __future__ import annotations

import logging
import os
import select
from collections.abc import Callable
from dataclasses import dataclass, field

from kvstore.memory.pages import Page, PageState
from kvstore.store.namespace import Namespace
from kvstore.store.sessions import Session

log = logging.getLogger(__name__)

QUARANTINE_OWNER = -2  # owner of a RESERVED page held for a dead client's late writes
CLOSED_BY_CLIENT = "closed by client"  # the one way a session ends with its device work synced


def watch_pid(pid: int, pid_ns: int) -> int:
    """A pidfd of the client's process, or -1 when its pid means nothing here."""
    if pid <= 0 or not pid_ns:
        return -1
    try:
        if os.stat("/proc/self/ns/pid").st_ino != pid_ns:
            return -1  # another pid namespace: its pid names another process here, or none
        return os.pidfd_open(pid)
    except (OSError, OverflowError, AttributeError):  # gone, out of range, no pidfd_open (Linux < 5.3)
        return -1


def exited(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited (a zombie counts)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


@dataclass
class Held:
    session_id: int
    pidfd: int  # -1: wait until `until`
    until: float
    pages: dict[Namespace, list[Page]] = field(default_factory=dict)


class Quarantine:
    def __init__(self, clock: Callable[[], float], grace_s: float) -> None:
        self.clock = clock
        self.grace_s = grace_s
        self.held: list[Held] = []

    def session_ends(self, session: Session, clean: bool) -> int:
        """Before its sequences are released: unless it ended `clean` (CloseSession, sent
        after the client synchronized), move its reserved device pages here, out of its
        sequences. The session's pidfd is ours either way. How many pages."""
        if clean:
            _close(session.pidfd)
            session.pidfd = -1
            return 0
        held = Held(session.id, session.pidfd, self.clock() + self.grace_s)
        session.pidfd = -1
        for seq in session.sequences.values():
            if not seq.ns.pool.handle.on_device:
                continue
            mine = [p for p in [*seq.pages, *seq.spare] if _reserved_by(p, seq.id)]
            if not mine:
                continue
            seq.pages = [None if _reserved_by(p, seq.id) else p for p in seq.pages]
            seq.spare = [p for p in seq.spare if not _reserved_by(p, seq.id)]
            for page in mine:
                page.owner = QUARANTINE_OWNER
            held.pages.setdefault(seq.ns, []).extend(mine)
            seq.ns.pages_quarantined += len(mine)
        n = sum(map(len, held.pages.values()))
        if not n:
            _close(held.pidfd)
            return 0
        self.held.append(held)
        how = "until its process is gone" if held.pidfd >= 0 else f"for {self.grace_s:.0f}s (pid not visible)"
        log.warning(
            "session %d ended without closing: %d reserved device page(s) quarantined %s", session.id, n, how
        )
        return n

    def reap(self, namespaces: dict[str, Namespace]) -> int:
        """Free what is due: pages of clients whose process is gone, or whose grace ended."""
        now, freed = self.clock(), 0
        for held in list(self.held):
            if exited(held.pidfd) if held.pidfd >= 0 else now >= held.until:
                self.held.remove(held)
                freed += _free(held, namespaces)
        return freed

    def close(self) -> None:
        for held in self.held:
            _close(held.pidfd)
        self.held = []


def _reserved_by(page: Page | None, seq_id: int) -> bool:
    return page is not None and page.state is PageState.RESERVED and page.owner == seq_id


def _free(held: Held, namespaces: dict[str, Namespace]) -> int:
    freed = 0
    for ns, pages in held.pages.items():
        ns.pages_quarantined -= len(pages)
        if namespaces.get(ns.name) is not ns:
            continue  # deleted meanwhile: its pool is gone with it
        for page in pages:
            if page.state is PageState.RESERVED and page.owner == QUARANTINE_OWNER:
                ns.free_reserved(page)
                freed += 1
    _close(held.pidfd)
    log.info("session %d: %d quarantined page(s) freed", held.session_id, freed)
    return freed


def _close(fd: int) -> None:
    if fd >= 0:
        os.close(fd)
