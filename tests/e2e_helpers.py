"""Shared pieces of the end-to-end tests (tests/test_e2e_*.py).

- `Worker`: a separate OS process (this file run as a script) that drives the daemon the way
  an inference process would: its own client, its own session, its own mapping of the pool.
  The test sends it one JSON command a line on stdin and reads one JSON reply a line on
  stdout, so it can hold a session open while other processes act, and be `kill -9`ed.
- `Raw`: raw gRPC stubs (no client library, no session) for Stats polling and for inputs the
  client library would refuse before they reach the daemon.
- `page_content`: the deterministic KV a test writes into a page, so any process can check
  what it reads back.
- `wait_until`: polls a real condition (Stats, a file) with a deadline and a clear failure;
  never a bare sleep.

Run as a script (`python e2e_helpers.py worker`) this module is the worker; it imports torch
and the client library only when a command needs them, so raw-stub workers start fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import json_format
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb
from kvstore_proto.kvstore.v1 import kvstore_pb2_grpc as pb_grpc

HELPERS = Path(__file__).resolve()
T = TypeVar("T")


# ---------------------------------------------------------------- content and prompts


def prompt(n: int, seed: int, vocab: int = 50_000) -> list[int]:
    """`n` deterministic token ids in [0, vocab)."""
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def page_content(index: int, tokens: Sequence[int], shape: Sequence[int], dtype: Any = None) -> Any:
    """The KV a test writes for page `index` of a prompt whose tokens in that page are
    `tokens`: a torch tensor of `shape`, seeded by (index, tokens), the same in every process."""
    import torch

    h = hashlib.blake2b(digest_size=8)
    h.update(index.to_bytes(4, "little"))
    h.update(np.asarray(list(tokens), dtype="<i4").tobytes())
    gen = torch.Generator().manual_seed(int.from_bytes(h.digest(), "little") >> 1)
    return torch.randn(tuple(shape), generator=gen).to(dtype or torch.float16)


def page_content_bytes(index: int, tokens: Sequence[int], shape: Sequence[int], dtype: Any = None) -> bytes:
    return page_content(index, tokens, shape, dtype).contiguous().view(-1).numpy().tobytes()


def page_tokens_of(tokens: Sequence[int], index: int, page_tokens: int) -> list[int]:
    return list(tokens[index * page_tokens : (index + 1) * page_tokens])


def prompt_bytes(tokens: Sequence[int], shape: Sequence[int], page_tokens: int) -> bytes:
    """page_content of every page of `tokens`, concatenated (page i at i * page_bytes)."""
    pages = -(-len(tokens) // page_tokens)
    return b"".join(
        page_content_bytes(i, page_tokens_of(tokens, i, page_tokens), shape) for i in range(pages)
    )


def read_page(target: str, namespace: str, slot: int, token: str = "") -> bytes:
    """Page `slot`'s bytes as the daemon's pool holds them, read in this process (not the
    writer's, not the daemon's) through a descriptor obtained the supported way: a ticket
    from GetNamespace traded on the pool socket (os.pread on it, no mapping)."""
    from kvstore_client.pool_fd import fetch

    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(target) as channel:
        d = pb_grpc.KVStoreStub(channel).GetNamespace(
            pb.GetNamespaceRequest(namespace=namespace), timeout=10, metadata=metadata
        )
    pool = fetch(target, d.pool, token, namespace)
    try:
        return os.pread(pool.fd, d.pool.page_bytes, d.pool.offset + slot * d.pool.page_stride)
    finally:
        pool.close()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- waiting


def wait_until(
    get: Callable[[], T], ok: Callable[[T], bool], *, timeout: float, what: str, interval: float = 0.02
) -> T:
    """Poll `get()` until `ok(value)`; return that value. Fails after `timeout` seconds
    saying `what` was awaited and the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        value = get()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last seen: {value}")
        time.sleep(interval)


# ---------------------------------------------------------------- raw stubs


class Raw:
    """Raw stubs on one channel: no session, no client-side checks."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.channel = grpc.insecure_channel(target)
        self.kv = pb_grpc.KVStoreStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self, namespace: str) -> tuple[pb.NamespaceStats, int]:
        """(the namespace's counters, open sessions)."""
        reply = self.kv.Stats(pb.StatsRequest(namespace=namespace), timeout=10)
        (ns,) = reply.namespaces
        return ns, reply.sessions

    def pool(self, namespace: str) -> pb.PoolDescriptor:
        return self.kv.GetNamespace(pb.GetNamespaceRequest(namespace=namespace), timeout=10).pool

    def read_page(self, namespace: str, slot: int) -> bytes:
        """Page `slot`'s bytes in the daemon's pool (`read_page`)."""
        return read_page(self.target, namespace, slot)

    def counts(self, namespace: str) -> dict[str, int]:
        """The page counts of a namespace plus `sessions`, as a dict (readable in failures)."""
        ns, sessions = self.stats(namespace)
        fields = ("pages_total", "pages_free", "pages_reserved", "pages_sealed", "pages_pinned")
        return {f: getattr(ns, f) for f in fields} | {"sequences": ns.sequences, "sessions": sessions}

    def error(self, method: str, request: Any, service: str = "kv") -> grpc.RpcError:
        """Call `method` and return the RpcError it must raise."""
        stub = self.kv if service == "kv" else self.admin
        try:
            reply = getattr(stub, method)(request, timeout=10)
        except grpc.RpcError as err:
            return err
        raise AssertionError(f"{method}({request}) should have failed but answered {reply}")


def assert_status(err: Any, code: grpc.StatusCode, *parts: str) -> str:
    """`err` (grpc.RpcError, or a client error with .code/.details) has `code` and a message
    containing every one of `parts`; returns the message."""
    got_code = err.code() if callable(getattr(err, "code", None)) else err.code
    details = err.details() if callable(getattr(err, "details", None)) else err.details
    assert got_code == code, f"expected {code.name}, got {got_code}: {details}"
    for part in parts:
        assert part in (details or ""), f"{code.name} message {details!r} should mention {part!r}"
    return details


# ---------------------------------------------------------------- worker processes


class WorkerError(Exception):
    """A command failed inside the worker; `code` is the gRPC status code name, if any."""

    def __init__(self, error: dict[str, Any]) -> None:
        self.type = error.get("type", "")
        self.code = error.get("code")
        self.details = error.get("details", "")
        super().__init__(f"{self.type} {self.code}: {self.details}")


class Worker:
    """A separate OS process driving the daemon (see `_WorkerState` for its commands)."""

    def __init__(self, name: str = "worker", *, client: bool = True) -> None:
        """`client`: import torch and the client library at start (in parallel with the
        test's other work), for workers that will `connect`; raw-stub workers skip it."""
        self.name = name
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(HELPERS), "worker", *(["--client"] if client else [])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env={k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")},
        )
        self._buf = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr_text(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def call(self, op: str, *, timeout: float = 60.0, **args: Any) -> Any:
        """Run command `op` in the worker; its result, or WorkerError."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"op": op, **args}).encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise AssertionError(f"{self.name} is gone; stderr:\n{self.stderr_text()}") from None
        reply = json.loads(self._readline(timeout, op))
        if not reply["ok"]:
            raise WorkerError(reply["error"])
        return reply["result"]

    def _readline(self, timeout: float, op: str) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.name}: no reply to {op!r} in {timeout:g}s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    self.proc.wait(5)
                    raise AssertionError(
                        f"{self.name} exited ({self.proc.returncode}) during {op!r}; stderr:\n"
                        + self.stderr_text()
                    )
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def kill(self) -> None:
        """SIGKILL and reap: no handler runs, no goodbye reaches the daemon."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def close(self) -> None:
        if self.alive():
            with contextlib.suppress(BrokenPipeError, OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()  # EOF: the worker closes its client and exits
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()
        self._stderr.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _WorkerState:
    """Commands of a worker process (`op_<name>`); ids are the daemon's."""

    def __init__(self) -> None:
        self.client: Any = None
        self.sequences: dict[int, Any] = {}
        self.lookups: dict[int, Any] = {}
        self.raw: Raw | None = None

    def op_pid(self) -> int:
        return os.getpid()

    # ---- through the client library (one session, KeepAlive stream held by the library)

    def op_connect(self, target: str, client_name: str = "worker", lease_ttl_s: float | None = None) -> dict:
        import kvstore_client

        self.client = kvstore_client.connect(target, client_name=client_name, lease_ttl_s=lease_ttl_s)
        return {"session_id": self.client.session_id, "lease_ttl_s": self.client.lease_ttl_s}

    def op_write_prompt(self, namespace: str, tokens: list[int], release: bool = False) -> dict:
        """Allocate, append `tokens`, write page_content into every WRITABLE page through this
        process's mapping, commit. The sequence is held unless `release`."""
        ns = self.client.namespace(namespace)
        T = ns.page_tokens
        seq = self.client.allocate(ns)
        appended = seq.append(tokens)
        for page in appended.writable_pages:
            want = page_content(page.index, page_tokens_of(tokens, page.index, T), ns.page_shape, ns.dtype)
            ns.page(page.slot).copy_(want)
        committed = seq.commit()
        out = {
            "sequence_id": seq.sequence_id,
            "slots": seq.slots,
            "states": [p.state.name for p in appended.pages],
            "cached_tokens": appended.cached_tokens,
            "sealed_pages": committed.sealed_pages,
            "deduplicated_pages": committed.deduplicated_pages,
        }
        if release:
            seq.release()
        else:
            self.sequences[seq.sequence_id] = seq
        return out

    def op_put(self, namespace: str, tokens: list[int]) -> dict:
        """`client.put` of page_content for every page of `tokens` (the fast path)."""
        ns = self.client.namespace(namespace)
        T = ns.page_tokens
        pages = -(-len(tokens) // T)
        data = b"".join(
            page_content_bytes(i, page_tokens_of(tokens, i, T), ns.page_shape, ns.dtype) for i in range(pages)
        )
        res = self.client.put(ns, tokens, data)
        return {"sealed_pages": res.sealed_pages, "cached_tokens": res.cached_tokens}

    def op_swap_out_partial(self, namespace: str, tokens: list[int]) -> dict:
        """Allocate, append, write every page, commit the full ones, swap the sequence out
        (held: the session owns its swapped pages)."""
        ns = self.client.namespace(namespace)
        seq = self.client.allocate(ns)
        for page in seq.append(tokens).writable_pages:
            want = page_content(
                page.index, page_tokens_of(tokens, page.index, ns.page_tokens), ns.page_shape, ns.dtype
            )
            ns.page(page.slot).copy_(want)
        seq.commit(len(tokens) // ns.page_tokens * ns.page_tokens)
        moved = seq.swap_out()
        self.sequences[seq.sequence_id] = seq
        return {"sequence_id": seq.sequence_id, "pages_swapped": moved.pages_swapped}

    def op_allocate(self, namespace: str, max_tokens: int = 0) -> dict:
        seq = self.client.allocate(namespace, max_tokens=max_tokens)
        self.sequences[seq.sequence_id] = seq
        return {"sequence_id": seq.sequence_id, "reserved_pages": seq.reserved_pages}

    def op_append(self, sequence_id: int, tokens: list[int]) -> dict:
        res = self.sequences[sequence_id].append(tokens)
        return {"slots": [p.slot for p in res.pages], "states": [p.state.name for p in res.pages]}

    def op_commit(self, sequence_id: int, num_tokens: int | None = None) -> dict:
        res = self.sequences[sequence_id].commit(num_tokens)
        return {"sealed_pages": res.sealed_pages, "deduplicated_pages": res.deduplicated_pages}

    def op_release(self, sequence_id: int) -> dict:
        res = self.sequences.pop(sequence_id).release()
        return {"pages_freed": res.pages_freed, "pages_unpinned": res.pages_unpinned}

    def op_release_pin(self, pin_id: int) -> dict:
        res = self.lookups.pop(pin_id).release()
        return {"pages_freed": res.pages_freed, "pages_unpinned": res.pages_unpinned}

    def op_lookup(self, namespace: str, tokens: list[int], pin: bool = False) -> dict:
        found = self.client.lookup(namespace, tokens, pin=pin)
        if found.pinned:
            self.lookups[found.pin_id] = found
        return {"hit_tokens": found.hit_tokens, "slots": found.slots, "pin_id": found.pin_id}

    def op_verify(self, namespace: str, tokens: list[int], slots: list[int]) -> dict:
        """Read pages `slots` (page i of `tokens`) through this process's own mapping: which
        differ from page_content, and the sha256 of each page's bytes."""
        ns = self.client.namespace(namespace)
        whole = ns.pool.view()  # [num_pages, *page_shape]: must agree with the per-page views
        mismatched, digests = [], []
        for i, slot in enumerate(slots):
            got = ns.pool.raw_page(slot).numpy().tobytes()
            assert whole[slot].contiguous().view(-1).numpy().tobytes() == got, f"pool.view()[{slot}] differs"
            want = page_content_bytes(i, page_tokens_of(tokens, i, ns.page_tokens), ns.page_shape, ns.dtype)
            if got != want:
                mismatched.append(i)
            digests.append(sha256(got))
        return {"mismatched": mismatched, "digests": digests}

    def op_write_bytes(self, namespace: str, slot: int, offset: int, data_hex: str) -> None:
        import torch

        raw = self.client.namespace(namespace).pool.raw_page(slot)
        data = bytearray.fromhex(data_hex)
        raw[offset : offset + len(data)] = torch.frombuffer(data, dtype=torch.uint8)

    def op_read_bytes(self, namespace: str, slot: int, offset: int, n: int) -> str:
        raw = self.client.namespace(namespace).pool.raw_page(slot)
        return raw[offset : offset + n].numpy().tobytes().hex()

    # ---- raw stubs (no client library, no KeepAlive stream: the lease lives on requests)

    def op_raw(self, target: str, method: str, request: dict) -> dict:
        """One KVStore RPC with a request given as a dict (protobuf JSON field names)."""
        if self.raw is None:
            self.raw = Raw(target)
        req = json_format.ParseDict(request, getattr(pb, f"{method}Request")())
        reply = getattr(self.raw.kv, method)(req, timeout=10)
        return json_format.MessageToDict(reply, preserving_proto_field_name=True)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.raw is not None:
            self.raw.close()


def _error_dict(e: BaseException) -> dict[str, Any]:
    code = getattr(e, "code", None)
    if callable(code):  # a grpc.RpcError
        code, details = code(), e.details()  # type: ignore[attr-defined]
    else:
        details = getattr(e, "details", None) or str(e)
    return {"type": type(e).__name__, "code": getattr(code, "name", None), "details": details}


def _worker_main(preload: bool) -> None:
    if preload:
        import kvstore_client  # noqa: F401  (slow: torch)
    state = _WorkerState()
    try:
        for line in sys.stdin.buffer:
            request = json.loads(line)
            op = request.pop("op")
            try:
                reply = {"ok": True, "result": getattr(state, f"op_{op}")(**request)}
            except Exception as e:
                reply = {"ok": False, "error": _error_dict(e)}
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
    finally:
        state.close()


def int_field(reply: dict, name: str) -> int:
    """A (u)int64 field of MessageToDict output (rendered as a string), 0 when absent."""
    return int(reply.get(name, 0))


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker_main(preload="--client" in sys.argv[2:])
