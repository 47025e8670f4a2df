"""A stand-in inference worker for the Docker sidecar image: numpy only, no torch.

    python kv_worker.py write --prompts 8 --tokens 256 --seed 1
    python kv_worker.py read  --prompts 8 --tokens 256 --seed 1 --expect hit
    python kv_worker.py watch --prompts 8 --tokens 256 --seed 1      # until SIGTERM

It talks to the sidecar through `kvstore_client` (the unix socket, `$KVSTORE_SOCKET`) and reads
and writes KV bytes in place through its own mapping of the pool (the descriptor the client got
from the sidecar's pool socket, `Namespace.pool_descriptor()`): a numpy array over the mmap, so a hit is read where the writer put it, without a copy (the
client library's own page views are torch tensors; this worker shows that the image needs no
torch). Every page's bytes are a function of (seed, prompt, page index), so any process
recomputes what a page must hold and compares byte for byte.

`write` stores the prompts and flushes them to the disk tier (they survive a sidecar restart).
`read` looks each prompt up (pinned) and checks every hit page; `--expect hit` fails unless
every prompt is a full hit. `watch` does the same in a loop, reconnecting whenever the sidecar
goes away, until SIGTERM (`docker stop`); it counts hits, misses, errors and wrong pages.
Each mode prints one JSON line and exits 1 on any wrong byte (or an unmet `--expect`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import signal
import sys
import time
from typing import Any

import kvstore_client
import numpy as np
from kvstore_client.errors import KVStoreClientError


def prompt_tokens(seed: int, prompt: int, n: int) -> list[int]:
    """Token ids of prompt `prompt`: random, so no two prompts share a first page."""
    rng = np.random.default_rng([seed, prompt, 1])
    return rng.integers(0, 32000, n).tolist()


def page_bytes(seed: int, prompt: int, index: int, size: int) -> np.ndarray:
    """What page `index` of prompt `prompt` must hold: `size` bytes, every value possible."""
    return np.random.default_rng([seed, prompt, 2, index]).integers(0, 256, size, dtype=np.uint8)


class Pool:
    """One process's mapping of a namespace's pool: page `slot` is a numpy view into it."""

    def __init__(self, ns: Any) -> None:
        descriptor, fd = ns.info.pool, ns.pool_descriptor()
        try:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if fd.writable else 0)
            self.mm = mmap.mmap(fd.fd, descriptor.nbytes, flags=mmap.MAP_SHARED, prot=prot)
        finally:
            fd.close()  # the mapping keeps the memory
        self.name = f"{descriptor.pool_epoch:016x}"
        self.bytes = np.frombuffer(self.mm, dtype=np.uint8)
        self.offset, self.stride, self.size = descriptor.offset, descriptor.page_stride, descriptor.page_bytes

    def page(self, slot: int) -> np.ndarray:
        start = self.offset + slot * self.stride
        return self.bytes[start : start + self.size]  # a view: no bytes copied


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.client: kvstore_client.Client | None = None
        self.pools: dict[str, Pool] = {}

    def connect(self) -> kvstore_client.Client:
        if self.client is None:
            self.client = kvstore_client.connect(client_name=f"worker-{os.getpid()}", connect_timeout_s=30)
        return self.client

    def drop(self) -> None:
        """Forget the session (the sidecar went away); mappings of old pools stay valid memory."""
        if self.client is not None:
            with contextlib.suppress(Exception):  # a dead daemon: nothing to close there
                self.client.close()
        self.client = None

    def pool(self, ns: Any) -> Pool:
        """The mapping of the pool `ns` serves now (a restarted sidecar serves a new pool)."""
        epoch = f"{ns.info.pool.pool_epoch:016x}"
        if epoch not in self.pools:
            self.pools[epoch] = Pool(ns)
        return self.pools[epoch]

    def write(self) -> dict[str, Any]:
        a, kv = self.args, self.connect()
        ns = kv.namespace(a.namespace)
        written = sealed = 0
        for p in range(a.prompts):
            tokens = prompt_tokens(a.seed, p, a.tokens)
            with kv.allocate(ns) as seq:
                res = seq.append(tokens)
                pool = self.pool(ns)  # after the reply: the client mapped the pool its slots index
                for page in res.writable_pages:
                    pool.page(page.slot)[:] = page_bytes(a.seed, p, page.index, pool.size)
                    written += 1
                sealed += seq.commit().sealed_pages
        flushed = kv.flush()  # durable on the disk tier (its volume): a restart serves them again
        return {
            "mode": "write",
            "pid": os.getpid(),
            "written_pages": written,
            "sealed_pages": sealed,
            "flushed": str(flushed).replace("\n", " "),
        }

    def read_once(self) -> tuple[int, int, int, int]:
        """(full hits, misses or partial hits, pages checked, wrong pages) over every prompt."""
        a, kv = self.args, self.connect()
        ns = kv.namespace(a.namespace)
        full = short = checked = wrong = 0
        want_pages = a.tokens // ns.page_tokens
        for p in range(a.prompts):
            tokens = prompt_tokens(a.seed, p, a.tokens)
            with kv.lookup(ns, tokens, pin=True) as lk:  # pinned: nothing reuses the pages meanwhile
                pool = self.pool(ns)
                for i, slot in enumerate(lk.slots):
                    checked += 1
                    if not np.array_equal(pool.page(slot), page_bytes(a.seed, p, i, pool.size)):
                        wrong += 1
                        print(
                            f"WRONG BYTES: prompt {p} page {i} slot {slot} pool {pool.name}", file=sys.stderr
                        )
                if len(lk.slots) == want_pages:
                    full += 1
                else:
                    short += 1
        return full, short, checked, wrong

    def read(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.args.wait_s
        while True:
            full, short, checked, wrong = self.read_once()
            done = self.args.expect != "hit" or short == 0
            if wrong or done or time.monotonic() > deadline:
                break
            time.sleep(0.2)  # a restarted sidecar re-indexes its disk tier while it serves
        ok = wrong == 0 and done
        return {
            "mode": "read",
            "pid": os.getpid(),
            "full_hits": full,
            "misses": short,
            "pages_checked": checked,
            "wrong_pages": wrong,
            "ok": ok,
        }

    def watch(self) -> dict[str, Any]:
        stop: list[int] = []
        signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
        totals = {"rounds": 0, "full_hits": 0, "misses": 0, "pages_checked": 0, "wrong_pages": 0, "errors": 0}
        totals["full_hits_since_error"] = 0  # after the last error: served by the restarted sidecar
        print("watch: started", file=sys.stderr, flush=True)
        while not stop:
            try:
                full, short, checked, wrong = self.read_once()
            except KVStoreClientError as e:  # the sidecar is down or restarted: a new session
                totals["errors"] += 1
                totals["full_hits_since_error"] = 0
                print(f"watch: {type(e).__name__}: {str(e)[:160]}", file=sys.stderr)
                self.drop()
                time.sleep(0.2)
                continue
            totals["rounds"] += 1
            totals["full_hits"] += full
            totals["full_hits_since_error"] += full
            totals["misses"] += short
            totals["pages_checked"] += checked
            totals["wrong_pages"] += wrong
        return {"mode": "watch", "pid": os.getpid(), **totals, "ok": totals["wrong_pages"] == 0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["write", "read", "watch"])
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--expect", choices=["hit", "any"], default="any")
    parser.add_argument("--wait-s", type=float, default=60.0, help="read --expect hit: retry this long")
    args = parser.parse_args(argv)
    worker = Worker(args)
    try:
        report = getattr(worker, args.mode)()
    finally:
        worker.drop()
    print(json.dumps(report), flush=True)
    return 0 if report.get("ok", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
