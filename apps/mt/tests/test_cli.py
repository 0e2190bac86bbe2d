"""The mt command: help, run-file and override mistakes, and real runs of a tiny model. The
torchrun run of `mt run` is in test_export.py, where the same run gives the checkpoint."""

import json
import runpy
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


def test_help_lists_every_key(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["mt", "--help"])
    runpy.run_module("mt", run_name="__main__")  # `python -m mt --help`, in this process: exit 0
    out = capsys.readouterr().out
    assert "usage: mt run RUN.toml [--key=value ...]" in out
    assert "torchrun --nproc-per-node N --no-python mt run RUN.toml" in out
    for name in field_names():
        assert f"\n  {name}  (" in out, name


def test_run_help_is_the_run_file_reference(capsys):
    cli.main(["run", "--help"])  # returns: exit status 0
    assert capsys.readouterr().out == f"{cli.USAGE}\n{config.render_help()}"


def test_bad_key_exits_2_with_the_suggestion_and_no_traceback(run_file, kit):
    # the installed script in a fresh process: its exit status and all it writes are checked
    path = run_file(GOOD_FILE.replace("learning_rate", "learning_rat"))
    result = kit.mt("run", path)
    assert result.returncode == 2
    assert result.stderr == (
        f"mt: error: {path}:6: unknown key 'learning_rat'; did you mean 'learning_rate'?\n"
        f"mt: error: {path}: missing required key 'learning_rate': peak learning rate of AdamW\n"
    )
    assert "Traceback" not in result.stderr and result.stdout == ""


# In a fresh process: help, then a run file's mistake found by `mt run` and by `mt check`; then
# which of the model stack's packages were imported.
WITHOUT_TRAINING = """
import contextlib, sys
from mt.cli import main

for argv in (["--help"], ["run", sys.argv[1]], ["check", sys.argv[1]]):
    with contextlib.suppress(SystemExit):
        main(argv)
print(sorted({name.split(".")[0] for name in sys.modules} & {"torch", "transformers"}))
"""


def test_help_and_run_file_mistakes_do_not_load_torch(run_file):
    """The answers that need no model come in well under a second: torch and transformers (a
    dozen seconds of start-up on a small CPU) are imported by the commands that build one."""
    path = run_file(GOOD_FILE.replace("learning_rate", "learning_rat"))
    done = subprocess.run([sys.executable, "-c", WITHOUT_TRAINING, path], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.stderr.count("unknown key 'learning_rat'") == 2, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"


def test_override_with_a_wrong_type_exits_2_naming_the_key(run_file, trained, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", run_file(), "--max-tokens-per-gpu=lots"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        'mt: error: command line: max_tokens_per_gpu: expected an integer, got "lots" (a string)\n'
    )
    assert trained == []


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


# --- end to end: real training runs of a tiny model -------------------------------------------

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
def tiny_run(tmp_path_factory, tiny_model, kit) -> Path:
    """A run file for 12 SFT samples (data.jsonl beside it) on the tiny model: 5 steps,
    overridden to 2 by the tests."""
    folder = tmp_path_factory.mktemp("tiny")
    data = kit.write_jsonl(folder / "data.jsonl", kit.token_rows(12))
    return kit.run_toml(folder, tiny_model, data, max_steps=5, save_final_checkpoint=False)


def metric_lines(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_writes_its_metrics_and_its_resolved_run_file(tiny_run, tmp_path):
    # one process trains in this one: what `mt run` does alone, without starting Python again
    out = tmp_path / "out"
    cli.main(["run", str(tiny_run), "--max_steps=2", f"--output_dir={out}"])  # returns: exit 0
    lines = metric_lines(out)
    assert [line["step"] for line in lines] == [1, 2]
    assert [line["samples_seen"] for line in lines] == [4, 8]  # batch_size 4 per step
    for line in lines:
        assert set(line) >= METRIC_KEYS, METRIC_KEYS - set(line)
        assert line["mfu"] is None  # no MFU on CPU
    resolved = config.load_run_file(out / "run.toml")
    assert resolved == config.load_run_file(tiny_run, {"max_steps": 2, "output_dir": str(out)})
    assert resolved.max_steps == 2


def test_a_bad_data_line_exits_2_naming_its_path_and_line(tiny_run, tmp_path, capsys):
    lines = (tiny_run.parent / "data.jsonl").read_text().splitlines()
    lines[4] = '{"input_ids": [1, 2, 3], "labels": [1, 2]}'
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    # an exception other than SystemExit (a traceback) fails the test here
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", str(tiny_run), f"--data_path={data}", f"--output_dir={out}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"mt: error: {data}:5: 'labels' has 2 entries but 'input_ids' has 3\n" in err
    assert not (out / "metrics.jsonl").exists()
