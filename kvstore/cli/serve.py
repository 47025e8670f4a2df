"""`kvstore`: the daemon's command line. `kvstore serve` runs the daemon. The clients' programs
live on the client side: `kvstore-admin` (kvstore_client/cli/) and the demo (examples/)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from kvstore_proto.kvstore.v1 import kvstore_pb2

from kvstore import __version__
from kvstore import config as cfg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstore", description="KV-cache store sidecar")
    parser.add_argument(
        "--version",
        action="version",
        # The proto package (kvstore.v1) is the wire API's version.
        version=f"kvstore {__version__} (wire API {kvstore_pb2.DESCRIPTOR.package})",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the daemon",
        description="Run the daemon until SIGTERM or SIGINT. Precedence: defaults < --config file "
        "< KVSTORE_* environment < flags. All keys: docs/config.md.",
    )
    cfg.add_flags(serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return serve(vars(args))


def serve(flags: dict[str, object]) -> int:
    try:
        config = cfg.load(config_file=flags.pop("config", None), flags=flags)  # type: ignore[arg-type]
    except cfg.ConfigError as e:
        for problem in e.problems:
            print(f"kvstore serve: config error: {problem}", file=sys.stderr)
        return 2

    # gRPC reads GRPC_EXPERIMENTS once, as it loads: set before grpc is imported (below),
    # unless the environment names its own.
    if config.server.grpc_experiments and "GRPC_EXPERIMENTS" not in os.environ:
        os.environ["GRPC_EXPERIMENTS"] = config.server.grpc_experiments
    # Imported after the config is known good, so a typo is reported without loading grpc.
    from kvstore import daemon, logging_setup

    logging_setup.configure(config.server.log_level)
    return daemon.run(config)
