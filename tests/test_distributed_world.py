"""World's tensor gather (the step's only gather): rank order, shapes and dtypes on a real two-rank gloo group."""

from __future__ import annotations

import torch

from distributed_helpers import run_ranks
from marginface.train.distributed import World


def _gather_indices(rank: int, world: int) -> list[list[int]]:
    indices = torch.arange(4, dtype=torch.int64) + 100 * rank
    gathered = World(rank=rank, world_size=world).gather_equal(indices)
    assert gathered.shape == (world, 4) and gathered.dtype == torch.int64
    return gathered.tolist()


def test_gather_equal_stacks_every_rank_in_rank_order() -> None:
    results = run_ranks(_gather_indices, 3)
    expected = [[0, 1, 2, 3], [100, 101, 102, 103], [200, 201, 202, 203]]
    assert results == [expected] * 3


def test_gather_equal_on_one_process_adds_the_rank_axis() -> None:
    value = torch.tensor([0.25, 0.5], dtype=torch.float64)
    gathered = World().gather_equal(value)
    assert gathered.shape == (1, 2) and gathered.tolist() == [[0.25, 0.5]]


EXITS_AFTER_A_RUN = """
import logging, sys
from marginface.train import distributed
logging.basicConfig(stream=sys.stderr, format="%(message)s")
print("summary written", end="")              # unflushed: exit_process must flush it
sys.stderr.write("last stderr line")
logging.getLogger("marginface").warning("last log line")
distributed.exit_process(int(sys.argv[1]))
print("never reached")
"""


def test_exit_process_keeps_the_exit_code_and_flushes_what_was_written(tmp_path) -> None:
    import subprocess
    import sys

    for code in (0, 3):
        result = subprocess.run([sys.executable, "-c", EXITS_AFTER_A_RUN, str(code)], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == code
        assert result.stdout == "summary written"
        assert "last stderr line" in result.stderr and "last log line" in result.stderr


def test_a_torchrun_rank_leaves_through_exit_process_and_one_process_returns(monkeypatch) -> None:
    from marginface import cli
    from marginface.train import distributed

    exits: list[int] = []

    def fake_exit(code: int) -> None:
        exits.append(code)

    monkeypatch.setattr(distributed, "exit_process", fake_exit)
    monkeypatch.setattr(cli, "run_command", lambda argv=None: 4)
    assert cli.main([]) == 4 and exits == []  # one process: finalization as usual
    monkeypatch.setattr(distributed, "_started_process_group", True)
    cli.main([])
    assert exits == [4]
