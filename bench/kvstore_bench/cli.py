"""`kvstore-bench`: benchmarks of the kvstore daemon. Each subcommand starts its own daemon
(and baseline servers), measures against a baseline taken in the same run, prints progress
on stderr and results on stdout (`--json`: one JSON object). See BENCHMARKS.md."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import (
    budgets,
    crashloop,
    fuzz,
    gpu,
    idle,
    killed,
    pageio,
    peers,
    peers_profile,
    quant,
    replay,
    rpc,
    rpc_instr,
    soak,
    store_instr,
    switch,
    tiers,
    ttft,
    vllm,
)
from .harness import BenchError, install_signal_exit


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstore-bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="BENCHMARK")
    for name, module in (
        ("budgets", budgets),
        ("crashloop", crashloop),
        ("fuzz", fuzz),
        ("gpu", gpu),
        ("idle", idle),
        ("killed-clients", killed),
        ("pageio", pageio),
        ("peers", peers),
        ("peers-profile", peers_profile),
        ("quant", quant),
        ("replay", replay),
        ("rpc", rpc),
        ("rpc-instr", rpc_instr),
        ("soak", soak),
        ("store-instr", store_instr),
        ("switch", switch),
        ("tiers", tiers),
        ("ttft", ttft),
        ("vllm", vllm),
    ):
        doc = (module.__doc__ or "").strip()
        sub = commands.add_parser(
            name,
            help=doc.splitlines()[0].split(": ", 1)[-1],
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    install_signal_exit()
    try:
        return args.run(args)
    except BenchError as e:
        print(f"kvstore-bench {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"kvstore-bench {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
