"""The daemon's lifecycle: start in order, serve until SIGTERM or SIGINT, then stop in order
with a bound on every step (health NOT_SERVING, drain RPCs, stop background tasks, close the
store and its pools, remove the sockets, give back the lock).

Startup order: claim the socket path, build the store and its namespaces, start the gRPC
server and the pool socket beside it, and only then report SERVING on the health service,
which is what clients and tests wait for. The process is made non-dumpable first
(kvstore/server/hardening.py): other processes of the user cannot read its memory or its
descriptors, the pools' included.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import signal
import time
from pathlib import Path

import grpc
import lmdb
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from kvstore_proto.kvstore.v1 import kvstore_pb2, kvstore_pb2_grpc

from kvstore.config import Config, ServerConfig, format_size
from kvstore.errors import InvariantBroken, KVStoreError, StartupError
from kvstore.server import socket_path
from kvstore.server.admin_servicer import AdminServicer
from kvstore.server.edge import Edge
from kvstore.server.hardening import no_dumps
from kvstore.server.kvstore_servicer import KVStoreServicer
from kvstore.server.lane import Lane, lane_socket_path
from kvstore.server.leases import LoopClock, reap_leases
from kvstore.server.listeners import bind_tcp, guard_for
from kvstore.server.metrics import MetricsServer
from kvstore.server.pool_socket import PoolSocket, pool_socket_path
from kvstore.server.pool_tickets import PoolTickets
from kvstore.server.shutdown import close_store, device_pools_unmapped, step
from kvstore.store.integrity import Integrity, IntegrityConfig
from kvstore.store.store import Store
from kvstore.store.tiering.reindex import reindex_disk
from kvstore.store.tiering.tiers import Tiers
from kvstore.tiers import DiskTier, HostTier, PageKey

log = logging.getLogger(__name__)

SERVICE_NAMES = tuple(s.full_name for s in kvstore_pb2.DESCRIPTOR.services_by_name.values())
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
MAX_MESSAGE_BYTES = 64 << 20
STEP_TIMEOUT_S = 5.0  # bound on each shutdown step beyond the RPC grace
__all__ = ["Daemon", "StartupError", "run", "serve"]


def server_options(s: ServerConfig) -> list[tuple[str, int]]:
    # Room for a request of max_request_tokens ids (a positive int32 is at most 5 varint bytes).
    max_message = max(MAX_MESSAGE_BYTES, 5 * s.max_request_tokens + (1 << 20))
    return [
        ("grpc.max_receive_message_length", max_message),
        ("grpc.max_send_message_length", max_message),
        # gRPC sets SO_REUSEPORT by default: a second daemon would then share our TCP port silently.
        ("grpc.so_reuseport", 0),
        # Ping idle connections, so a peer that vanished without a FIN (host down, cable pulled)
        # is noticed and its KeepAlive stream ends, which releases its lease.
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.ping_timeout_ms", 10_000),  # the keepalive timeout is not enough alone
        ("grpc.keepalive_permit_without_calls", 1),
        # Accept clients' own keepalive pings (the default would answer them with GOAWAY).
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),  # (the "recv" spelling is no arg)
        ("grpc.http2.max_pings_without_data", 0),
    ]


def freeze_startup_heap() -> None:
    """Take what start built (the pools' page tables, the index, the servicers, every module)
    out of Python's cyclic GC: it lives as long as the daemon, and each full collection walked
    all of it, stalling every call on the loop (a 32,768-page pool under `kvstore-bench rpc`:
    the longest 24.7 ms; frozen, 0.42 ms). Run once, before the first call: anything frozen
    is never collected, so garbage made before it is collected first."""
    gc.collect()
    gc.freeze()
    log.info("froze %d objects built at start (Python's full collections skip them)", gc.get_freeze_count())


class Daemon:
    """One daemon instance. `start()` then `stop()`; both run on the event loop."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store: Store | None = None  # loop-owned; None until built and after close
        self.server: grpc.aio.Server | None = None
        self.health: health_aio.HealthServicer | None = None
        self.tcp_port = 0  # the bound TCP port when server.tcp is set (useful with port 0)
        self._lock_fd = -1  # flock on <socket>.lock, held for the daemon's whole life
        self._socket_ino = 0  # inode of the socket we bound, so we only ever unlink our own
        self._tasks: list[asyncio.Task[None]] = []
        self._kvstore_servicer: KVStoreServicer | None = None
        self.edge = Edge()  # every call passes it: malformed requests, INTERNAL, shutdown
        self.clock = LoopClock()  # the store's: leaves out the loop's stalls (leases.py)
        self.metrics: MetricsServer | None = None
        self.integrity: Integrity | None = None  # checksums, scrubber, zeroing freed pages
        self.pool_socket: PoolSocket | None = None
        self.lane: Lane | None = None  # the put/get calls on a plain unix socket (server/lane.py)

    @property
    def socket_path(self) -> Path:
        return Path(self.config.server.socket)

    async def start(self, stop: asyncio.Event | None = None) -> None:
        """Bring everything up. Returns early, not serving, if `stop` is set meanwhile; on an
        error undoes what it did and raises StartupError."""
        t0 = time.monotonic()
        try:
            if not await self._start(stop or asyncio.Event()):
                log.info("startup interrupted by a stop request")
                return
        except BaseException:
            await self.stop()
            raise
        total = sum(ns.page_stride * ns.num_pages for ns in self.config.namespace_specs())
        tcp = f" and tcp port {self.tcp_port}" if self.config.server.tcp else ""
        log.info(
            "ready: serving on unix:%s%s, %d namespace(s), %s of pools, started in %.2fs",
            self.socket_path,
            tcp,
            len(self.config.namespaces),
            format_size(total),
            time.monotonic() - t0,
        )

    async def _start(self, stop: asyncio.Event) -> bool:
        s = self.config.server
        settings = " ".join(f"{k}={v}" for k, v in dataclasses.asdict(s).items())
        log.info("config from %s: %s", self.config.config_file or "defaults/env/flags", settings)
        grpc_experiments = os.environ.get("GRPC_EXPERIMENTS", "")
        if grpc_experiments != s.grpc_experiments:  # (`kvstore serve` sets it from the key)
            log.warning(
                "gRPC runs with GRPC_EXPERIMENTS=%r as this process's environment has it, not "
                "server.grpc_experiments=%r (`kvstore serve` applies the key where the environment names none)",
                grpc_experiments,
                s.grpc_experiments,
            )
        self._lock_fd = socket_path.claim(self.socket_path)
        loop = asyncio.get_running_loop()
        self.store = Store(
            self.config.store_limits(), s.shm_prefix, clock=self.clock, tiers=await self._open_tiers(s)
        )
        store = self.store
        checks = IntegrityConfig(
            s.page_checksums,
            s.scrub_bytes_per_s,
            s.zero_freed_pages,
            s.unzeroed_credits,
            s.zero_freed_after_s,
        )
        self.integrity = Integrity(checks, lambda: store.sessions)
        store.attach = self.integrity.attach
        for spec in self.config.namespace_specs():
            try:
                self.store.check_new_namespace(spec)
                # Backing a pool touches every page (seconds per GiB): in a thread, so a SIGTERM
                # meanwhile is still heard, and stops the start after this namespace.
                pool = await loop.run_in_executor(None, self.store.create_pool, spec)
                self.store.add_namespace(spec, pool)
            except KVStoreError as e:
                raise StartupError(f"namespace {spec.name!r}: {e}", exit_code=2) from e
            except OSError as e:
                raise StartupError(f"namespace {spec.name!r}: cannot create its pool: {e}") from e
            if stop.is_set():
                return False

        self.server = server = grpc.aio.server(options=server_options(s))
        # Every service registers with the edge, which wraps each method once and installs them.
        edge = self.edge
        guard = guard_for(s, self.store)
        edge.guard = guard.wrap if guard is not None else None
        tickets = PoolTickets(guard.grant) if guard is not None else PoolTickets()
        self._kvstore_servicer = KVStoreServicer(self.store, edge.counts, edge.rpc, tickets)
        kvstore_pb2_grpc.add_KVStoreServicer_to_server(self._kvstore_servicer, edge)
        admin = AdminServicer(self.store, s.default_policy, tickets)
        kvstore_pb2_grpc.add_AdminServicer_to_server(admin, edge)
        self.health = health_aio.HealthServicer()
        for name in ("", *SERVICE_NAMES):  # the servicer starts out claiming "" is SERVING
            await self.health.set(name, NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, edge)
        reflected = (
            *SERVICE_NAMES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        # (reflection.enable_server_reflection picks its asyncio servicer only for a grpc.aio server)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(reflected), edge
        )
        edge.install(server)
        self._bind(server)
        self.pool_socket = PoolSocket(
            pool_socket_path(self.socket_path),
            tickets,
            self.store,
            guard.tokens if guard else None,
            edge.counts.pool,
        )
        self.pool_socket.start()
        if s.lane:
            max_message = dict(server_options(s))["grpc.max_receive_message_length"]
            self.lane = Lane(
                lane_socket_path(self.socket_path), edge, max_message, s.lane_follow_up_timeout_s
            )
            await self.lane.start()
        freeze_startup_heap()
        await server.start()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, SERVING)
        self._tasks.append(asyncio.create_task(reap_leases(self.store, self.clock), name="reap-leases"))
        self._tasks.append(
            asyncio.create_task(self.integrity.run(lambda: store.namespaces), name="integrity")
        )
        if self.store.tiers is not None and self.store.tiers.disk is not None:
            self._tasks.append(asyncio.create_task(self._reindex_disk(), name="reindex-disk"))
        if s.metrics:
            host, _, port = s.metrics.rpartition(":")
            self.metrics = MetricsServer(
                self.store,
                host,
                int(port),
                edge=self.edge.counts,
                rpc=self.edge.rpc,
                tokens=guard.tokens if guard is not None else None,
            )
            try:
                self.metrics.start()
            except OSError as e:
                raise StartupError(f"server.metrics={s.metrics}: cannot serve metrics: {e}") from e
            self._tasks.append(asyncio.create_task(self.metrics.run(), name="metrics"))
        return True

    async def _open_tiers(self, s: ServerConfig) -> Tiers | None:
        if not s.host_tier_bytes and not s.disk_tier_dir:
            return None
        host = HostTier(s.host_tier_bytes) if s.host_tier_bytes else None
        disk = None
        made: list[Tiers] = []  # the Tiers below, once made: told of pages the disk evicts
        loop = asyncio.get_running_loop()

        def disk_evicted(keys: list[PageKey]) -> None:  # on the disk writer thread
            if made:
                loop.call_soon_threadsafe(made[0].disk_evicted, keys)

        if s.disk_tier_dir:
            try:
                disk = await asyncio.to_thread(
                    DiskTier.open,
                    s.disk_tier_dir,
                    s.disk_tier_bytes,
                    on_evict=disk_evicted,
                    policy=s.disk_tier_policy or s.default_policy,
                    queue_bytes=s.disk_queue_bytes,
                )
            except (OSError, ValueError, lmdb.Error) as e:
                raise StartupError(
                    f"server.disk_tier_dir={s.disk_tier_dir}: cannot open the disk tier: {e}"
                ) from e
        log.info(
            "tiers: host %s, disk %s%s",
            format_size(s.host_tier_bytes) if host is not None else "off",
            f"{format_size(disk.capacity_bytes)} in {s.disk_tier_dir}" if disk is not None else "off",
            ", write-through" if s.write_through and disk is not None else "",
        )
        made.append(Tiers(host, disk, write_through=s.write_through, prefetch_pages=s.prefetch_pages))
        return made[0]

    async def _reindex_disk(self) -> None:
        """Re-index the disk tier at start, on a thread, while the daemon serves: pages become
        findable as they are indexed. Records of swapped sequences (dead with the daemon that
        swapped them) are deleted."""
        store = self.store
        if store is None or store.tiers is None or store.tiers.disk is None:
            raise InvariantBroken("re-indexing before the store and its disk tier exist")
        tiers, loop, t0 = store.tiers, asyncio.get_running_loop(), time.monotonic()
        state = tiers.reindex_state
        state.running = True

        def progress(done: int, total: int, rate: float) -> None:
            state.progress(done, total)
            log.info(
                "re-index of the disk tier: %d / %d pages, %s of ~%s (%.0f pages/s)",
                done,
                total,
                format_size(state.bytes_done),
                format_size(state.bytes_total),
                rate,
            )

        def post(pairs: list[tuple[str, bytes, bytes]]) -> None:
            loop.call_soon_threadsafe(_note, pairs)

        def _note(pairs: list[tuple[str, bytes, bytes]]) -> None:
            for ns_name, parent, child in pairs:
                tiers.note_successor(ns_name, parent, child)

        try:
            found, stale = await asyncio.to_thread(reindex_disk, tiers, progress, post)
        except Exception:
            log.exception("re-index of the disk tier failed; pages written from now on are served")
            return
        finally:
            state.running = False
        state.progress(state.done, state.total, finished=not tiers.closing)
        if stale:
            tiers.disk.remove_async(stale)
        log.info(
            "re-index of the disk tier done: %d pages (%s) in %.1fs (%d records of swapped sequences deleted)",
            found,
            format_size(state.bytes_total),
            time.monotonic() - t0,
            len(stale),
        )

    def _bind(self, server: grpc.aio.Server) -> None:
        s = self.config.server
        try:
            server.add_insecure_port(f"unix:{self.socket_path}")
        except RuntimeError as e:
            raise StartupError(f"cannot listen on unix:{self.socket_path}: {e}") from e
        # The directory is already 0700; this also keeps the socket private if it is not.
        os.chmod(self.socket_path, 0o600)
        self._socket_ino = os.stat(self.socket_path).st_ino
        if s.tcp:
            self.tcp_port = bind_tcp(server, s)

    async def stop(self) -> bool:
        """Stop in order, each step bounded. Safe after a partial start, and a second time.
        Returns False when a step failed or timed out (the later steps still ran)."""
        ok = True
        grace = self.config.server.shutdown_grace_s
        if self.health is not None:
            ok &= await step(
                "health set to NOT_SERVING", self.health.enter_graceful_shutdown(), STEP_TIMEOUT_S
            )
        if self.server is not None:
            server, self.server = self.server, None
            # New calls get UNAVAILABLE "daemon shutting down"; those under way have the grace
            # to finish, then are cancelled with the same answer (edge.py), while KeepAlive
            # streams still hold their sessions. Only then do the streams end (same status).
            self.edge.begin_shutdown()
            cancelled = await self.edge.drain(grace)
            if cancelled:
                log.warning("shutdown: %d call(s) still running after the grace were cancelled", cancelled)
            if self._kvstore_servicer is not None:
                self._kvstore_servicer.begin_shutdown()
            ok &= await step("server stopped", server.stop(STEP_TIMEOUT_S), 2 * STEP_TIMEOUT_S)
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            ok &= await step(
                "background tasks stopped", asyncio.gather(*tasks, return_exceptions=True), STEP_TIMEOUT_S
            )
        if self.integrity is not None:
            self.integrity.close()  # (its thread's job under way reads the pools)
        if self.lane is not None:  # after the drain: its calls under way were answered
            lane, self.lane = self.lane, None
            ok &= await step("lane socket closed", lane.stop(), STEP_TIMEOUT_S)
        if self.pool_socket is not None:
            pool_socket, self.pool_socket = self.pool_socket, None
            ok &= await step("pool socket closed", pool_socket.stop(), STEP_TIMEOUT_S)
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
            log.info("shutdown: metrics server stopped")
        if self.store is not None and any(ns.pool.handle.on_device for ns in self.store.namespaces.values()):
            wait = device_pools_unmapped(self.store, grace)
            ok &= await step("clients let go of the device pools", wait, grace + STEP_TIMEOUT_S)
        if self.store is not None:
            store, self.store = self.store, None
            # The disk writer's last commit and a stopping re-index are bounded at 30 s each.
            ok &= await step("store closed, pools freed", close_store(store), 60 + STEP_TIMEOUT_S)
        socket_path.release(self.socket_path, self._lock_fd, self._socket_ino)
        self._socket_ino, self._lock_fd = 0, -1
        gc.unfreeze()  # (the store is closed: what start froze may be collected again)
        return ok


async def serve(config: Config) -> int:
    """Run a daemon until SIGTERM or SIGINT; the process exit status."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            log.warning("%s again: shutdown is already under way", sig.name)
        else:
            log.info("%s: shutting down", sig.name)
        stop.set()

    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        no_dumps(config.server.dumpable)
        daemon = Daemon(config)
        try:
            await daemon.start(stop)
        except StartupError as e:
            log.error("cannot start: %s", e)
            return e.exit_code
        await stop.wait()
        ok = await daemon.stop()
        log.info("stopped%s", "" if ok else " (with errors, see above)")
        return 0 if ok else 1
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def run(config: Config) -> int:
    """The blocking entry point: a uvloop event loop around `serve`."""
    return uvloop.run(serve(config))
