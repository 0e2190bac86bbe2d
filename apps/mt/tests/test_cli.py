import json
import os
import random
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

import mt_core
from mt import cli
from mt_core import config
from mt_data import DataError

GOOD_FILE = """\
model_name_or_path = "models/tiny"
data_path = "data.jsonl"
output_dir = "out"
batch_size = 8
max_tokens_per_gpu = 256
learning_rate = 1e-5
"""

BIN = Path(sys.executable).parent  # the workspace venv: python, mt and torchrun
MT_SCRIPT = BIN / "mt"


def mt(*args: str, script: bool = False) -> subprocess.CompletedProcess:
    """Run the mt command in a fresh process: the installed script, or ``python -m mt``."""
    command = [str(MT_SCRIPT)] if script else [sys.executable, "-m", "mt"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture
def run_file(tmp_path):
    def write(text: str = GOOD_FILE) -> str:
        path = tmp_path / "run.toml"
        path.write_text(text)
        return str(path)

    return write


@pytest.fixture
def trained(monkeypatch):
    """Stands in for mt_core.train; the TrainingArgs of every call land in the list."""
    calls = []
    monkeypatch.setattr(mt_core, "train", calls.append, raising=False)
    return calls


def field_names() -> list[str]:
    names = [f.name for f in attrs.fields(config.TrainingArgs) if f.name != "pretraining"]
    return names + [f"pretraining.{f.name}" for f in attrs.fields(config.PretrainingConfig)]


def test_help_lists_every_key():
    result = mt("--help")
    assert result.returncode == 0, result.stderr
    assert "usage: mt run RUN.toml [--key=value ...]" in result.stdout
    assert "torchrun --nproc-per-node N --no-python mt run RUN.toml" in result.stdout
    for name in field_names():
        assert f"\n  {name}  (" in result.stdout, name


def test_run_help_through_the_installed_script():
    assert MT_SCRIPT.exists(), "the workspace venv should hold the mt script"
    result = mt("run", "--help", script=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{cli.USAGE}\n{config.render_help()}"


def test_bad_key_exits_2_with_the_suggestion_and_no_traceback(run_file):
    path = run_file(GOOD_FILE.replace("learning_rate", "learning_rat"))
    result = mt("run", path, script=True)
    assert result.returncode == 2
    assert result.stderr == (
        f"mt: error: {path}:6: unknown key 'learning_rat'; did you mean 'learning_rate'?\n"
        f"mt: error: {path}: missing required key 'learning_rate': peak learning rate of AdamW\n"
    )
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_override_with_a_wrong_type_exits_2_naming_the_key(run_file):
    result = mt("run", run_file(), "--max-tokens-per-gpu=lots")
    assert result.returncode == 2
    assert result.stderr == (
        'mt: error: command line: max_tokens_per_gpu: expected an integer, got "lots" (a string)\n'
    )


def test_a_good_file_reaches_train_with_the_overrides(run_file, trained):
    cli.main(
        [
            "run",
            run_file(),
            "--seed=7",
            "--use-liger-kernels=true",
            "--learning_rate=3e-4",
            "--pretraining.block_size=128",
            "--lr_scheduler_kwargs={num_cycles: 0.25}",
            "--checkpoint_at_epoch",
        ]
    )
    (args,) = trained
    assert isinstance(args, config.TrainingArgs)
    assert (args.seed, args.use_liger_kernels, args.learning_rate) == (7, True, 3e-4)
    assert args.pretraining == config.PretrainingConfig(block_size=128)
    assert args.lr_scheduler_kwargs == {"num_cycles": 0.25}
    assert args.checkpoint_at_epoch is True
    assert args.model_name_or_path == "models/tiny"


def test_space_separated_values_and_false_work_too(run_file, trained):
    cli.main(["run", run_file(), "--batch_size", "32", "--save_final_checkpoint=false"])
    (args,) = trained
    assert args.batch_size == 32 and args.save_final_checkpoint is False


def test_data_errors_from_training_exit_2_without_traceback(run_file, monkeypatch, capsys):
    def train(args):
        raise DataError(["data.jsonl:3: sample has no input_ids"], header="data.jsonl: 1 bad line")

    monkeypatch.setattr(mt_core, "train", train, raising=False)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", run_file()])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        "mt: error: data.jsonl: 1 bad line\nmt: error: data.jsonl:3: sample has no input_ids\n"
    )


def test_other_exceptions_keep_their_traceback(run_file, monkeypatch):
    def train(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(mt_core, "train", train, raising=False)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["run", run_file()])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["runn", "x.toml"], "mt: error: unknown command 'runn'; did you mean 'run'?"),
        (["run"], "mt: error: run needs a run file"),
        (["run", "missing.toml"], "mt: error: missing.toml: no such run file"),
    ],
)
def test_command_line_mistakes_exit_2(argv, message, capsys, trained):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[0] == message
    assert trained == []


def test_no_arguments_print_the_help(capsys):
    cli.main([])
    out = capsys.readouterr().out
    assert out.startswith(cli.USAGE) and "commands:\n  run" in out


# --- end to end: real training runs of a tiny model, in fresh processes -------------------------

METRIC_KEYS = {
    "step",
    "epoch",
    "samples_seen",
    "tokens",
    "loss",
    "lr",
    "grad_norm",
    "num_minibatches",
    "step_time_s",
    "tokens_per_s",
    "tokens_per_s_per_gpu",
    "mfu",
    "peak_mem_gib",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A folder with a random-init Llama of a few thousand parameters (model/), 12 SFT samples
    (data.jsonl) and a run file for them (run.toml: 5 steps, overridden to 2 by the tests)."""
    import torch  # only the end-to-end tests need the model stack in the test process
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = tmp_path_factory.mktemp("tiny")
    vocab = 64
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder / "model")
    rng = random.Random(0)
    rows = []
    for length in range(5, 17):
        ids = [rng.randrange(vocab) for _ in range(length)]
        rows.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
    (folder / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "run.toml").write_text(
        f"""\
model_name_or_path = {json.dumps(str(folder / "model"))}
data_path = {json.dumps(str(folder / "data.jsonl"))}
output_dir = {json.dumps(str(folder / "out"))}
batch_size = 4
max_tokens_per_gpu = 64
learning_rate = 1e-3
training_mode = "step"
max_steps = 5
attn_backend = "sdpa"
save_final_checkpoint = false
"""
    )
    return folder


def train_run(*args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    """``mt run ...`` as a user types it: ``python -m mt`` alone, or torchrun's ``--no-python mt``
    (both found on PATH beside this interpreter)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        command = [sys.executable, "-m", "mt", "run", *args]
    else:
        command = ["torchrun", f"--nproc-per-node={nproc}", "--no-python", "mt", "run", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def metric_lines(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_writes_its_metrics_and_its_resolved_run_file(tiny, tmp_path):
    out = tmp_path / "out"
    result = train_run(str(tiny / "run.toml"), "--max_steps=2", f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-4000:]
    lines = metric_lines(out)
    assert [line["step"] for line in lines] == [1, 2]
    assert [line["samples_seen"] for line in lines] == [4, 8]  # batch_size 4 per step
    for line in lines:
        assert set(line) >= METRIC_KEYS, METRIC_KEYS - set(line)
        assert line["mfu"] is None  # no MFU on CPU
    resolved = config.load_run_file(out / "run.toml")
    assert resolved == config.load_run_file(
        tiny / "run.toml", {"max_steps": 2, "output_dir": str(out)}
    )
    assert resolved.max_steps == 2


def test_torchrun_with_two_processes_logs_each_step_once(tiny, tmp_path):
    out = tmp_path / "out"
    result = train_run(str(tiny / "run.toml"), "--max_steps=2", f"--output_dir={out}", nproc=2)
    assert result.returncode == 0, result.stderr[-4000:]
    assert [line["step"] for line in metric_lines(out)] == [1, 2]  # rank 0 writes, alone
    progress = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(progress) == 2, result.stdout


def test_a_bad_data_line_exits_2_naming_its_path_and_line(tiny, tmp_path):
    lines = (tiny / "data.jsonl").read_text().splitlines()
    lines[4] = '{"input_ids": [1, 2, 3], "labels": [1, 2]}'
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    result = train_run(str(tiny / "run.toml"), f"--data_path={data}", f"--output_dir={out}")
    assert result.returncode == 2
    assert f"mt: error: {data}:5: 'labels' has 2 entries but 'input_ids' has 3\n" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "metrics.jsonl").exists()
