"""`kvstore-bench rpc-instr`: the CLI knows it, and it sums the counts of the dumps taken
while instrumentation was on, not the file callgrind writes at exit. The counting itself
needs valgrind and a minute, so it is run by hand (BENCHMARKS.md, rpc section)."""

from __future__ import annotations

import pytest
from kvstore_bench import cli, rpc_instr
from kvstore_bench.harness import BenchError

DUMP = "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\n{body}totals: {n}\n"


def test_the_cli_knows_rpc_instr() -> None:
    args = cli.build_parser().parse_args(["rpc-instr", "--sides", "kvstore", "--calls", "50"])
    assert args.run is rpc_instr.run and args.calls == 50 and not args.integrity


def test_only_the_dumps_taken_while_counting_are_summed(tmp_path) -> None:
    dump = tmp_path / "kvstore.callgrind"
    dump.write_text(DUMP.format(body="", n=10**9))  # at exit: start-up and shutdown, never counted
    (tmp_path / "kvstore.callgrind.1").write_text(DUMP.format(body="fn=(1) x\n0 5\n", n=250_000_000))
    (tmp_path / "kvstore.callgrind.2").write_text(DUMP.format(body="", n=1_000))
    (tmp_path / "echo.callgrind.1").write_text(DUMP.format(body="", n=7))  # another server's
    assert rpc_instr.dump_totals(dump) == 250_001_000


def test_a_dump_without_totals_is_an_error() -> None:
    with pytest.raises(BenchError, match="totals"):
        rpc_instr.parse_totals("version: 1\nevents: Ir\n")
