"""The daemon's unix socket path: a private directory, a lock held for the daemon's life
beside the socket, and a stale socket (of a daemon that died) removed at start."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import stat
from pathlib import Path

from kvstore.errors import StartupError

log = logging.getLogger(__name__)


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def claim(path: Path) -> int:
    """Own the socket path for the daemon's life, or fail if a live daemon does; returns the
    lock's file descriptor (give it to `release`).

    The lock file beside the socket is flock()ed; the kernel drops the lock when its holder
    dies, even by kill -9. So holding it means any socket file there is stale, and two
    daemons started at once cannot both pass this point."""
    private_dir(path.parent)
    lock = lock_path(path)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StartupError(
                f"another kvstore daemon (pid {owner}) is serving on {path}; "
                "stop it, or give this one another --socket"
            ) from None
        # A daemon stopping right now unlinks the lock file after we opened it: then we hold
        # a lock on a file nobody else will open. Retry on the file that is there now.
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())

    if not os.path.lexists(path):
        return fd
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        os.close(fd)
        raise StartupError(f"{path} exists and is not a socket; remove it or choose another --socket")
    if _answers(path):  # not a kvstore daemon (it would hold the lock), but someone's
        os.close(fd)
        raise StartupError(f"another process is listening on {path}; choose another --socket")
    os.unlink(path)
    log.warning("startup: removed stale socket %s (its daemon is gone)", path)
    return fd


def release(path: Path, lock_fd: int, socket_ino: int) -> None:
    """Remove our socket (only ours: its inode is the one we bound) and give back the lock."""
    if socket_ino:
        # grpc usually removes it on stop already; never remove a socket that is not ours.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == socket_ino:
                os.unlink(path)
        log.info("shutdown: socket %s removed", path)
    if lock_fd >= 0:
        # Unlink while still holding the lock, so no one can lock this file after we let go.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path(path))
        os.close(lock_fd)


def listen_beside(path: Path, what: str, backlog: int) -> socket.socket:
    """A unix stream socket listening on `path` (a socket beside the daemon's, e.g. the pool
    socket), mode 0600 before it listens: nobody else ever connects. A socket already there is
    stale: the daemon holds its socket path's lock (`claim`)."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise StartupError(f"{path} exists and is not a socket; remove it or choose another --socket")
        os.unlink(path)
        log.warning("startup: removed stale %s %s (its daemon is gone)", what, path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise StartupError(f"cannot listen on the {what} {path}: {e.strerror or e}") from e
    return sock


def private_dir(d: Path) -> None:
    """Create the socket's directory 0700. One that exists must not be shared by every user
    (sticky and world-writable, like /tmp), and must be ours (then made 0700 if others could
    enter or write it) or root's and writable by root alone: whoever can write
    there could swap our socket for theirs and see every client's requests."""
    try:
        d.mkdir(mode=0o700, parents=True)
        log.info("startup: created %s (mode 0700)", d)
    except FileExistsError:
        pass
    except OSError as e:
        raise StartupError(f"cannot create socket directory {d}: {e.strerror}") from e
    st = os.stat(d)
    mode = stat.S_IMODE(st.st_mode)
    if st.st_mode & stat.S_ISVTX and mode & 0o002:
        # /tmp and its kind are shared on purpose: making one 0700 would lock every other user
        # out of it (a root daemon with --socket /tmp/x.sock once did exactly that), and leaving
        # it open would leave the socket to whoever shares it.
        raise StartupError(
            f"socket directory {d} is shared by every user (mode {mode:o}): put the socket in a "
            f"directory of its own, e.g. {d / f'kvstore-{os.getuid()}'}/kvstore.sock (created 0700)"
        )
    if st.st_uid == os.getuid():
        if mode & 0o077:
            log.warning("socket directory %s had mode %o; setting 0700", d, mode)
            os.chmod(d, 0o700)
    elif st.st_uid != 0:
        raise StartupError(f"socket directory {d} belongs to uid {st.st_uid}, not to us (uid {os.getuid()})")
    elif mode & 0o022:
        raise StartupError(
            f"socket directory {d} (root's) has mode {mode:o}: others can write there and swap the "
            "socket; use a directory only we (or root alone) can write"
        )


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            return True  # e.g. a full backlog: someone is there
        return True
