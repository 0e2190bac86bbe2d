"""On N ranks each rank does 1/N of OSFT's projection work and holds 1/N of its state.

Counted, not timed, on 1, 2 and 4 gloo ranks (rank_cost_worker.py): the FLOPs of the matrix
products of both projections (torch's FlopCounterMode) and the bytes of W0 and the bases each
rank keeps. The rows of every target (and of its right basis) divide evenly by 1, 2 and 4, so
the shares are exact. (Beyond them a rank holds, for one matrix at a time during a projection,
the all-gathered right basis, in x width: a few percent of the matrix for the default targets.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("rank_cost_worker.py")


def counts(tmp_path: Path, world: int) -> list[dict]:
    out = tmp_path / f"world{world}"
    ranks = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                str(rank),
                str(world),
                str(tmp_path / f"store{world}"),
                str(out),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in range(world)
    ]
    for rank in ranks:
        _, stderr = rank.communicate(timeout=300)
        assert rank.returncode == 0, stderr[-3000:]
    return [json.loads(Path(f"{out}.{rank}.json").read_text()) for rank in range(world)]


def test_each_of_n_ranks_does_a_nth_of_the_work_and_holds_a_nth_of_the_state(tmp_path):
    (one,) = counts(tmp_path, 1)
    assert one["gradients"] > 0 and one["weights"] == one["gradients"] and one["state_bytes"] > 0
    for world in (2, 4):
        for rank, counted in enumerate(counts(tmp_path, world)):
            for key in ("gradients", "weights", "state_bytes"):
                assert counted[key] * world == one[key], (world, rank, key, counted, one)
