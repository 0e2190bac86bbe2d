"""mt export: a distributed training-state checkpoint (2 ranks) -> a HF folder, in one CPU
process, with the same weights and logits as the trainer's own export of the same step; and
the torchrun run of `mt run` that wrote the checkpoint."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from mt import cli
from mt.errors import CommandError
from mt.export import export, export_checkpoint

# one worker runs this file (pytest-xdist): its tests share one torchrun of `mt run`
pytestmark = pytest.mark.xdist_group("export")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model, kit) -> subprocess.CompletedProcess:
    """`mt run` under torchrun on 2 ranks, 2 steps: checkpoints/step_1 (sharded over both) and
    the trainer's HF export of each step (hf_format/samples_4 is step 1). The same run is the
    torchrun test of `mt run` (below): starting two ranks costs half a minute on a CPU, and
    one file holds all its readers, so that a parallel run of the suite starts it once."""
    folder = tmp_path_factory.mktemp("run")
    data = kit.write_jsonl(folder / "data.jsonl", kit.token_rows(24))
    run_file = kit.run_toml(
        folder, tiny_model, data, checkpoint_every_steps=1, min_samples_per_checkpoint=4
    )
    result = kit.torchrun_mt(2, "run", str(run_file))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def trained(run) -> Path:
    """The run's output_dir (only read: exports go to each test's own folder)."""
    out = Path(run.args[-1]).parent / "out"  # kit.run_toml's output_dir, beside the run file
    assert sorted(p.name for p in (out / "checkpoints" / "step_1").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    return out


@pytest.mark.slow(20)
def test_torchrun_with_two_processes_logs_each_step_once(run, trained):
    lines = (trained / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]  # rank 0 writes, alone
    progress = [line for line in run.stdout.splitlines() if line.startswith("step ")]
    assert len(progress) == 2, run.stdout


def logits(folder: Path, dtype=None) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    ids = torch.arange(40).reshape(2, 20) % 64
    with torch.no_grad():
        return model(ids).logits


def test_the_export_equals_the_trainers_own_export_of_that_step(trained, tmp_path, tiny_model):
    target = tmp_path / "hf"
    export(str(trained / "checkpoints" / "step_1"), out=str(target))
    reference = trained / "hf_format" / "samples_4"
    ours = AutoModelForCausalLM.from_pretrained(target).state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(reference).state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert torch.equal(logits(target), logits(reference))
    # trained: not the initial weights
    assert not torch.equal(logits(target), logits(tiny_model))
    tokenizer = AutoTokenizer.from_pretrained(target)  # the tokenizer files came along
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_model).chat_template
    assert not list(tmp_path.glob(".hf.tmp*"))


def test_dtype_and_the_newest_checkpoint_of_a_run(trained, tmp_path, capsys):
    target = tmp_path / "bf16"
    export_checkpoint(str(trained), target, "bfloat16")  # a run's output_dir: its newest checkpoint
    assert "newest checkpoint of" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(target, dtype="auto")
    assert model.dtype == torch.bfloat16
    reference = AutoModelForCausalLM.from_pretrained(trained / "hf_format" / "samples_4")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference.state_dict()[name].to(torch.bfloat16)), name


def test_mistakes_are_one_clear_line(trained, tmp_path):
    step = trained / "checkpoints" / "step_1"
    (tmp_path / "exists").mkdir()
    with pytest.raises(CommandError, match="exists already"):
        export(str(step), out=str(tmp_path / "exists"))
    with pytest.raises(CommandError, match="needs --out"):
        export(str(step))
    with pytest.raises(CommandError, match="is not a complete mt checkpoint"):
        export(str(tmp_path), out=str(tmp_path / "x"))
    with pytest.raises(CommandError, match="--dtype: expected one of"):
        export(str(step), out=str(tmp_path / "x"), dtype="int8")
    alone = tmp_path / "copied" / "checkpoints" / "step_1"
    shutil.copytree(step, alone)
    with pytest.raises(CommandError, match="run.toml is missing"):
        export(str(alone), out=str(tmp_path / "x"))
    with pytest.raises(CommandError, match="has no config.json"):
        export(str(step), out=str(tmp_path / "x"), model=str(tmp_path))
    other = tmp_path / "other-model"
    LlamaConfig(
        hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64,
    ).save_pretrained(other)  # fmt: skip
    with pytest.raises(CommandError, match="cannot read the model from this checkpoint"):
        export(str(step), out=str(tmp_path / "x"), model=str(other))
    assert not (tmp_path / "x").exists()


def test_the_command_line(trained, tmp_path, capsys):
    target = tmp_path / "cli"
    cli.main(["export", str(trained / "checkpoints" / "step_1"), f"--out={target}"])  # exit 0
    assert capsys.readouterr().out.strip().endswith(f"wrote {target}")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["export", str(trained / "checkpoints" / "step_1"), f"--out={target}"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        f"mt: error: --out: {target} exists already; choose a new folder\n"
    )
