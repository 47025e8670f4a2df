"""`kvstore-bench store-instr`'s worker (what cachegrind counts) does the work it names: puts
seal their pages, lookups hit; and the CLI knows the command. The counting itself needs
valgrind and minutes, so it is run by hand (BENCHMARKS.md, rpc and peers sections)."""

from __future__ import annotations

import pytest
from kvstore_bench import cli, store_instr


@pytest.mark.parametrize("form", ["repeated", "packed"])
def test_the_put_worker_seals_every_page_it_puts(form) -> None:
    pages = 3
    sealed = store_instr.work(2, pages, "lru", "put", form)
    assert sealed == (1 + 2 + store_instr.WARMUP) * pages


@pytest.mark.parametrize("op", ["lookup", "lookup-nopin", "lookup-edge"])
@pytest.mark.parametrize("form", ["repeated", "packed"])
def test_the_lookup_worker_hits_the_whole_prompt(op, form) -> None:
    assert store_instr.work(2, 4, "horizon", op, form) == 4 * store_instr.PAGE_TOKENS


def test_the_cli_knows_store_instr() -> None:
    args = cli.build_parser().parse_args(["store-instr", "--ops", "put", "--pages", "16"])
    assert args.run is store_instr.run
