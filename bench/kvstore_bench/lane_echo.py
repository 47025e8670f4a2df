"""The rpc benchmark's floor for the lane: a bare asyncio unix-socket server on uvloop that
speaks the lane's framing (kvstore_proto/lane.py) and answers every request with canned bytes.

    python -m kvstore_bench.lane_echo --socket PATH --reply FILE

The first frame of a connection must be a lane hello (answered as the daemon answers it);
every later frame, whatever method it names, is answered with status 0 and FILE's bytes, a
real serialized LookupResponse captured from the daemon. No protobuf, no handler, no store:
what a lane call costs below the daemon's own work, as `echo_server.py` is for gRPC. It
serves no gRPC health: the benchmark knows it is ready when its hello is answered
(rpc_lane.LaneChild). SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence

import grpc
import uvloop
from kvstore_proto import lane as wire

_OK = grpc.StatusCode.OK.value[0]
_NOT_HELLO = grpc.StatusCode.INVALID_ARGUMENT.value[0]


class _Echo(asyncio.Protocol):
    def __init__(self, canned: bytes) -> None:
        self.canned = canned  # the whole reply frame
        self.buf = bytearray()
        self.greeted = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        while (body := wire.split(self.buf)) is not None:
            if self.greeted:
                self.transport.write(self.canned)
            elif body.startswith(wire.MAGIC):
                self.greeted = True
                self.transport.write(wire.reply(_OK, wire.SERVER_HELLO))
            else:
                self.transport.write(wire.reply(_NOT_HELLO, b"not a kvstore lane hello"))
                self.transport.close()
                return


async def serve(socket_path: str, reply: bytes) -> None:
    canned = wire.reply(_OK, reply)
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(lambda: _Echo(canned), path=socket_path)
    os.chmod(socket_path, 0o600)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()  # (connections the benchmark left open die with the process)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvstore_bench.lane_echo", description=__doc__)
    p.add_argument("--socket", required=True, help="unix socket path to serve on")
    p.add_argument("--reply", required=True, help="file whose bytes every call answers with")
    args = p.parse_args(argv)
    with open(args.reply, "rb") as f:
        reply = f.read()
    uvloop.run(serve(args.socket, reply))
    return 0


if __name__ == "__main__":
    sys.exit(main())
