"""`kvstore-bench idle`: a real daemon measured with no call made, as configured and with its
background work off; the configured side's loop does the scrubber's work on top of the
baseline's timers, and the daemon is gone afterwards (BENCHMARKS.md, idle)."""

from __future__ import annotations

import json

import pytest
from kvstore_bench import cli, idle


def test_an_idle_daemon_is_measured_against_its_baseline(capsys) -> None:
    argv = ["idle", "--json", "--pool-pages", "512", "--seconds", "2.5", "--settle", "0.3"]
    args = cli.build_parser().parse_args(argv)
    assert args.run is idle.run and args.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    pool = out["pools"]["512"]
    configured, baseline = pool["configured"], pool["baseline"]
    assert configured["loop_ms_per_s"] > 0 and baseline["loop_ms_per_s"] > 0
    assert configured["threads_ms_per_s"] >= configured["loop_ms_per_s"]
    # The background work ran on one side only: the scrubber starts a pass over the 64 sealed
    # pages at most once a second (one 50 ms tick takes the whole pool), so at least once in
    # the 2.5 s window; it is off in the baseline. Not their CPU: a pass over 64 pages of 4 KiB
    # is within the noise of the timers' CPU (the assertion on it failed a CI run, 6.68 < 6.71).
    assert configured["pages_scrubbed"] >= 64
    assert baseline["pages_scrubbed"] == 0
    assert pool["loop_over_baseline"] == pytest.approx(
        configured["loop_ms_per_s"] / baseline["loop_ms_per_s"], abs=0.01
    )


def test_bad_arguments_are_refused() -> None:
    parser = cli.build_parser()
    for argv in (["--pool-pages", "10"], ["--pool-pages", "x"], ["--seconds", "0"], ["--set", "novalue"]):
        with pytest.raises(SystemExit):
            idle.run(parser.parse_args(["idle", *argv]))
