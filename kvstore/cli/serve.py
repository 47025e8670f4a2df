"""`kvstore`: the command line. `kvstore serve` runs the daemon; `kvstore demo` runs the demo
(kvstore/cli/demo.py, imported only when asked for, so the daemon never loads it)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kvstore import config as cfg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstore", description="KV-cache store sidecar")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the daemon",
        description="Run the daemon until SIGTERM or SIGINT. Precedence: defaults < --config file "
        "< KVSTORE_* environment < flags. All keys: docs/config.md.",
    )
    cfg.add_flags(serve)
    # The demo parses its own arguments; everything after `demo` is handed to it untouched.
    commands.add_parser("demo", help="run the end-to-end demo", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from kvstore.cli import demo  # lazily: the demo's dependencies are not the daemon's

        return demo.main(argv[1:])
    args = build_parser().parse_args(argv)
    return serve(vars(args))


def serve(flags: dict[str, object]) -> int:
    try:
        config = cfg.load(config_file=flags.pop("config", None), flags=flags)  # type: ignore[arg-type]
    except cfg.ConfigError as e:
        for problem in e.problems:
            print(f"kvstore serve: config error: {problem}", file=sys.stderr)
        return 2

    # Imported after the config is known good, so a typo is reported without loading grpc.
    from kvstore import daemon, logging_setup

    logging_setup.configure(config.server.log_level)
    return daemon.run(config)
