"""What the proof-under-load benchmarks (fuzz, soak, killed-clients) share: page bytes any
process can check, a tokens file, client processes forked cheaply, and the daemon's footprint
read from /proc.

Page bytes encode who wrote what: page `index` of prompt `pid` starts with (pid, index) and
is filled from a digest of the two, so a reader that finds any other bytes in a hit page
knows it was served wrong bytes (another prompt's page, a stale or half-written one).

Client processes come from a multiprocessing fork server that has imported the client
library and torch once (`client_context`): a client then starts in milliseconds and shares
those pages, where a fresh interpreter would take ~3 CPU seconds and ~200 MB each. Clients
map pools only through the client library (never by a /dev/shm path), so they follow how the
daemon hands out its pools.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import struct
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

from .harness import SHM_DIR

VOCAB = 50_000
_HEADER = struct.Struct("<QQ")


# ---------------------------------------------------------------- pages any process can check


def prompt_tokens(pid: int, pages: int, page_tokens: int) -> list[int]:
    """The token ids of prompt `pid`: its own from the first page on, so two prompts never
    share a page (and a hit page of prompt `pid` can only hold prompt `pid`'s bytes)."""
    rng = random.Random(pid * 7919 + 17)
    return [rng.randrange(VOCAB) for _ in range(pages * page_tokens)]


def page_bytes(pid: int, index: int, nbytes: int) -> bytes:
    """What page `index` of prompt `pid` holds: (pid, index) then a digest of them, repeated."""
    head = _HEADER.pack(pid, index)
    fill = hashlib.blake2b(head, digest_size=64).digest()
    body = fill * (nbytes // len(fill) + 1)
    return (head + body)[:nbytes]


def who_wrote(data: bytes) -> tuple[int, int]:
    """(pid, index) a page's bytes claim, for a failure message."""
    return _HEADER.unpack_from(data) if len(data) >= _HEADER.size else (-1, -1)


def read_page(ns: Any, slot: int) -> bytes:
    """A page's bytes through this process's mapping of the pool (the client library's)."""
    return ns.pool.raw_page(slot).numpy().tobytes()


def write_page(ns: Any, slot: int, data: bytes) -> None:
    import numpy as np

    ns.pool.raw_page(slot).numpy()[:] = np.frombuffer(data, np.uint8)


# ---------------------------------------------------------------- tokens


def write_tokens_file(path: Path, tokens: dict[str, tuple[str, dict[str, list[str]]]]) -> str:
    """A tokens file (docs/security.md): name -> (secret, {namespace: scopes}); mode 0600."""
    lines = []
    for name, (secret, scopes) in tokens.items():
        grants = ", ".join(f'"{ns}" = [{", ".join(f"{s!r}" for s in sc)}]' for ns, sc in scopes.items())
        lines += ["[[token]]", f'name = "{name}"', f'token = "{secret}"', f"scopes = {{ {grants} }}", ""]
    path.write_text("\n".join(lines).replace("'", '"'))
    path.chmod(0o600)
    return str(path)


# ---------------------------------------------------------------- client processes


def client_context() -> BaseContext:
    """A fork-server context whose server has imported the client library, torch and numpy
    (and opened no gRPC channel: a child forked from a process with live channels can hang).
    The server is started here (its imports take seconds), before anything is timed."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["kvstore_client", "torch", "numpy", "kvstore_bench.proof_common"])
    first = ctx.Process(target=_nothing)
    first.start()
    first.join()
    return ctx


def _nothing() -> None:
    pass


# ---------------------------------------------------------------- the daemon's footprint


# grpc's own log line when a servicer's good reply cannot be sent because its caller gave up
# (deadline, cancel) meanwhile: not the daemon's error (the client saw DEADLINE_EXCEEDED or
# CANCELLED), so counted apart.
GONE_CALLER = "ExecuteBatchError raised in core by servicer method"


def logged_tracebacks(log_text: str, keep: int = 2) -> tuple[int, list[str], int]:
    """How many tracebacks a daemon's log holds, the first `keep` (with the line before each,
    which says what failed) for a report that outlives the log, and how many more were
    grpc's about replies to callers already gone (GONE_CALLER)."""
    lines = log_text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
    gone = [i for i in starts if i > 0 and GONE_CALLER in lines[i - 1]]
    starts = [i for i in starts if i not in gone]
    shown = []
    for i in starts[:keep]:
        end = i + 1
        while end < len(lines) and (lines[end].startswith((" ", "\t")) or end == i + 1):
            end += 1
        shown.append("\n".join(lines[max(0, i - 1) : min(end + 1, i + 60)]))
    return len(starts), shown, len(gone)


def rss_bytes(pid: int) -> dict[str, int]:
    """VmRSS and its parts (RssAnon: the daemon's own heap; RssShmem: pool pages it touched)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def shm_entries(prefix: str = "") -> int:
    """Entries in /dev/shm whose name starts with `prefix` (empty: everyone's, which other
    processes on the machine change too)."""
    try:
        return sum(1 for name in os.listdir(SHM_DIR) if name.startswith(prefix))
    except OSError:
        return -1
