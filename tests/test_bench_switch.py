"""`kvstore-bench switch`: a real daemon under a steady Lookup load, a module attribute in it
switched between two values every window (the daemon confirms each); both values get windows
and calls, and an attribute the daemon cannot set is an error, not a measurement."""

from __future__ import annotations

import json

import pytest
from kvstore_bench import cli, switch
from kvstore_bench.harness import BenchError

ARGS = ["--seconds", "1.2", "--window", "0.1", "--concurrency", "4", "--json"]


def test_both_values_are_measured_in_alternating_windows(capsys) -> None:
    argv = ["switch", "--attr", "kvstore.store.live_mrc:PENDING_ADDS", "--values", "1,32", *ARGS]
    args = cli.build_parser().parse_args(argv)
    assert args.run is switch.run and args.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    first, second = out["by_value"]
    assert (first["value"], second["value"]) == (1, 32)
    for v in (first, second):
        assert v["windows"] >= 2 and v["calls"] > 0 and v["daemon_us"] >= v["loop_us"] > 0
    assert abs(first["windows"] - second["windows"]) <= 1  # (alternating)
    assert out["daemon_us_diff"] == pytest.approx(second["daemon_us"] - first["daemon_us"], abs=0.02)


def test_an_attribute_the_daemon_cannot_set_is_an_error() -> None:
    argv = ["switch", "--attr", "kvstore.no_such_module:X", "--values", "1,2", *ARGS]
    with pytest.raises(BenchError, match="could not set the attribute: ModuleNotFoundError"):
        switch.run(cli.build_parser().parse_args(argv))


def test_bad_arguments_are_refused() -> None:
    parser = cli.build_parser()
    for extra in (["--attr", "nomodule", "--values", "1,2"], ["--attr", "a.b:C", "--values", "1"]):
        with pytest.raises(SystemExit):
            switch.run(parser.parse_args(["switch", *extra]))
