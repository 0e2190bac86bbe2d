"""FP8 compute (the key ``float8``, tensorwise) on two gloo ranks, through `mt run` under torchrun:
FSDP2 gathers the converted weights in FP8 (the rule of several ranks, not lifted here) and their
scales are refreshed after every optimizer step, with activation checkpointing and validation in
one run, sequence parallelism and compiled blocks in another (issue #29's "composes with"). A
third run offloads the shards to the host (cpu_offload): there they are gathered in bfloat16 and
cast inside each product, as the rule of mt_core.model.float8.gathers_in_float8 says.

torch runs FP8 matrix products on the CPU too; the key itself is a GPU feature that the resolver
refuses here, so the script below lifts that check and lowers the size bound to the tiny model's
width (32: q, o and the MLP convert, the 16-wide key/value projections stay). Speed and the loss
over 300 steps are measured on a GPU (tools/bench/RESULTS.md, "FP8 compute").
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("torchao.float8")  # the torchao extra

# ``python SCRIPT RUN.toml OUTPUT_DIR [OVERRIDES_JSON]``, also under torchrun: `mt run` with the
# GPU check lifted; each rank writes, per optimizer step, how many of its parameters FSDP2
# gathers in FP8 when their scales are refreshed (float8-rank<R>.json in OUTPUT_DIR)
SCRIPT = """
import json, os, sys
import mt_core.trainer.step as trainer_step
from mt_core import load_run_file, train
from mt_core.model import float8
from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor
float8.float8_problem = lambda *args: None
float8.MIN_DIMENSION = dict.fromkeys(float8.RECIPES, 32)
gathered_in_fp8 = []
refresh = trainer_step.refresh_weight_scales
def counting_refresh(model):
    gathered_in_fp8.append(sum(isinstance(p.to_local(), WeightWithDynamicFloat8CastTensor)
                               for p in model.parameters()))
    return refresh(model)
trainer_step.refresh_weight_scales = counting_refresh
overrides = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
train(load_run_file(sys.argv[1], {"output_dir": sys.argv[2], **overrides}))
path = os.path.join(sys.argv[2], f"float8-rank{os.environ['RANK']}.json")  # (the group is gone)
with open(path, "w") as out:
    json.dump(gathered_in_fp8, out)
"""
CONVERTED = 2 * 5  # q, o, gate, up and down of the tiny Llama's 2 blocks
RUNS = pytest.mark.xdist_group("float8_training")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, llama_folder, runs) -> Path:
    root = tmp_path_factory.mktemp("float8")
    runs.write_run(
        root / "run.toml", model_name_or_path=str(llama_folder),
        data_path=str(runs.write_counting_data(root / "data.jsonl")), output_dir=str(root / "unused"), batch_size=8,
        max_tokens_per_gpu=48, learning_rate=2e-2, lr_scheduler="constant",
        training_mode="step", max_steps=4, attn_backend="sdpa", save_dtype="float32",
        validation_split=0.2, validation_frequency=2,
    )  # fmt: skip
    (root / "fp8.py").write_text(SCRIPT)
    return root


@pytest.fixture(scope="module")
def first_loss_without_fp8(workspace, runs) -> float:
    """Step 1 on one process without the key: the same global batch's loss in float32 (a 2-rank
    run's reported loss is that of the whole batch, equal to it up to float32's rounding)."""
    _, lines = runs.train_here(workspace / "reference", workspace / "run.toml", max_steps=1)
    return lines[0]["loss"]


def fp8_on_two_ranks(
    workspace: Path, runs, name: str, gathered: int = CONVERTED, **overrides
) -> tuple[list[dict], str]:
    """The run with ``float8 = "tensorwise"`` and ``overrides`` on two ranks: its metrics and
    log, after checking that on every rank and step ``gathered`` converted weights (by default
    all) were gathered in FP8 and their scales refreshed."""
    out = workspace / name
    keys = {"float8": "tensorwise", **overrides}
    result = runs.launch(str(workspace / "run.toml"), str(out), json.dumps(keys),
                         script=workspace / "fp8.py", nproc=2)  # fmt: skip
    lines = runs.metrics(out)
    for rank in (0, 1):
        in_fp8 = json.loads((out / f"float8-rank{rank}.json").read_text())
        assert in_fp8 == [gathered] * len(lines), (rank, in_fp8)
    return lines, result.stdout + result.stderr


def assert_fp8_trained(
    lines: list[dict], first_loss_without_fp8: float, learns: bool = True
) -> None:
    """FP8 computed (the loss is not the float32 one) within e4m3's rounding of it (3 mantissa
    bits: 2^-4 of each product, the bound of tests/test_osft_training.py's FP8 run), and the run
    learns (its last loss under its first)."""
    assert lines[0]["loss"] != first_loss_without_fp8
    assert lines[0]["loss"] == pytest.approx(first_loss_without_fp8, rel=2**-4)
    assert not learns or lines[-1]["loss"] < lines[0]["loss"]


@RUNS
@pytest.mark.slow(15)
def test_fp8_on_two_ranks_with_activation_checkpointing_and_validation(
    workspace, runs, first_loss_without_fp8
):
    lines, _ = fp8_on_two_ranks(workspace, runs, "checkpointing", activation_checkpointing=True)
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert_fp8_trained(lines, first_loss_without_fp8)
    validated = [line["val_loss"] for line in lines if "val_loss" in line]
    assert len(validated) == 2 and all(math.isfinite(v) for v in validated)


@RUNS
@pytest.mark.slow(30)
def test_fp8_on_two_ranks_with_sequence_parallelism_and_compiled_blocks(
    workspace, runs, first_loss_without_fp8
):
    """The two ranks as one sequence-parallel group (each holds half of every row, so each
    rank's part, not only the row, must suit FP8's products: a multiple of 16 tokens), the
    blocks compiled with an activation budget. One step: the compiler's time on a CPU is most of
    this test's (a second step would compile once more: it validates, and a block run without
    gradients is another graph)."""
    lines, log = fp8_on_two_ranks(
        workspace, runs, "sequence parallel", max_steps=1, sequence_parallel_size=2,
        torch_compile=True, activation_memory_budget=0.5,
    )  # fmt: skip
    assert "compiled blocks on, activation budget 0.50" in log
    assert [line["step"] for line in lines] == [1]
    assert_fp8_trained(lines, first_loss_without_fp8, learns=False)


@RUNS
@pytest.mark.slow(10)
def test_fp8_on_two_ranks_with_the_shards_in_host_memory(workspace, runs, first_loss_without_fp8):
    """cpu_offload: no weight is gathered in FP8 (on GPUs their scales would be reduced across
    ranks on the host, which NCCL cannot), and the products still compute in FP8 and learn."""
    lines, _ = fp8_on_two_ranks(
        workspace, runs, "offloaded", gathered=0, max_steps=2, cpu_offload=True
    )
    assert [line["step"] for line in lines] == [1, 2]
    assert_fp8_trained(lines, first_loss_without_fp8)
