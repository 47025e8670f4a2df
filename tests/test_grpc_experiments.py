"""`server.grpc_experiments` (docs/config.md): `kvstore serve` hands it to gRPC core as
GRPC_EXPERIMENTS before grpc loads, unless the environment names its own. Its default,
`-event_engine_listener`, has the connections the daemon accepts do their socket I/O on the
thread that polls for calls; under gRPC's own defaults each call's reads and writes wake the
threads of gRPC's event engine instead. What is asserted is that effect on the running daemon:
the context switches of its `event_engine` threads (from /proc) while a client makes calls."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from daemon import DaemonProcess
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb
from kvstore_proto.kvstore.v1 import kvstore_pb2_grpc as pb_grpc

CALLS = 300


def event_engine_switches(pid: int) -> int:
    """Context switches so far of the process's threads named `event_engine` (gRPC core's)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "comm").read_text().strip() != "event_engine":
                continue
            status = (task / "status").read_text().splitlines()
        except FileNotFoundError:  # (a thread that ended meanwhile)
            continue
        total += sum(int(line.split()[1]) for line in status if "ctxt_switches:" in line)
    return total


def switches_per_call(daemon: DaemonProcess) -> float:
    assert daemon.proc is not None
    with grpc.insecure_channel(daemon.target) as channel:
        stats = pb_grpc.KVStoreStub(channel).Stats
        stats(pb.StatsRequest(), timeout=10)  # (connected: the accept's own wake-ups are not counted)
        before = event_engine_switches(daemon.proc.pid)
        for _ in range(CALLS):
            stats(pb.StatsRequest(), timeout=10)
        return (event_engine_switches(daemon.proc.pid) - before) / CALLS


def test_the_default_keeps_a_calls_socket_io_off_the_event_engine_threads(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    tuned = daemon_factory().start()
    grpc_defaults = daemon_factory(server={"grpc_experiments": ""}).start()
    assert "GRPC_EXPERIMENTS" not in tuned.stderr_path.read_text()  # (no override to warn of)
    off, on = switches_per_call(tuned), switches_per_call(grpc_defaults)
    # Measured: 0.06-0.09 a call with the default on an idle machine (0.7-0.9 with both CPUs
    # busy: timers and preemption), 6.0-6.5 under gRPC's own defaults either way.
    assert on > 2.0, f"event-engine threads switched only {on:.2f} times a call under gRPC's defaults"
    assert off < on / 3, (
        f"event-engine threads switched {off:.2f} times a call with the default ({on:.2f} without)"
    )


def test_grpc_experiments_in_the_environment_win_and_are_logged(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    grpc_defaults = daemon_factory(server={"grpc_experiments": ""}).start()
    d = daemon_factory(server={"grpc_experiments": ""}, env={"GRPC_EXPERIMENTS": "-event_engine_listener"})
    d.start()
    off, on = switches_per_call(d), switches_per_call(grpc_defaults)
    assert off < on / 3, f"the environment's GRPC_EXPERIMENTS: {off:.2f} switches a call, {on:.2f} without"
    assert (
        "gRPC runs with GRPC_EXPERIMENTS='-event_engine_listener' as this process's environment has it, "
        "not server.grpc_experiments=''" in d.stderr_path.read_text()
    )


@pytest.mark.parametrize("value", ["-event_engine_listener", "a,-b_2", ""])
def test_the_key_takes_grpc_experiments_syntax(value: str) -> None:
    from kvstore import config as cfg

    assert cfg.load(environ={"KVSTORE_GRPC_EXPERIMENTS": value}).server.grpc_experiments == value
