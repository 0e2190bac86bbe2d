"""Bad input: every mistake a user can make ends in one clear message (what is wrong, where:
``path:line`` for data, the key for config, and what to do), a non-zero exit without a
traceback, and nothing already in output_dir damaged. And security: weights come from
safetensors only, no pickle is ever unpickled, custom model code runs only when asked for.

The items of issue 5 and their tests (most run ``train`` in-process, which is fast; the command
line's way of showing each error class is proven once by a subprocess test):

=============================================  ===============================================
data_path missing                              test_bad_data_is_one_error[data_path missing]
a line that is not JSON                        test_bad_data_is_one_error[not JSON]
a missing input_ids                            test_bad_data_is_one_error[no input_ids]
labels length differs from input_ids           test_bad_data_is_one_error[labels length]
a non-integer or negative token                test_bad_data_is_one_error[float token],
                                               [string token], [negative token]
a token id >= the model's vocab size           test_bad_data_is_one_error[token >= vocab]
an empty file                                  test_bad_data_is_one_error[empty file]
every sample fully masked                      test_bad_data_is_one_error[all masked]
batch_size smaller than the number of ranks    test_batch_size_below_the_rank_count_is_refused,
                                               test_batch_size_below_the_rank_count_under_torchrun
max_tokens_per_gpu below 1                     test_bad_config_is_one_error[max_tokens_per_gpu 0]
max_tokens_per_gpu below the shortest sample   test_bad_data_is_one_error[all too long]
unknown key                                    test_bad_config_is_one_error[unknown key]
wrong type                                     test_bad_config_is_one_error[wrong type]
model folder missing or without config.json    test_a_bad_model_folder_is_one_error
output_dir not writable                        test_an_unwritable_output_dir_is_one_error
block_size <= 0                                test_bad_config_is_one_error[block_size 0], [-4]
two runs on the same output_dir at once        test_two_runs_on_one_output_dir_at_once
disk full while a checkpoint is written        tests/test_resume.py::
                                               test_disk_full_during_a_checkpoint_keeps_the_previous_one
the command line: one line per problem,        test_the_command_line_shows_user_errors_alone
exit 2, no traceback
a refused run keeps the earlier run.toml       test_a_refused_run_keeps_the_earlier_run_toml
security: pickles in a model folder or a       test_a_pickle_in_the_model_folder_is_never_loaded,
checkpoint, pickled-only weights, custom       test_weights_are_read_from_safetensors_only,
model code, torch.load                         test_a_model_folder_with_only_pickled_weights_...,
                                               test_custom_model_code_*,
                                               test_a_pickle_in_a_checkpoint_is_never_loaded,
                                               test_every_torch_load_passes_weights_only_true
=============================================  ===============================================
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from mt.cli import run as mt_run
from mt_core import ConfigError, RunError, load_run_file, train
from mt_data import DataError, DataWarning

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
VOCAB = 32

# The tiny run every test starts from; a test changes one thing.
KEYS = {
    "model_name_or_path": "model",
    "data_path": "data.jsonl",
    "output_dir": "unused",
    "batch_size": 4,
    "max_tokens_per_gpu": 32,
    "learning_rate": 1e-3,
    "training_mode": "step",
    "max_steps": 2,
    "seed": 1,
    "attn_backend": "sdpa",
    "save_final_checkpoint": False,
}


def rows(count: int = 12) -> list[dict]:
    out = []
    for i in range(count):
        tokens = [(3 * i + j) % (VOCAB - 1) + 1 for j in range(5 + i % 5)]
        out.append({"input_ids": tokens, "labels": [-100] + tokens[1:]})
    return out


def jsonl(items: list[dict]) -> str:
    return "".join(json.dumps(item) + "\n" for item in items)


def write_run_file(path: Path, keys: dict, extra: str = "") -> Path:
    text = "".join(f"{key} = {json.dumps(value)}\n" for key, value in keys.items())
    path.write_text(text + extra)
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny Llama, good data, the run file, and ``earlier/``: the output of an earlier run
    (metrics, the resolved run.toml, a training-state checkpoint, an HF export)."""
    root = tmp_path_factory.mktemp("bad_input")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "model")
    (root / "data.jsonl").write_text(jsonl(rows()))
    keys = dict(KEYS, model_name_or_path=str(root / "model"), data_path=str(root / "data.jsonl"))
    write_run_file(root / "run.toml", keys)
    earlier = {"output_dir": str(root / "earlier"), "checkpoint_every_steps": 1,
               "save_final_checkpoint": True, "save_dtype": "float32"}  # fmt: skip
    train(load_run_file(root / "run.toml", earlier))
    (root / "earlier" / "notes.txt").write_text("the user's own file\n")
    return root


def contents(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes, but the lock file (rewritten by each run)."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != ".mt.lock"
    }


@pytest.fixture
def earlier(workspace, tmp_path) -> tuple[Path, dict[str, bytes]]:
    """A copy of the earlier run's output_dir, and what it holds."""
    out = tmp_path / "out"
    shutil.copytree(workspace / "earlier", out, symlinks=True)
    before = contents(out)
    assert {"metrics.jsonl", "run.toml", "notes.txt"} <= set(before)
    assert any(name.startswith("checkpoints/step_1/") for name in before)
    assert any(name.startswith("hf_format/") for name in before)
    return out, before


def assert_intact(out: Path, before: dict[str, bytes], *, run_toml: bool = False) -> None:
    """Every file the earlier run left is still there, byte for byte (run.toml only when
    ``run_toml``: see RUN_TOML_WRITTEN_TOO_EARLY)."""
    after = contents(out)
    for name, data in before.items():
        if name == "run.toml" and not run_toml:
            continue
        assert after.get(name) == data, f"{name} was changed or removed"


def refused(workspace: Path, error: type[Exception], **overrides) -> str:
    """Reads the run file with ``overrides`` and trains in-process; returns the message of
    ``error``, which must be raised, and no DataWarning before it (one message, not several)."""
    with warnings.catch_warnings(record=True) as caught, pytest.raises(error) as raised:
        warnings.simplefilter("always")
        train(load_run_file(workspace / "run.toml", overrides))
    assert not [w for w in caught if issubclass(w.category, DataWarning)]
    message = str(raised.value)
    assert message and "Traceback" not in message
    return message


def line_of(run_file: Path, key: str) -> int:
    lines = run_file.read_text().splitlines()
    return next(n for n, text in enumerate(lines, 1) if text.split("=")[0].strip() == key)


def mt(*arguments: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(["mt", *arguments], env=ENV, text=True, **popen)


# ---------------------------------------------------------------------------------------------
# Data


GOOD = jsonl(rows(3))
BAD_DATA = {
    # id: (the file's text, overrides, what the message must say; {path} is the data file)
    "data_path missing": (
        None, {}, ["{path}: data_path does not exist or is not a file", "set data_path to"],
    ),
    "not JSON": (
        GOOD + '{"input_ids": [1, 2, 3], "labels": [1, 2, 3]\n' + GOOD,
        {}, ["{path}:4: invalid JSON", "nothing was built"],
    ),
    "no input_ids": (
        GOOD + '{"labels": [1, 2, 3]}\n', {}, ["{path}:4: missing field 'input_ids'"],
    ),
    "labels length": (
        GOOD + '{"input_ids": [1, 2, 3], "labels": [-100, 2]}\n' + GOOD,
        {}, ["{path}:4: 'labels' has 2 entries but 'input_ids' has 3"],
    ),
    "float token": (
        '{"input_ids": [1, 2.5, 3], "labels": [-100, 2, 3]}\n' + GOOD,
        {}, ["{path}:1: 'input_ids' must be a list of integers, but position 1 holds 2.5"],
    ),
    "string token": (
        GOOD + GOOD + '{"input_ids": [1, "2", 3], "labels": [-100, 2, 3]}\n',
        {}, ["{path}:7: 'input_ids' must be a list of integers, but position 1 holds \"2\""],
    ),
    "negative token": (
        GOOD + '{"input_ids": [1, -7, 3], "labels": [-100, -100, 3]}\n',
        {}, ["{path}:4: token id -7 at position 1 in 'input_ids' is negative"],
    ),
    "token >= vocab": (
        GOOD + '{"input_ids": [1, 40, 3], "labels": [-100, 40, 3]}\n',
        {}, [f"{{path}}:4: token id 40 at position 1 is >= the model's vocabulary size {VOCAB}",
             "tokenized with this model's tokenizer"],
    ),
    "empty file": ("", {}, ["{path}: no samples (the file is empty"]),
    "all masked": (
        jsonl([{"input_ids": r["input_ids"], "labels": [-100] * len(r["input_ids"])}
               for r in rows(4)]),
        {}, ["{path}: no sample is left to train on", "-100 (nothing to learn)",
             "give samples labels to learn"],
    ),
    "all too long": (
        jsonl(rows()), {"max_tokens_per_gpu": 4},
        ["{path}: no sample is left to train on: all 12 sample(s) are longer than "
         "max_tokens_per_gpu=4 (the shortest has 5 tokens); raise max_tokens_per_gpu to at least 5"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_one_error(workspace, earlier, case):
    text, overrides, expected = BAD_DATA[case]
    out, before = earlier
    data = out.parent / "data.jsonl"
    if text is not None:
        data.write_text(text)
    message = refused(workspace, DataError, output_dir=str(out), data_path=str(data), **overrides)
    for part in expected:
        assert part.format(path=data) in message, message
    assert_intact(out, before)


def test_batch_size_below_the_rank_count_is_refused(workspace, tmp_path):
    """Two ranks and batch_size 1: a rank would get no sample in any step. Checked with two
    ranks as build_data sees them (a real 2-rank job gives the same message on each rank)."""
    from mt_core.trainer.data import build_data
    from mt_fsdp import DistContext

    ranks = DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), mesh=None)
    args = load_run_file(workspace / "run.toml", {"batch_size": 1, "output_dir": str(tmp_path)})
    with pytest.raises(ConfigError) as raised:
        build_data(args, ranks, VOCAB, tmp_path)
    assert str(raised.value) == (
        "batch_size: 1 is less than the 2 ranks of this run, so some rank would get no sample "
        "in any step; set batch_size to at least 2 or start fewer processes"
    )
    args = load_run_file(workspace / "run.toml", {"batch_size": 2, "output_dir": str(tmp_path)})
    assert len(build_data(args, ranks, VOCAB, tmp_path).train) == 12  # 2 ranks, 2 samples: fine


@pytest.mark.slow(15)
def test_batch_size_below_the_rank_count_under_torchrun(workspace, earlier):
    """The same with a real 2-rank job: both ranks stop with the message, the user reads it once
    (mt_core.errors.report_error), and no traceback of ours (torchrun then adds its
    ChildFailedError report, which is torchrun's, and exits 1)."""
    out, before = earlier
    command = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "--no-python", "mt",
               "run",
               str(workspace / "run.toml"), f"--output_dir={out}", "--batch_size=1"]  # fmt: skip
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("mt: ")]
    assert ours == [
        "mt: error: command line: batch_size: 1 is less than the 2 ranks of this run, so some "
        "rank would get no sample in any step; set batch_size to at least 2 or start fewer "
        "processes"
    ]
    assert "mt_core" not in result.stderr  # no frame of mt's code: no traceback of ours
    assert_intact(out, before)


# ---------------------------------------------------------------------------------------------
# Configuration


BAD_CONFIG = {
    # id: (keys changed, text appended, the key whose line is named, what the message says)
    "unknown key": (
        {}, "learning_rat = 0.1\n", "learning_rat",
        "unknown key 'learning_rat'; did you mean 'learning_rate'?",
    ),
    "wrong type": ({"batch_size": "4"}, "", "batch_size", "batch_size: expected an integer"),
    "max_tokens_per_gpu 0": (
        {"max_tokens_per_gpu": 0}, "", "max_tokens_per_gpu", "max_tokens_per_gpu: must be > 0",
    ),
    "block_size 0": (
        {}, "[pretraining]\nblock_size = 0\n", "block_size", "pretraining.block_size: must be > 1",
    ),
    "block_size -4": (
        {}, "[pretraining]\nblock_size = -4\n", "block_size",
        "pretraining.block_size: must be > 1, got -4",
    ),
    "OSFT ratio above 1": (
        {"osft": True, "osft_unfreeze_rank_ratio": 1.5}, "", "osft_unfreeze_rank_ratio",
        "osft_unfreeze_rank_ratio: must be <= 1, got 1.5",
    ),
    "OSFT patterns that match nothing": (
        {"osft": True, "osft_unfreeze_rank_ratio": 0.5, "osft_target_patterns": ["*.nothing"]},
        "", "osft_target_patterns", "osft_target_patterns: '*.nothing' match no module",
    ),
    "OSFT target that is not 2-D": (
        {"osft": True, "osft_unfreeze_rank_ratio": 0.5,
         "osft_target_patterns": ["*.input_layernorm"]},
        "", "osft_target_patterns", "whose weight is 1-D (16,); OSFT targets 2-D matrices only",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_CONFIG))
def test_bad_config_is_one_error(workspace, earlier, case):
    changed, appended, key, expected = BAD_CONFIG[case]
    out, before = earlier
    keys = dict(KEYS, model_name_or_path=str(workspace / "model"),
                data_path=str(workspace / "data.jsonl"), output_dir=str(out), **changed)  # fmt: skip
    run = write_run_file(out.parent / "bad.toml", keys, appended)
    line = line_of(run, key)
    with pytest.raises(ConfigError) as raised:
        mt_run(str(run))  # what `mt run` does: checks needing the model are placed too
    assert str(raised.value).startswith(f"{run}:{line}: "), str(raised.value)
    assert expected in str(raised.value)
    assert len(raised.value.problems) == 1
    assert_intact(out, before, run_toml=True)


def test_a_bad_model_folder_is_one_error(workspace, earlier, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never the network
    out, before = earlier
    no_config = out.parent / "no_config"
    no_config.mkdir()
    shutil.copy(workspace / "model" / "model.safetensors", no_config)
    for folder, expected in [
        (out.parent / "nowhere", "is not a folder"),
        (no_config, "has no config.json; give a HF model folder"),
    ]:
        message = refused(workspace, ConfigError, output_dir=str(out),
                          model_name_or_path=str(folder))  # fmt: skip
        assert message == f"model_name_or_path: {folder} {expected}"
        assert_intact(out, before)


@pytest.mark.parametrize("how", ["read-only folder", "below a file", "a file"])
def test_an_unwritable_output_dir_is_one_error(workspace, earlier, how):
    out, before = earlier
    if how == "read-only folder":
        if os.geteuid() == 0:
            pytest.skip("root writes to read-only folders; 'below a file' covers root")
        target = out
        out.chmod(0o555)
    elif how == "below a file":  # mkdir fails, even for root
        target = out / "notes.txt" / "run"
    else:
        target = out / "notes.txt"
    try:
        message = refused(workspace, ConfigError, output_dir=str(target))
    finally:
        out.chmod(0o755)
    expected = {
        "read-only folder": f"output_dir: cannot write to {target} (Permission denied); "
        "choose a writable folder",
        "below a file": f"output_dir: cannot write to {target} (Not a directory); "
        "choose a writable folder",
        "a file": f"output_dir: {target} is a file, not a folder; choose a folder",
    }
    assert message == expected[how]
    assert_intact(out, before, run_toml=True)


@pytest.mark.parametrize("mistake", ["data", "model"])
def test_a_refused_run_keeps_the_earlier_run_toml(workspace, earlier, mistake):
    """The resolved run.toml describes the run whose checkpoints lie beside it; a run refused
    for bad data or a bad model must not replace it."""
    out, before = earlier
    bad = out.parent / "bad.jsonl"
    bad.write_text("not json\n")
    overrides = {"data_path": str(bad)} if mistake == "data" else {
        "model_name_or_path": str(out.parent / "nowhere")}  # fmt: skip
    refused(workspace, DataError if mistake == "data" else ConfigError, output_dir=str(out),
            **overrides)  # fmt: skip
    assert_intact(out, before, run_toml=True)


# ---------------------------------------------------------------------------------------------
# Through the command line, and two runs at once


@pytest.mark.slow(10)
def test_the_command_line_shows_user_errors_alone(workspace, earlier):
    """One ``mt: error:`` line per problem on stderr, exit 2, no traceback: for a run-file
    mistake (found before torch loads) and a data mistake (found by the run)."""
    out, before = earlier
    bad_run = write_run_file(out.parent / "typo.toml", dict(KEYS, batch_sizee=4))
    bad_data = out.parent / "bad.jsonl"
    bad_data.write_text(GOOD + "{]\n")
    for arguments, expected in [
        ((str(bad_run),), [f"mt: error: {bad_run}:{line_of(bad_run, 'batch_sizee')}: unknown "
                           "key 'batch_sizee'; did you mean 'batch_size'?"]),
        ((str(workspace / "run.toml"), f"--output_dir={out}", f"--data_path={bad_data}"),
         [f"mt: error: {bad_data}: 1 problem(s); nothing was built",
          f"mt: error: {bad_data}:4: invalid JSON: Expecting property name enclosed in double "
          "quotes (column 2)"]),
    ]:  # fmt: skip
        process = mt("run", *arguments, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 2, stderr
        assert stderr.splitlines() == expected
        assert "Traceback" not in stdout + stderr
    assert_intact(out, before)


@pytest.mark.slow(15)
def test_two_runs_on_one_output_dir_at_once(workspace, tmp_path):
    """Two real runs started together on one output_dir: the lock lets exactly one in, the
    other refuses ('in use', exit 2) at once; the first trains on (stopped here by SIGTERM,
    which ends it with a checkpoint and exit 0)."""
    out = tmp_path / "shared"
    logs = []
    processes = []
    for name in ("a", "b"):
        stdout, stderr = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        logs.append((stdout, stderr))
        with open(stdout, "w") as o, open(stderr, "w") as e:
            processes.append(mt("run", str(workspace / "run.toml"), f"--output_dir={out}",
                                "--max_steps=1000000", "--lr_scheduler=constant",
                                stdout=o, stderr=e))  # fmt: skip
    try:
        deadline = time.time() + 120
        while all(p.poll() is None for p in processes) and time.time() < deadline:
            time.sleep(0.1)
        (loser,) = [i for i, p in enumerate(processes) if p.poll() is not None]
        winner = 1 - loser
        assert processes[loser].returncode == 2, logs[loser][1].read_text()
        refusal = logs[loser][1].read_text()
        assert refusal.startswith(
            f"mt: error: command line: output_dir: {out} is in use by another run (pid "
        )
        assert len(refusal.splitlines()) == 1 and "Traceback" not in refusal
        metrics = out / "metrics.jsonl"
        while time.time() < deadline and not (metrics.is_file() and metrics.read_text()):
            assert processes[winner].poll() is None, logs[winner][1].read_text()
            time.sleep(0.1)
        processes[winner].send_signal(signal.SIGTERM)
        assert processes[winner].wait(timeout=120) == 0, logs[winner][1].read_text()
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert "run the same command again to resume" in logs[winner][0].read_text()
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # one writer: each step once


# ---------------------------------------------------------------------------------------------
# Security


class Payload:
    """Unpickling this creates ``marker``: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def payload(marker: Path) -> bytes:
    """A pickle whose loading creates ``marker``, checked to be live (it does create one)."""
    data = pickle.dumps(Payload(marker))
    check = marker.with_name(marker.name + ".check")
    pickle.loads(pickle.dumps(Payload(check))).close()
    assert check.is_file()  # the payload works: its absence below means it was never loaded
    check.unlink()
    return data


def test_a_pickle_in_the_model_folder_is_never_loaded(workspace, tmp_path):
    marker = tmp_path / "pickle-was-loaded"
    model = tmp_path / "model"
    shutil.copytree(workspace / "model", model)
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt"):
        (model / name).write_bytes(payload(marker))
    overrides = {"output_dir": str(tmp_path / "out"), "model_name_or_path": str(model),
                 "save_final_checkpoint": True, "save_dtype": "float32"}  # fmt: skip
    result = train(load_run_file(workspace / "run.toml", overrides))
    assert result.steps == 2
    assert not marker.exists()
    (export,) = (tmp_path / "out" / "hf_format").iterdir()
    assert not list(export.glob("*.bin")) and list(export.glob("*.safetensors"))


def test_weights_are_read_from_safetensors_only(tmp_path):
    from mt_fsdp.load import safetensors_files

    (tmp_path / "pytorch_model.bin").write_bytes(payload(tmp_path / "marker"))
    with pytest.raises(ValueError) as raised:
        safetensors_files(tmp_path)
    assert str(raised.value).startswith(
        f"{tmp_path} holds no *.safetensors weights (it has pytorch_model.bin); mt reads "
        "weights from safetensors only"
    )
    assert not (tmp_path / "marker").exists()


def test_a_model_folder_with_only_pickled_weights_is_one_error(workspace, earlier):
    out, before = earlier
    model = out.parent / "pickled"
    model.mkdir()
    shutil.copy(workspace / "model" / "config.json", model)
    marker = out.parent / "pickle-was-loaded"
    (model / "pytorch_model.bin").write_bytes(payload(marker))
    message = refused(workspace, ConfigError, output_dir=str(out), model_name_or_path=str(model))
    assert message.startswith(f"model_name_or_path: {model} holds no *.safetensors weights")
    assert "safetensors only" in message
    assert not marker.exists()
    assert_intact(out, before)


def custom_code_model(workspace: Path, folder: Path, marker: Path, model_type: str) -> Path:
    """A model folder whose config.json points (auto_map) at modeling code that creates
    ``marker`` when imported."""
    shutil.copytree(workspace / "model", folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "modeling_custom.CustomConfig",
                          "AutoModelForCausalLM": "modeling_custom.CustomModel"}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    return folder


def test_custom_model_code_runs_only_with_trust_remote_code(workspace, tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dynamic

    marker = tmp_path / "custom-code-ran"
    # A model of a type transformers knows: its own code is used, the shipped code never runs.
    known = custom_code_model(workspace, tmp_path / "known", marker, "llama")
    overrides = {"output_dir": str(tmp_path / "out"), "model_name_or_path": str(known)}
    assert train(load_run_file(workspace / "run.toml", overrides)).steps == 2
    # A type only the shipped code defines: refused without trust_remote_code.
    unknown = custom_code_model(workspace, tmp_path / "unknown", marker, "mt_custom_test")
    overrides = {"output_dir": str(tmp_path / "out2"), "model_name_or_path": str(unknown)}
    with pytest.raises((ConfigError, ValueError), match="trust_remote_code"):
        train(load_run_file(workspace / "run.toml", overrides))
    assert not marker.exists()
    # The same folder with trust_remote_code = true does import it (so the test could fail);
    # transformers copies the code to its module cache: a temporary one here.
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(Exception):  # noqa: B017 - the stub code defines no classes
        train(load_run_file(workspace / "run.toml", {**overrides, "trust_remote_code": True}))
    assert marker.exists()


def test_custom_model_code_without_trust_remote_code_is_one_error(workspace, earlier):
    out, before = earlier
    marker = out.parent / "custom-code-ran"
    model = custom_code_model(workspace, out.parent / "custom", marker, "mt_custom_test")
    message = refused(workspace, ConfigError, output_dir=str(out), model_name_or_path=str(model))
    assert message.startswith(f"model_name_or_path: {model} ")
    assert "trust_remote_code = true" in message
    assert not marker.exists()
    assert_intact(out, before)


def test_a_pickle_in_a_checkpoint_is_never_loaded(workspace, tmp_path):
    """Resuming from a checkpoint folder someone else wrote must not run code from it."""
    marker = tmp_path / "pickle-was-loaded"
    checkpoint = tmp_path / "step_1"
    shutil.copytree(workspace / "earlier" / "checkpoints" / "step_1", checkpoint)
    (checkpoint / ".metadata").write_bytes(payload(marker))
    overrides = {"output_dir": str(tmp_path / "out"), "resume": str(checkpoint)}
    with pytest.raises(RunError, match=f"{checkpoint}: cannot resume from this checkpoint"):
        train(load_run_file(workspace / "run.toml", overrides))
    assert not marker.exists()


def torch_load_problems(source: str, where: str) -> list[str]:
    """Every ``torch.load(...)`` call of ``source`` without ``weights_only=True``, and every
    direct unpickling (pickle.load/loads/Unpickler, np.load with allow_pickle=True)."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = ast.unparse(func)
        keywords = {k.arg: k.value for k in node.keywords}
        if name in ("torch.load", "load") or name.endswith(".torch.load"):
            if name == "load" and "from torch import load" not in source:
                continue
            value = keywords.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                problems.append(f"{where}:{node.lineno}: {name}(...) without weights_only=True")
        elif name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load",
                      "joblib.load", "cloudpickle.load", "cloudpickle.loads"):  # fmt: skip
            problems.append(f"{where}:{node.lineno}: {name}(...) unpickles")
        elif name in ("np.load", "numpy.load"):
            value = keywords.get("allow_pickle")
            if isinstance(value, ast.Constant) and value.value is True:
                problems.append(f"{where}:{node.lineno}: {name}(..., allow_pickle=True)")
    return problems


def test_the_scan_finds_unsafe_loads():
    bad = (
        "import torch, pickle, numpy as np\n"
        "torch.load(f)\n"
        "torch.load(f, weights_only=False)\n"
        "torch.load(f, map_location='cpu', weights_only=True)\n"
        "pickle.loads(b)\n"
        "np.load(p, allow_pickle=True)\n"
        "np.load(p)\n"
    )
    assert torch_load_problems(bad, "x.py") == [
        "x.py:2: torch.load(...) without weights_only=True",
        "x.py:3: torch.load(...) without weights_only=True",
        "x.py:5: pickle.loads(...) unpickles",
        "x.py:6: np.load(..., allow_pickle=True)",
    ]


def test_every_torch_load_passes_weights_only_true():
    """A scan of the source of every package and app (tests included): no torch.load without
    weights_only=True, no direct unpickling."""
    files = sorted(
        path
        for top in ("packages", "apps")
        for path in (ROOT / top).rglob("*.py")
        if ".venv" not in path.parts and "build" not in path.parts
    )
    assert len(files) > 30  # the scan sees the code base
    problems = [
        problem
        for path in files
        for problem in torch_load_problems(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert problems == []
