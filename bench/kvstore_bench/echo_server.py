"""The rpc benchmark's baseline server: a bare grpc.aio server on uvloop that answers with
canned bytes and does nothing else.

    python -m kvstore_bench.echo_server --socket PATH --reply FILE

It registers, with `grpc.method_handlers_generic_handler` and no (de)serializers (raw bytes
in, raw bytes out):

- `/kvstore.v1.KVStore/Lookup`: the same method name as the daemon's, so a client uses the
  real `KVStoreStub.Lookup` (protobuf serialization of the request and parsing of the reply
  on the client, exactly as against the daemon); the server only returns FILE's bytes, a
  real serialized LookupResponse captured from the daemon.
- `/kvstore_bench.Echo/Echo`: the same canned reply for a client that sends raw bytes (no
  protobuf anywhere): the floor of grpc.aio itself.

plus the standard health service (SERVING once listening), which is how the benchmark
harness waits for it, as for the daemon. SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

import grpc
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

LOOKUP_SERVICE, LOOKUP_METHOD = "kvstore.v1.KVStore", "Lookup"
ECHO_SERVICE, ECHO_METHOD = "kvstore_bench.Echo", "Echo"
ECHO_PATH = f"/{ECHO_SERVICE}/{ECHO_METHOD}"


def handlers(reply: bytes) -> list[grpc.GenericRpcHandler]:
    async def canned(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return reply

    unary = grpc.unary_unary_rpc_method_handler(canned)  # no (de)serializers: bytes as they come
    return [
        grpc.method_handlers_generic_handler(LOOKUP_SERVICE, {LOOKUP_METHOD: unary}),
        grpc.method_handlers_generic_handler(ECHO_SERVICE, {ECHO_METHOD: unary}),
    ]


async def serve(socket_path: str, reply: bytes) -> None:
    # The same message limits as the daemon: a long prompt is one big request.
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    )
    server.add_generic_rpc_handlers(handlers(reply))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await health.enter_graceful_shutdown()
    await server.stop(1.0)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvstore_bench.echo_server", description=__doc__)
    p.add_argument("--socket", required=True, help="unix socket path to serve on")
    p.add_argument("--reply", required=True, help="file whose bytes every call answers with")
    args = p.parse_args(argv)
    with open(args.reply, "rb") as f:
        reply = f.read()
    uvloop.run(serve(args.socket, reply))
    return 0


if __name__ == "__main__":
    sys.exit(main())
