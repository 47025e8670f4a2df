"""Make the daemon non-dumpable (prctl PR_SET_DUMPABLE 0; docs/security.md, "The pool").

A dumpable process's /proc/<pid>/fd, /proc/<pid>/mem, maps, environ and ptrace are open to
every other process of its user: any of them could open a pool's memfd read-write through
/proc/<pid>/fd/<n>, or read every pool through /proc/<pid>/mem, whatever its token. Not
dumpable, those are root's alone (the daemon still reaches its own). Also no core dumps.
`server.dumpable = true` (KVSTORE_DUMPABLE=1, --dumpable) opts out, for debugging with gdb,
py-spy or a core dump, and says so loudly.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

PR_SET_DUMPABLE = 4


def no_dumps(dumpable: bool) -> None:
    if dumpable:
        log.warning(
            "server.dumpable=true: other processes of uid %d can read this daemon's memory and open its "
            "pools' descriptors through /proc (debugging only)",
            os.getuid(),
        )
        return
    libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols: libc's prctl
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        log.warning(
            "prctl(PR_SET_DUMPABLE, 0) failed (%s): /proc/<pid> stays open to uid %d",
            os.strerror(err),
            os.getuid(),
        )
    else:
        log.info(
            "not dumpable: /proc/%d/fd and mem are closed to other processes (server.dumpable=true to debug)",
            os.getpid(),
        )
