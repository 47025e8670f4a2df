"""The pool only through the daemon (issue 19, item 2), end to end: a real daemon, its real
pool socket, real memfds passed with SCM_RIGHTS, clients in other processes.

- a reader's mapping (read scope alone) cannot be written: not by mmap, not by mprotect, not
  through a torch view (the writing process dies; the page is unchanged); a writer's can;
- a ticket is good once, for its token only, and expires;
- garbage on the pool socket gets a refusal and the daemon serves on;
- the daemon is not dumpable: another process of its user cannot open its descriptors or
  its memory through /proc (and can, with `server.dumpable`, which shows what it guards).
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import grpc
import kvstore_client
import pytest
import torch
from auth_helpers import NAMESPACES, READER, TOKENS, WRITER, write_tokens
from e2e_helpers import wait_until
from kvstore_client.errors import PoolError
from kvstore_client.pool_fd import fetch, fetch_for
from kvstore_proto import pool_socket as wire
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb
from kvstore_proto.kvstore.v1 import kvstore_pb2_grpc as pb_grpc

from kvstore.server.pool_tickets import TTL_S

T = NAMESPACES[0]["page_tokens"]
TOKEN_IDS = list(range(300, 300 + 2 * T))


@pytest.fixture
def secured(daemon_factory, tmp_path):
    tokens = write_tokens(tmp_path / "tokens.toml", TOKENS)
    return daemon_factory(server={"tokens_file": tokens}, namespaces=NAMESPACES).start()


def get_namespace(target: str, namespace: str, token: str = "") -> pb.NamespaceInfo:
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(target) as ch:
        return pb_grpc.KVStoreStub(ch).GetNamespace(
            pb.GetNamespaceRequest(namespace=namespace), timeout=10, metadata=metadata
        )


def ask(path: str, data: bytes, *, close_write: bool = True) -> tuple[int, str, list[int]]:
    """Send `data` on the pool socket: (status, text, descriptors received)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(data)
        if close_write:
            s.shutdown(socket.SHUT_WR)
        reply, fds, _, _ = socket.recv_fds(s, wire.MAX_REPLY, 4)
    status, _, _, _, text = wire.decode_reply(reply)
    return status, text, fds


READER_SCRIPT = r"""
import ctypes, json, mmap, sys
import kvstore_client
target, token, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
kv = kvstore_client.connect(target, token=token)
ns = kv.namespace("a")
pool = ns.pool
got = kv.get("a", list(range(300, 300 + n)))
libc = ctypes.CDLL(None, use_errno=True)
addr = pool.raw_page(0).data_ptr() & ~(mmap.PAGESIZE - 1)
rc = libc.mprotect(ctypes.c_void_p(addr), mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_WRITE)
print(json.dumps({"writable": pool.writable, "data": bytes(got.data.numpy()).hex(),
                  "mprotect": rc, "errno": ctypes.get_errno()}), flush=True)
slot = kv.lookup("a", list(range(300, 300 + n))).slots[0]
pool.raw_page(slot).fill_(0x5A)  # a buggy reader: this process dies, the page stays
print("wrote", flush=True)
"""


def test_a_readers_mapping_cannot_be_written_a_writers_can(secured) -> None:
    with kvstore_client.connect(secured.target, token=WRITER) as w:
        data = bytes((i * 7 + 3) % 251 for i in range(w.namespace("a").pool.page_bytes * 2))
        assert w.put("a", TOKEN_IDS, data).sealed_pages == 2
        assert w.namespace("a").pool.writable
        reader = subprocess.run(
            [sys.executable, "-c", READER_SCRIPT, secured.target, READER, str(len(TOKEN_IDS))],
            capture_output=True,
            text=True,
            timeout=120,
        )
        lines = reader.stdout.splitlines()
        assert lines, reader.stderr
        seen = json.loads(lines[0])
        # Zero-copy in another process, read-only: mprotect cannot make it writable (EACCES).
        assert seen["writable"] is False and bytes.fromhex(seen["data"]) == data
        assert (seen["mprotect"], seen["errno"]) == (-1, 13)
        assert reader.returncode == -signal.SIGSEGV and "wrote" not in lines, (reader.returncode, lines)
        assert bytes(w.get("a", TOKEN_IDS).data.numpy()) == data  # the reader changed nothing

        # The same, at the descriptor: no writable mapping, no write, no truncation.
        pool = fetch(secured.target, get_namespace(secured.target, "a", READER).pool, READER, "a")
        try:
            assert not pool.writable
            with pytest.raises(PermissionError):
                mmap.mmap(pool.fd, pool.nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            with pytest.raises(OSError):
                os.pwrite(pool.fd, b"x", 0)
            with pytest.raises(OSError):
                os.ftruncate(pool.fd, 0)
        finally:
            pool.close()
        # A writer's descriptor writes, but cannot shrink the pool under the daemon (sealed).
        pool = fetch(secured.target, get_namespace(secured.target, "a", WRITER).pool, WRITER, "a")
        try:
            assert pool.writable
            with pytest.raises(PermissionError):
                os.ftruncate(pool.fd, 0)
        finally:
            pool.close()
    assert secured.shm_segments() == []


def test_a_ticket_is_single_use_bound_to_its_token_and_expires(secured) -> None:
    path = secured.socket_path.with_name(secured.socket_path.name + wire.SUFFIX)
    early = get_namespace(secured.target, "a", READER).pool.pool_ticket
    issued = time.monotonic()
    d = get_namespace(secured.target, "a", READER).pool
    assert len(d.pool_ticket) == 32
    # Another token's session cannot use it, and the attempt uses it up.
    assert ask(str(path), wire.encode_request(d.pool_ticket, WRITER))[:2] == (
        wire.REFUSED,
        "this ticket was issued to another token: present the token that asked for it",
    )
    status, text, fds = ask(str(path), wire.encode_request(d.pool_ticket, READER))
    assert (status, fds) == (wire.REFUSED, []) and "used already" in text
    # A fresh one works once: read-only for the reader.
    d = get_namespace(secured.target, "a", READER).pool
    status, _, fds = ask(str(path), wire.encode_request(d.pool_ticket, READER))
    assert status == wire.GRANTED and len(fds) == 1
    assert fcntl.fcntl(fds[0], fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    os.close(fds[0])
    assert ask(str(path), wire.encode_request(d.pool_ticket, READER))[0] == wire.REFUSED
    # Without the token that asked: refused. No scope on "b": no GetNamespace, no ticket.
    d = get_namespace(secured.target, "a", READER).pool
    assert ask(str(path), wire.encode_request(d.pool_ticket, ""))[0] == wire.REFUSED
    with pytest.raises(grpc.RpcError) as err:
        get_namespace(secured.target, "b", READER)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Over TCP there is no descriptor to pass: the client says what to do.
    got = fetch_for("127.0.0.1:1", get_namespace(secured.target, "a", READER), READER)
    assert isinstance(got, PoolError) and "unix socket" in got.details
    # Expired: the first ticket, once its TTL has passed.
    wait_until(time.monotonic, lambda now: now > issued + TTL_S + 0.1, timeout=TTL_S + 5, what="the TTL")
    status, text, _ = ask(str(path), wire.encode_request(early, READER))
    assert status == wire.REFUSED and "expired" in text


def test_garbage_on_the_pool_socket_is_refused_and_the_daemon_serves_on(daemon) -> None:
    path = str(daemon.socket_path) + wire.SUFFIX
    assert os.stat(path).st_mode & 0o777 == 0o600
    header = wire.MAGIC + bytes([wire.VERSION])
    for data, why in (
        (b"GET / HTTP/1.1\r\n\r\n", "not a version-1 pool socket request"),
        (b"KVPF\x07" + bytes(40), "not a version-1 pool socket request"),
        (header + b"\xff\xff" + bytes(32), "token_len=65535 is over 4096"),
        (header + bytes(2) + os.urandom(32), "unknown ticket"),
        (header + b"\x04\x00" + bytes(32) + b"\xff\xfe\xfd\xfc", "the token is not UTF-8"),
        (header + bytes(10), "the connection closed after 15 bytes"),
        (b"", "the connection closed after 0 bytes"),
    ):
        status, text, fds = ask(path, data)
        assert (status, fds) == (wire.REFUSED, []) and why in text, (data, text)
    # Too slow: refused after the read timeout, not held open.
    status, text, _ = ask(path, header, close_write=False)
    assert status == wire.REFUSED and "no whole request within" in text
    # Many at once: the daemon reads a bounded number, closes the rest, and serves on.
    idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(100)]
    for s in idle:
        s.connect(path)
    for s in idle:
        s.close()
    wait_until(lambda: _answered(path), bool, timeout=10, what="the pool socket answering again")
    with kvstore_client.connect(daemon.target) as kv:  # no tokens file: trusted, read-write
        ns = kv.namespace("test")
        assert ns.pool.writable
        with kv.allocate(ns) as seq:
            res = seq.append(TOKEN_IDS[:8])
            for view in seq.views(res.writable_pages):
                view.view(-1).view(dtype=torch.uint8).fill_(0x3C)
            seq.commit()
        with kv.lookup(ns, TOKEN_IDS[:8], pin=True) as hit:
            assert hit.hit_tokens == 8
            assert {int(b) for v in hit.views() for b in v.contiguous().view(-1).numpy().view("u1")} == {0x3C}
    assert "Traceback" not in daemon.stderr_text()
    assert daemon.proc.poll() is None and daemon.shm_segments() == []


def _answered(path: str) -> bool:
    try:
        return ask(path, b"")[0] == wire.REFUSED
    except (OSError, ValueError):
        return False  # closed unanswered: still busy


# Root passes every /proc check by CAP_SYS_PTRACE: drop it from the daemon and the prober, so
# that they are two plain processes of the same user, as in production.
DROP = ["setpriv", "--bounding-set=-sys_ptrace", "--inh-caps=-sys_ptrace"] if os.getuid() == 0 else []
PROBE = r"""
import os, sys
pid = int(sys.argv[1])
try:
    fds = os.listdir(f"/proc/{pid}/fd")
    memfds = [n for n in fds if os.readlink(f"/proc/{pid}/fd/{n}").startswith("/memfd:")]
    fd = os.open(f"/proc/{pid}/fd/{memfds[0]}", os.O_RDWR)
    print("opened", os.readlink(f"/proc/self/fd/{fd}"))
except OSError as e:
    print("fd", type(e).__name__)
try:
    open(f"/proc/{pid}/mem", "rb")
    print("mem opened")
except OSError as e:
    print("mem", type(e).__name__)
"""


@pytest.mark.skipif(
    DROP and not shutil.which("setpriv"), reason="as root, needs setpriv to drop CAP_SYS_PTRACE"
)
@pytest.mark.parametrize("dumpable", [False, True])
def test_the_daemon_is_not_dumpable_so_its_pools_are_not_in_proc(daemon_factory, dumpable) -> None:
    d = daemon_factory(server={"dumpable": dumpable}, wrapper=DROP).start()
    probe = subprocess.run(
        [*DROP, sys.executable, "-c", PROBE, str(d.proc.pid)], capture_output=True, text=True, timeout=60
    )
    if dumpable:  # what it guards: any process of the user reads the pool read-write
        assert probe.stdout.startswith("opened /memfd:") and "mem opened" in probe.stdout, probe
        assert "server.dumpable=true" in d.stderr_text()
    else:
        assert probe.stdout.split("\n")[:2] == ["fd PermissionError", "mem PermissionError"], probe
