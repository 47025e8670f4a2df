"""kvstore_client without the daemon: pool mappings over real memfds,
error mapping through a real gRPC server, target resolution, token conversion,
the client-side page table, and the lease held by the KeepAlive stream."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from concurrent import futures
from dataclasses import fields
from pathlib import Path

import grpc
import kvstore_client
import numpy as np
import pytest
import torch
from kvstore_client import PageState, PoolMapping, _tokens, _wire, errors
from kvstore_client._core import SequenceBase
from kvstore_client.namespace import Namespace
from kvstore_client.pool_fd import PoolFd
from kvstore_client.target import ConfigFileError, default_target, resolve_target
from kvstore_proto import dtypes
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb
from kvstore_proto.kvstore.v1 import kvstore_pb2_grpc as pb_grpc

PAGE_SHAPE = (2, 2, 4, 3, 8)  # layer, kv, token, head, dim
NUM_PAGES = 5


def make_descriptor(
    _fd: int, dtype: int = pb.FLOAT16, shape=PAGE_SHAPE, offset: int = 4096
) -> pb.PoolDescriptor:
    page_bytes = int(np.prod(shape)) * torch.empty((), dtype=kvstore_client.torch_dtype(dtype)).element_size()
    stride = -(-page_bytes // 4096) * 4096
    return pb.PoolDescriptor(
        device="cpu",
        offset=offset,
        nbytes=offset + NUM_PAGES * stride,
        num_pages=NUM_PAGES,
        page_bytes=page_bytes,
        page_stride=stride,
        layout="layer,kv,token,head,dim",
        page_shape=shape,
        dtype=dtype,
    )


@pytest.fixture
def shm_file() -> Iterator[int]:
    """A fresh memfd (the daemon's, in real life), closed afterwards."""
    fd = os.memfd_create(f"kvstore-client-test-{uuid.uuid4().hex[:8]}", os.MFD_CLOEXEC)
    yield fd
    os.close(fd)


def create_pool(fd: int, desc: pb.PoolDescriptor) -> None:
    os.ftruncate(fd, desc.nbytes)


def given(fd: int) -> PoolFd:
    """The descriptor as the pool socket hands it over (read-write); not owned (not closed)."""
    return PoolFd(fd, True, 0, os.fstat(fd).st_size)


def read_file(fd: int, offset: int, n: int) -> bytes:
    return os.pread(fd, n, offset)


# ---------------------------------------------------------------- PoolMapping


def test_page_views_write_the_shared_file_in_place(shm_file: int) -> None:
    desc = make_descriptor(shm_file)
    create_pool(shm_file, desc)
    with PoolMapping.open(desc, given(shm_file)) as pool:
        page = pool.page(2)
        assert page.shape == PAGE_SHAPE and page.dtype == torch.float16
        page.copy_(torch.arange(page.numel(), dtype=torch.float16).view(PAGE_SHAPE))
        # No copy: the bytes are in the file, at offset + slot * stride, and nowhere else.
        start = desc.offset + 2 * desc.page_stride
        assert read_file(shm_file, start, desc.page_bytes) == page.numpy().tobytes()
        assert read_file(shm_file, start - desc.page_stride, desc.page_stride) == bytes(desc.page_stride)
        assert read_file(shm_file, start + desc.page_bytes, desc.page_stride - desc.page_bytes) == bytes(
            desc.page_stride - desc.page_bytes
        )
        assert pool.page(2).data_ptr() == page.data_ptr()


def test_two_mappings_see_each_others_writes(shm_file: int) -> None:
    desc = make_descriptor(shm_file, dtype=pb.BFLOAT16)
    create_pool(shm_file, desc)
    with PoolMapping.open(desc, given(shm_file)) as a, PoolMapping.open(desc, given(shm_file)) as b:
        a.page(4).fill_(1.5)
        assert torch.equal(b.page(4), torch.full(PAGE_SHAPE, 1.5, dtype=torch.bfloat16))
        b.raw_page(0)[:3] = torch.tensor([7, 8, 9], dtype=torch.uint8)
        assert a.raw_page(0)[:3].tolist() == [7, 8, 9]


def test_another_process_reads_and_writes_the_same_pages(shm_file: int) -> None:
    desc = make_descriptor(shm_file, dtype=pb.FLOAT32)
    create_pool(shm_file, desc)
    child = textwrap.dedent(
        """
        import sys, torch
        from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb
        from kvstore_client import PoolMapping
        from kvstore_client.pool_fd import PoolFd
        desc = pb.PoolDescriptor.FromString(bytes.fromhex(sys.argv[1]))
        pool = PoolMapping.open(desc, PoolFd(int(sys.argv[2]), True, 0, desc.nbytes))
        print(float(pool.page(1).sum()))
        pool.page(3).fill_(-2.0)
        pool.close()
        """
    )
    with PoolMapping.open(desc, given(shm_file)) as pool:
        pool.page(1).fill_(0.25)
        out = subprocess.run(
            [sys.executable, "-c", child, desc.SerializeToString().hex(), str(shm_file)],
            pass_fds=[shm_file],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        assert float(out.stdout) == pytest.approx(0.25 * np.prod(PAGE_SHAPE))
        assert torch.equal(pool.page(3), torch.full(PAGE_SHAPE, -2.0))


def test_whole_pool_view_skips_the_padding_between_pages(shm_file: int) -> None:
    desc = make_descriptor(shm_file)
    assert desc.page_stride > desc.page_bytes
    create_pool(shm_file, desc)
    with PoolMapping.open(desc, given(shm_file)) as pool:
        whole = pool.view()
        assert whole.shape == (NUM_PAGES, *PAGE_SHAPE)
        for slot in range(NUM_PAGES):
            whole[slot].fill_(slot + 1)
        for slot, page in zip([3, 0, 4], pool.pages([3, 0, 4]), strict=True):
            assert torch.equal(page, torch.full(PAGE_SHAPE, slot + 1.0, dtype=torch.float16))
        padding = read_file(shm_file, desc.offset + desc.page_bytes, desc.page_stride - desc.page_bytes)
        assert padding == bytes(len(padding))


@pytest.mark.parametrize(
    ("dtype", "torch_dtype"),
    [
        (pb.FLOAT16, torch.float16),
        (pb.BFLOAT16, torch.bfloat16),
        (pb.FLOAT32, torch.float32),
        (pb.INT8, torch.int8),
        (pb.UINT8, torch.uint8),
        (pb.FLOAT8_E4M3, torch.float8_e4m3fn),
    ],
)
def test_every_wire_dtype_maps_to_its_torch_dtype(
    shm_file: int, dtype: int, torch_dtype: torch.dtype
) -> None:
    desc = make_descriptor(shm_file, dtype=dtype, shape=(1, 2, 3, 1, 5), offset=0)
    create_pool(shm_file, desc)
    with PoolMapping.open(desc, given(shm_file)) as pool:
        assert pool.page(NUM_PAGES - 1).dtype == torch_dtype
        assert pool.view().shape == (NUM_PAGES, 1, 2, 3, 1, 5)
    assert kvstore_client.wire_dtype(torch_dtype) == dtype
    assert kvstore_client.wire_dtype(pb.DType.Name(dtype)) == dtype


def test_the_dtype_table_covers_the_wire_enum_and_matches_torch() -> None:
    """kvstore_proto.dtypes is the one table (daemon, config, client, adapter): a DType added
    to the proto without its row, or a row whose size or name torch disagrees with, fails here."""
    assert set(dtypes.BY_WIRE) == set(pb.DType.values()) - {pb.DTYPE_UNSPECIFIED}
    for d in dtypes.DTYPES:
        assert getattr(torch, d.name).itemsize == d.itemsize, d
        assert kvstore_client.torch_dtype(d.wire) == getattr(torch, d.name)
        assert kvstore_client.dtype_name(d.wire) == d.name and kvstore_client.wire_dtype(d.name) == d.wire


def test_close_with_live_views_keeps_them_valid_and_refuses_new_ones(shm_file: int) -> None:
    desc = make_descriptor(shm_file)
    create_pool(shm_file, desc)
    pool = PoolMapping.open(desc, given(shm_file))
    page = pool.page(1)
    page.fill_(3.0)
    pool.close()  # mmap.close() raises BufferError under a live view: must not escape
    assert pool.closed
    assert torch.equal(page, torch.full(PAGE_SHAPE, 3.0, dtype=torch.float16))
    with pytest.raises(errors.PoolError, match="closed"):
        pool.page(1)
    pool.close()  # idempotent


def test_slot_outside_the_pool_is_refused(shm_file: int) -> None:
    desc = make_descriptor(shm_file)
    create_pool(shm_file, desc)
    with (
        PoolMapping.open(desc, given(shm_file)) as pool,
        pytest.raises(errors.InvalidArgument, match=f"num_pages={NUM_PAGES}"),
    ):
        pool.page(NUM_PAGES)


def test_bad_descriptors_fail_clearly(shm_file: int) -> None:
    desc = make_descriptor(shm_file)
    with pytest.raises(errors.PoolError, match="the pool has 0 bytes"):
        PoolMapping.open(desc, given(shm_file))
    create_pool(shm_file, desc)
    wrong = pb.PoolDescriptor()
    wrong.CopyFrom(desc)
    wrong.page_bytes += 2
    with pytest.raises(errors.PoolError, match="page_bytes"):
        PoolMapping.open(wrong, given(shm_file))
    cuda = pb.PoolDescriptor(device="cuda:GPU-0000", ipc_handle=b"\0" * 64, dtype=pb.FLOAT16)
    with pytest.raises(NotImplementedError, match="CUDA"):
        PoolMapping.open(cuda, given(shm_file))
    with pytest.raises(errors.UnsupportedDevice):
        PoolMapping.open(cuda, given(shm_file))


# ---------------------------------------------------------------- targets and tokens


def test_default_target_follows_the_environment() -> None:
    assert default_target({"KVSTORE_SOCKET": "/run/kv.sock", "XDG_RUNTIME_DIR": "/x"}) == "unix:/run/kv.sock"
    assert default_target({"XDG_RUNTIME_DIR": "/run/user/7"}) == "unix:/run/user/7/kvstore/kvstore.sock"
    assert default_target({}) == f"unix:/tmp/kvstore-{os.getuid()}/kvstore.sock"


def test_default_target_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSTORE_SOCKET", "/srv/kvstore.sock")
    assert kvstore_client.default_target() == "unix:/srv/kvstore.sock"
    assert resolve_target(None) == "unix:/srv/kvstore.sock"
    monkeypatch.delenv("KVSTORE_SOCKET")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1234")
    assert resolve_target(None) == "unix:/run/user/1234/kvstore/kvstore.sock"


def test_default_target_reads_the_daemons_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "kvstore.toml"
    config.write_text('[server]\nsocket = "/srv/from-config.sock"\n')
    monkeypatch.delenv("KVSTORE_SOCKET", raising=False)
    monkeypatch.setenv("KVSTORE_CONFIG", str(config))
    assert resolve_target(None) == "unix:/srv/from-config.sock"
    monkeypatch.setenv("KVSTORE_SOCKET", "/srv/from-env.sock")  # the environment wins, as in the daemon
    assert resolve_target(None) == "unix:/srv/from-env.sock"
    assert (
        resolve_target("/srv/given.sock") == "unix:/srv/given.sock"
    )  # and an explicit target wins over both
    monkeypatch.delenv("KVSTORE_SOCKET")
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    config.write_text("[server]\nlease_ttl_s = 5\n")  # no socket in it: the default
    assert resolve_target(None) == f"unix:/tmp/kvstore-{os.getuid()}/kvstore.sock"
    for text, problem in (
        ("[server\n", "invalid TOML"),
        ("[server]\nsocket = 3\n", "server.socket=3: must be a string"),
    ):
        config.write_text(text)
        with pytest.raises(ConfigFileError, match=problem):
            resolve_target(None)
    config.write_bytes(b"[server]\nsocket = '/srv/\xe9.sock'\n")  # Latin-1, not UTF-8
    with pytest.raises(ConfigFileError, match=r"kvstore.toml: not UTF-8 text \(byte 0xe9 at offset 24\)"):
        resolve_target(None)


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (kvstore_client.Stats, pb.StatsResponse),
        (kvstore_client.NamespaceStats, pb.NamespaceStats),
        (kvstore_client.TierStats, pb.TierStats),
        (kvstore_client.BuildInfo, pb.BuildInfo),
        (kvstore_client.RpcCalls, pb.RpcCalls),
    ],
)
def test_stats_results_carry_every_field_of_their_message(result: type, message: type) -> None:
    # A field added to the proto must reach `Client.stats()` users too.
    assert [f.name for f in fields(result)] == [f.name for f in message.DESCRIPTOR.fields]


def test_stats_reply_becomes_typed_results() -> None:
    reply = pb.StatsResponse(sessions=2, uptime_s=1.5, version="9.9")
    reply.namespaces.add(name="a", pages_total=8, hit_tokens=3, miss_tokens=1, policy="lru")
    stats = _wire.stats("").convert(reply)
    assert isinstance(stats, kvstore_client.Stats) and stats.tiers is None
    (ns,) = stats.namespaces
    assert (ns.name, ns.pages_total, ns.policy, ns.hit_rate) == ("a", 8, "lru", 0.75)
    reply.tiers.disk_pages = 5
    reply.tiers.write_through = True
    tiers = _wire.stats("").convert(reply).tiers
    assert tiers is not None and (tiers.disk_pages, tiers.write_through, tiers.host_pages) == (5, True, 0)


def test_resolve_target_turns_paths_into_unix_targets() -> None:
    assert resolve_target("/tmp/a.sock") == "unix:/tmp/a.sock"
    assert resolve_target("localhost:50051") == "localhost:50051"
    assert resolve_target("unix:/x.sock") == "unix:/x.sock"


def test_tokens_accept_lists_numpy_and_torch() -> None:
    want = [1, 2, 3, 2**31 - 1]
    for tokens in (want, np.array(want, dtype=np.int64), torch.tensor(want, dtype=torch.int32)):
        req = pb.AppendRequest()
        _wire.set_tokens(req.token_ids, tokens)
        assert list(req.token_ids) == want
    for bad in (torch.ones(3), torch.ones(2, 2, dtype=torch.long), np.ones(3), [1.5], [2**31]):
        with pytest.raises(errors.InvalidArgument, match="token_ids"):
            _wire.set_tokens(pb.AppendRequest().token_ids, bad)


def test_token_ids_go_packed_when_they_pack() -> None:
    want = [0, 1, 7, 2**31 - 1]
    as_u32 = np.array(want, dtype="<u4").tobytes()
    for tokens in (
        want,
        tuple(want),
        iter(want),
        np.array(want, dtype=np.int64),
        np.array(want, dtype=np.uint32),
        torch.tensor(want, dtype=torch.int64),
    ):
        req = pb.LookupRequest()
        _tokens.fill_tokens(req, tokens)
        assert (list(req.token_ids), req.token_ids_u32) == ([], as_u32), type(tokens)
        assert _tokens.token_count(req) == len(want)
    # What does not pack takes the repeated field: the daemon names a negative id, as before.
    for tokens in ([3, -1], np.array([3, -1]), iter([3, -1])):
        req = pb.LookupRequest()
        _tokens.fill_tokens(req, tokens)
        assert (list(req.token_ids), req.token_ids_u32) == ([3, -1], b"")
    for bad in ([1.5], ["3"], [2**31], np.ones(3), torch.ones(3), np.ones((2, 2), dtype=np.int32)):
        with pytest.raises(errors.InvalidArgument, match="token_ids"):
            _tokens.fill_tokens(pb.LookupRequest(), bad)
    # A list's range is checked by builtin max() when short, numpy's when long: the same answer.
    for n in (16, _tokens._SHORT, _tokens._SHORT + 1, 1000):
        ids = [(i * 7919) % 50000 for i in range(n)]
        assert _tokens.pack_tokens(ids) == np.array(ids, dtype="<u4").tobytes()
        assert _tokens.pack_tokens([*ids[:-1], 2**31 - 1]) is not None
        assert _tokens.pack_tokens([*ids[:-1], 2**31]) is None


def test_torch_is_imported_only_when_needed() -> None:
    # Importing torch takes over a second; `kvstore-admin` and anything that maps no pool skip it.
    client = """
        import kvstore_client, kvstore_client.aio, sys
        import numpy as np
        from kvstore_client import PoolMapping, torch_dtype, wire_dtype
        spec = kvstore_client.namespace_spec(
            "ns", num_layers=2, num_kv_heads=2, head_dim=8, dtype="bf16", page_tokens=4, num_pages=5
        )
        assert spec.geometry.dtype == wire_dtype("bfloat16") == wire_dtype("BFLOAT16")
        req = kvstore_client._wire.pb.AppendRequest()
        kvstore_client._wire.set_tokens(req.token_ids, np.arange(3))
        kvstore_client._wire.set_tokens(req.token_ids, [3, 4])
        assert list(req.token_ids) == [0, 1, 2, 3, 4]
        assert "torch" not in sys.modules, "kvstore_client imported torch"
        assert str(torch_dtype(spec.geometry.dtype)) == "torch.bfloat16"  # now it may
    """
    admin = """
        import sys
        import kvstore_client.cli.admin
        assert "torch" not in sys.modules, "kvstore_client.cli.admin imported torch"
    """
    for code in (client, admin):
        out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr


def test_evict_needs_exactly_one_target() -> None:
    assert _wire.evict("ns", all=True).request.all
    assert list(_wire.evict("ns", prefix=[1, 2], extra_keys=b"lora").request.prefix.token_ids) == [1, 2]
    assert _wire.evict("ns", nbytes=10).request.WhichOneof("target") == "bytes"
    with pytest.raises(errors.InvalidArgument, match="exactly one"):
        _wire.evict("ns", all=True, nbytes=1)
    with pytest.raises(errors.InvalidArgument, match="exactly one"):
        _wire.evict("ns")


# ---------------------------------------------------------------- the page table


def _ref(index: int, slot: int, state: int, start: int, count: int, h: bytes = b"") -> pb.PageRef:
    return pb.PageRef(index=index, slot=slot, state=state, token_start=start, token_count=count, block_hash=h)


def test_page_table_follows_append_and_commit_replies() -> None:
    info = pb.NamespaceInfo(name="m", geometry=pb.Geometry(page_tokens=4, dtype=pb.FLOAT16))
    seq = SequenceBase(None, Namespace(info), sequence_id=9, reserved_pages=0)
    first = seq._apply_append(
        pb.AppendResponse(
            num_tokens=6,
            cached_tokens=4,
            pages=[_ref(0, 10, pb.CACHED, 0, 4, b"a" * 16), _ref(1, 11, pb.WRITABLE, 0, 2)],
        )
    )
    assert [p.slot for p in first.writable_pages] == [11] and first.cached_tokens == 4
    seq._apply_append(
        pb.AppendResponse(num_tokens=9, pages=[_ref(1, 11, pb.WRITABLE, 2, 2), _ref(2, 12, 1, 0, 1)])
    )
    assert seq.num_tokens == 9 and seq.slots == [10, 11, 12]
    assert [(p.token_start, p.token_count) for p in seq.pages] == [(0, 4), (0, 4), (0, 1)]
    # Page 1 turned out to be sealed by someone else first: it moved to slot 3.
    result = seq._apply_commit(
        pb.CommitResponse(sealed_pages=1, deduplicated_pages=1, pages=[_ref(1, 3, pb.CACHED, 0, 4)]), 9
    )
    assert result.deduplicated_pages == 1 and seq.slots == [10, 3, 12]
    assert [p.state for p in seq.pages] == [PageState.CACHED, PageState.CACHED, PageState.WRITABLE]
    assert seq.committed_tokens == 9 and seq.pages[1].token_count == 4


# ---------------------------------------------------------------- against a real gRPC server


class FakeDaemon(pb_grpc.KVStoreServicer):
    """Just enough of the wire contract to exercise the client's transport: sessions,
    the KeepAlive stream, and GetNamespace answering with the status named by the
    namespace (so every code reaches the client through real gRPC)."""

    def __init__(self) -> None:
        self.attached = threading.Event()
        self.detached = threading.Event()
        self.closed_sessions: list[int] = []

    def OpenSession(self, request, context):
        return pb.OpenSessionResponse(session_id=41, lease_ttl_ms=request.lease_ttl_ms or 10_000)

    def KeepAlive(self, request, context):
        context.add_callback(self.detached.set)
        self.attached.set()
        yield pb.KeepAliveEvent(session_id=request.session_id, lease_expires_unix_ms=123)
        self.detached.wait()

    def CloseSession(self, request, context):
        self.closed_sessions.append(request.session_id)
        return pb.CloseSessionResponse(sequences_released=2, pins_released=1)

    def GetNamespace(self, request, context):
        code = getattr(grpc.StatusCode, request.namespace, None)
        if code is not None:
            context.abort(code, f"namespace={request.namespace!r}: told to fail")
        return pb.NamespaceInfo(name=request.namespace, geometry=pb.Geometry(page_tokens=16))


@pytest.fixture
def fake_daemon(tmp_path) -> Iterator[tuple[str, FakeDaemon]]:
    servicer = FakeDaemon()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_KVStoreServicer_to_server(servicer, server)
    sock = str(tmp_path / "kv.sock")
    server.add_insecure_port(f"unix:{sock}")
    server.start()
    yield sock, servicer
    server.stop(grace=None)


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("NOT_FOUND", errors.NotFound),
        ("INVALID_ARGUMENT", errors.InvalidArgument),
        ("OUT_OF_RANGE", errors.OutOfRange),
        ("RESOURCE_EXHAUSTED", errors.ResourceExhausted),
        ("FAILED_PRECONDITION", errors.FailedPrecondition),
        ("PERMISSION_DENIED", errors.PermissionDenied),
        ("UNAUTHENTICATED", errors.PermissionDenied),
        ("ALREADY_EXISTS", errors.AlreadyExists),
        ("INTERNAL", errors.KVStoreClientError),
    ],
)
def test_status_codes_become_typed_errors(fake_daemon, code: str, cls: type) -> None:
    sock, _ = fake_daemon
    with kvstore_client.connect(sock) as kv, pytest.raises(cls) as info:
        kv.namespace(code)
    assert info.value.code == getattr(grpc.StatusCode, code)
    assert info.value.details == f"namespace={code!r}: told to fail"
    assert str(info.value) == f"{code}: namespace={code!r}: told to fail"


async def test_aio_client_maps_errors_and_holds_the_lease(fake_daemon) -> None:
    sock, daemon = fake_daemon
    async with kvstore_client.aio.connect(sock, client_name="aio-test") as kv:
        assert daemon.attached.is_set()  # connect returns once the daemon holds the stream
        assert kv.session_id == 41 and kv.alive
        with pytest.raises(errors.ResourceExhausted, match="RESOURCE_EXHAUSTED: namespace="):
            await kv.namespace("RESOURCE_EXHAUSTED")
        assert (await kv.namespace("m")).page_tokens == 16
    assert daemon.closed_sessions == [41]
    assert await asyncio.to_thread(daemon.detached.wait, 10)


def test_close_closes_the_session_then_drops_the_stream(fake_daemon) -> None:
    sock, daemon = fake_daemon
    kv = kvstore_client.connect(sock, lease_ttl_s=2.5)
    assert daemon.attached.is_set()  # connect returns once the daemon holds the stream
    assert kv.lease_ttl_s == 2.5 and kv.lease_expires_unix_ms == 123
    assert kv.namespace("m") is kv.namespace("m")
    assert kv.close() == kvstore_client.CloseResult(2, 1)
    assert daemon.closed_sessions == [41]
    assert daemon.detached.wait(10)
    assert kv.close() is None
    with pytest.raises(errors.KVStoreClientError, match="closed"):
        kv.namespace("other")


def test_the_lease_ends_when_the_client_process_dies(fake_daemon) -> None:
    sock, daemon = fake_daemon
    child = f"import kvstore_client, sys, time\nkv = kvstore_client.connect({sock!r})\nprint('up', flush=True)\ntime.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        assert daemon.attached.wait(10)
        assert not daemon.detached.is_set()
        proc.send_signal(signal.SIGKILL)
        assert daemon.detached.wait(10), "the KeepAlive stream must break when the client dies"
        assert daemon.closed_sessions == []
    finally:
        proc.kill()
        proc.wait()


def test_the_client_notices_a_lost_lease(fake_daemon) -> None:
    sock, daemon = fake_daemon
    with kvstore_client.connect(sock) as kv:
        assert daemon.attached.wait(10)
        daemon.detached.set()  # the daemon ends the stream
        kv._keepalive_thread.join(10)
        assert not kv.alive
        with pytest.raises(errors.SessionLost, match="KeepAlive stream ended"):
            kv.namespace("m")


def test_no_daemon_is_unavailable(tmp_path) -> None:
    with pytest.raises(errors.Unavailable, match="no kvstore daemon answered"):
        kvstore_client.connect(tmp_path / "nobody.sock", connect_timeout_s=0.3)


def test_copy_runs_of_consecutive_slots_are_one_run_and_others_split() -> None:
    from kvstore_client._copy import runs

    assert runs(range(2, 6), [10, 11, 12, 13]) == [[2, 10, 4]]
    assert runs(range(0, 4), [10, 11, 13, 14]) == [[0, 10, 2], [2, 13, 2]]
    assert runs(range(0, 3), [12, 11, 10]) == [[0, 12, 1], [1, 11, 1], [2, 10, 1]]
    assert runs([0, 2, 3], [5, 6, 7]) == [[0, 5, 1], [2, 6, 2]]
    assert runs(range(0, 0), []) == []
