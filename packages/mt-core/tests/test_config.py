import math
import os
import socket

import attrs
import pytest

from mt_core.config import (
    ATTN_BACKENDS,
    DTYPES,
    FLOAT8_RECIPES,
    OPTIMIZER_STATE_DTYPES,
    ConfigError,
    PretrainingConfig,
    TrainingArgs,
    args_from_dict,
    args_to_dict,
    load_run_file,
    render_help,
    write_run_file,
)

REQUIRED = {
    "model_name_or_path": "models/tiny",
    "data_path": "data.jsonl",
    "output_dir": "out",
    "batch_size": 8,
    "max_tokens_per_gpu": 256,
    "learning_rate": 1e-5,
}

GOOD_FILE = """\
# the smallest valid run file
model_name_or_path = "models/tiny"
data_path = "data.jsonl"
output_dir = "out"
batch_size = 8
max_tokens_per_gpu = 256
learning_rate = 1e-5
"""


@pytest.fixture
def run_file(tmp_path):
    """``run_file(text)`` -> path of a run file holding ``text``."""

    def write(text: str):
        path = tmp_path / "run.toml"
        path.write_text(text)
        return path

    return write


def problems_of(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as error:
        args_from_dict(data)
    return error.value.problems


def test_defaults_are_mini_trainers_and_mts_own():
    args = args_from_dict(REQUIRED)
    # mini_trainer's TrainingArgs defaults
    assert args.num_warmup_steps == 0
    assert args.lr_scheduler == "cosine"
    assert args.lr_scheduler_kwargs == {}
    assert args.seed == 42
    assert (args.beta1, args.beta2, args.eps, args.weight_decay) == (0.9, 0.95, 1e-8, 0.0)
    assert args.training_mode == "epoch"
    assert (args.max_epochs, args.max_steps, args.max_tokens) == (1, 0, 0)
    assert args.min_samples_per_checkpoint is None
    assert args.checkpoint_at_epoch is False
    assert args.save_final_checkpoint is True
    assert args.save_dtype is None
    assert args.train_dtype == "float32"
    assert (args.wandb_project, args.wandb_run_name, args.wandb_entity) == (None, None, None)
    assert args.pretraining is None
    assert args.trust_remote_code is False
    # mt's own
    assert args.use_liger_kernels is None  # auto
    assert args.max_grad_norm == 1.0
    assert args.activation_checkpointing is False
    assert args.cpu_offload is None  # the fit decides on a GPU (off unless nothing else fits)
    assert args.activation_offload is None  # the fit decides on a GPU
    assert args.attn_backend == "auto"
    assert args.too_long_samples == "drop"
    assert args.data_cache_dir is None  # output_dir/data_cache, shared by the nodes
    assert args.collective_timeout == 180.0


def test_collective_timeout_is_much_shorter_than_pytorchs():
    """A lost node holds every GPU of the job for this long: PyTorch's own NCCL default (10
    minutes; gloo's is 30) is more than three times the default."""
    from torch.distributed.constants import default_pg_nccl_timeout, default_pg_timeout

    default = args_from_dict(REQUIRED).collective_timeout
    assert default * 3 <= default_pg_nccl_timeout.total_seconds()
    assert default * 10 <= default_pg_timeout.total_seconds()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "collective_timeout: must be > 0, got 0"),
        ("-30", "collective_timeout: must be > 0, got -30"),
        ("inf", "collective_timeout: must be a finite number, got inf"),
        ('"3m"', 'collective_timeout: expected a float, got "3m" (a string)'),
    ],
)
def test_a_bad_collective_timeout_names_the_run_file_and_key(run_file, value, message):
    path = run_file(f"{GOOD_FILE}collective_timeout = {value}\n")
    with pytest.raises(ConfigError) as error:
        load_run_file(path)
    assert error.value.problems == [f"{path}:8: {message}"]


def test_data_cache_dir_expands_this_nodes_variables(monkeypatch, tmp_path):
    from mt_core.trainer.data import data_cache_dir

    args = args_from_dict({**REQUIRED, "output_dir": str(tmp_path / "out")})
    assert data_cache_dir(args) == tmp_path / "out" / "data_cache"
    monkeypatch.setenv("NODE_SCRATCH", str(tmp_path / "scratch"))
    args = args_from_dict({**REQUIRED, "data_cache_dir": "${NODE_SCRATCH}/mt-data"})
    assert data_cache_dir(args) == tmp_path / "scratch" / "mt-data"
    monkeypatch.delenv("NODE_SCRATCH")
    with pytest.raises(ConfigError) as error:
        data_cache_dir(args)
    assert error.value.problems == [
        f"data_cache_dir: $NODE_SCRATCH is not set on {socket.gethostname()}; set it in the "
        "environment of every node, or give a folder without it"
    ]


def test_choice_lists_match_the_modules_that_use_them():
    # spelled out in the config so reading a run file imports no torch; these keep them in step
    from transformers import SchedulerType

    from mt_core.config.schedulers import SCHEDULERS, usable_scheduler
    from mt_core.model.attention import ATTN_BACKENDS as backends
    from mt_core.model.build import TORCH_DTYPES
    from mt_core.model.float8 import RECIPES
    from mt_core.optim.build import STATE_DTYPES

    assert backends == ATTN_BACKENDS
    assert set(DTYPES) == set(TORCH_DTYPES)
    assert tuple(STATE_DTYPES) == OPTIMIZER_STATE_DTYPES
    assert RECIPES == FLOAT8_RECIPES
    # every schedule of transformers but those refused with their reason
    assert tuple(s.value for s in SchedulerType if usable_scheduler(s.value) is None) == SCHEDULERS


def test_stochastic_rounding_needs_bfloat16_weights_and_says_so():
    with pytest.raises(ConfigError) as caught:
        TrainingArgs(**REQUIRED, stochastic_rounding=True)  # train_dtype float32 by default
    message = str(caught.value)
    assert "stochastic_rounding" in message and "train_dtype = 'bfloat16'" in message
    assert "'float32'" in message
    args = TrainingArgs(**REQUIRED, stochastic_rounding=True, train_dtype="bfloat16")
    assert args.stochastic_rounding and args.optimizer_state_dtype is None  # not set: as today
    with pytest.raises(ConfigError, match=r"optimizer_state_dtype.*'int8'.*8bit"):
        TrainingArgs(**REQUIRED, optimizer_state_dtype="int8")


def test_torchao_missing_is_one_clear_error_before_any_weight(monkeypatch):
    import sys

    import torch

    from mt_core.optim.build import check_optimizer

    monkeypatch.setitem(sys.modules, "mt_core.optim.low_precision", None)  # as if not installed
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match=r"optimizer_state_dtype = '8bit' needs torchao.*"
                                          r"pip install 'mt-core\[torchao\]'"):  # fmt: skip
        check_optimizer("8bit", False, torch.float32, cpu)
    with pytest.raises(ConfigError, match=r"stochastic_rounding = true needs torchao"):
        check_optimizer(None, True, torch.bfloat16, cpu)
    # today's choices need nothing more: float32 moments of float32 weights, bfloat16 of bfloat16
    check_optimizer("float32", False, torch.float32, cpu)
    check_optimizer("bfloat16", False, torch.bfloat16, cpu)
    check_optimizer(None, False, torch.bfloat16, cpu)


def test_every_field_has_help():
    for cls in (TrainingArgs, PretrainingConfig):
        for field in attrs.fields(cls):
            assert field.metadata["help"].strip(), field.name


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("batch_size", 0, "batch_size: must be > 0, got 0"),
        ("max_tokens_per_gpu", -5, "max_tokens_per_gpu: must be > 0, got -5"),
        ("learning_rate", 0.0, "learning_rate: must be > 0, got 0.0"),
        ("learning_rate", math.inf, "learning_rate: must be a finite number, got inf"),
        ("beta1", 1.0, "beta1: must be < 1, got 1.0"),
        ("beta2", -0.1, "beta2: must be >= 0, got -0.1"),
        ("eps", 0.0, "eps: must be > 0, got 0.0"),
        ("weight_decay", -1.0, "weight_decay: must be >= 0, got -1.0"),
        ("max_grad_norm", -1.0, "max_grad_norm: must be >= 0, got -1.0"),
        ("num_warmup_steps", -1, "num_warmup_steps: must be >= 0, got -1"),
        ("seed", -1, "seed: must be >= 0, got -1"),
        ("max_epochs", 0, "max_epochs: must be > 0, got 0"),
        ("max_steps", -1, "max_steps: must be >= 0, got -1"),
        ("max_tokens", -1, "max_tokens: must be >= 0, got -1"),
        ("min_samples_per_checkpoint", 0, "min_samples_per_checkpoint: must be > 0, got 0"),
        ("model_name_or_path", " ", "model_name_or_path: must not be empty"),
        (
            "training_mode",
            "steps",
            "'steps' is not one of epoch, step, token, infinite; did you mean 'step'?",
        ),
        ("attn_backend", "flash", "'flash' is not one of auto, flash_attn, torch_varlen, sdpa"),
        ("too_long_samples", "skip", "'skip' is not one of drop, error"),
        ("train_dtype", "bf16", "'bf16' is not one of float32, bfloat16, float16"),
        ("save_dtype", "fp16", "'fp16' is not one of float32, bfloat16, float16"),
        ("lr_scheduler", "cosin", "did you mean 'cosine'?"),
        ("lr_scheduler", "reduce_lr_on_plateau", "steps on a metric"),
        ("lr_scheduler_kwargs", {1: 2}, "lr_scheduler_kwargs: keys must be strings, got 1"),
    ],
)
def test_each_value_check_names_the_key_and_the_value(key, value, message):
    (problem,) = problems_of({**REQUIRED, key: value})
    assert problem.startswith(f"<dict>: {key}: ")
    assert message in problem


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("batch_size", "8", 'batch_size: expected an integer, got "8" (a string); drop the quotes'),
        ("batch_size", 8.0, "batch_size: expected an integer, got 8.0 (a float)"),
        ("batch_size", True, "batch_size: expected an integer, got true (a boolean)"),
        ("learning_rate", False, "learning_rate: expected a float, got false (a boolean)"),
        ("cpu_offload", 1, "cpu_offload: expected a boolean, got 1 (an integer)"),
        ("use_liger_kernels", "yes", 'use_liger_kernels: expected a boolean, got "yes"'),
        ("output_dir", 2024, "output_dir: expected a string, got 2024 (an integer); quote it"),
        ("lr_scheduler_kwargs", [1], "lr_scheduler_kwargs: expected a table, got [1] (an array)"),
        ("pretraining", 512, "pretraining: expected a table, got 512 (an integer)"),
    ],
)
def test_a_wrong_type_names_the_key_the_expected_type_and_the_value(key, value, message):
    (problem,) = problems_of({**REQUIRED, key: value})
    assert problem == f"<dict>: {message}" or problem.startswith(f"<dict>: {message}")


def test_an_integral_float_for_an_integer_key_suggests_the_integer_spelling():
    (problem,) = problems_of({**REQUIRED, "max_tokens": 1e9})
    assert problem.endswith("write it as an integer, e.g. 1_000_000_000")


def test_an_integer_is_accepted_for_a_float_key_and_stored_as_float():
    args = args_from_dict({**REQUIRED, "learning_rate": 1, "weight_decay": 0})
    assert args.learning_rate == 1.0 and isinstance(args.learning_rate, float)
    assert isinstance(args.weight_decay, float)


def test_unknown_key_names_the_nearest_valid_key_with_path_and_line(run_file):
    path = run_file(GOOD_FILE.replace("learning_rate", "learning_rat"))
    with pytest.raises(ConfigError) as error:
        load_run_file(path)
    assert error.value.problems[0] == (
        f"{path}:7: unknown key 'learning_rat'; did you mean 'learning_rate'?"
    )


def test_unknown_key_without_a_near_one_points_to_help():
    (problem,) = problems_of({**REQUIRED, "zzzz": 1})
    assert problem == "<dict>: unknown key 'zzzz'; `mt run --help` lists every key"


def test_block_size_at_top_level_is_sent_to_the_pretraining_table():
    (problem,) = problems_of({**REQUIRED, "block_size": 512})
    assert "belongs in the [pretraining] table (pretraining.block_size)" in problem


def test_missing_required_key_says_which_and_what_it_is_for(run_file):
    path = run_file(GOOD_FILE.replace("batch_size = 8\n", ""))
    with pytest.raises(ConfigError) as error:
        load_run_file(path)
    assert error.value.problems == [
        f"{path}: missing required key 'batch_size': samples per optimizer step, over all GPUs "
        "together (the global batch)"
    ]


def test_wrong_type_in_a_file_points_at_its_line(run_file):
    path = run_file(GOOD_FILE.replace("batch_size = 8", 'batch_size = "8"'))
    with pytest.raises(ConfigError, match=rf"^{path}:5: batch_size: expected an integer"):
        load_run_file(path)


def test_every_problem_of_a_file_is_reported_at_once(run_file):
    text = GOOD_FILE.replace("batch_size = 8", "batch_size = 0").replace("learning_rate", "lr")
    path = run_file(text + "cpu_offload = 1\n")
    with pytest.raises(ConfigError) as error:
        load_run_file(path)
    assert error.value.problems == [
        f"{path}:5: batch_size: must be > 0, got 0",
        f"{path}:7: unknown key 'lr'; `mt run --help` lists every key",
        f"{path}:8: cpu_offload: expected a boolean, got 1 (an integer)",
        f"{path}: missing required key 'learning_rate': peak learning rate of AdamW",
    ]


def test_toml_syntax_error_points_at_path_and_line(run_file):
    path = run_file(GOOD_FILE + "seed = = 3\n")
    with pytest.raises(ConfigError, match=rf"^{path}:8: invalid TOML: .*\(column 8\)$"):
        load_run_file(path)
    path = run_file(GOOD_FILE + 'wandb_project = "unterminated')
    with pytest.raises(
        ConfigError, match=rf"^{path}:8: invalid TOML: .*\(at the end of the file\)$"
    ):
        load_run_file(path)


def test_missing_run_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.toml: no such run file$"):
        load_run_file(tmp_path / "nope.toml")


def test_pretraining_table(run_file):
    path = run_file(GOOD_FILE + "\n[pretraining]\nblock_size = 128\nsegment_documents = false\n")
    args = load_run_file(path)
    assert args.pretraining == PretrainingConfig(block_size=128, segment_documents=False)
    assert PretrainingConfig(block_size=128).segment_documents is True


def test_pretraining_table_keys_are_checked_and_located(run_file):
    path = run_file(GOOD_FILE + "\n[pretraining]\nblok_size = 1\n")
    with pytest.raises(ConfigError) as error:
        load_run_file(path)
    assert error.value.problems == [
        f"{path}:10: unknown key 'pretraining.blok_size'; did you mean 'pretraining.block_size'?",
        f"{path}:9: missing required key 'pretraining.block_size': tokens per block (input "
        "positions per training item)",
    ]


@pytest.mark.parametrize(("block_size", "fits"), [(1, False), (2, True), (256, True), (257, False)])
def test_block_size_is_above_one_and_fits_in_a_minibatch(block_size, fits):
    data = {**REQUIRED, "pretraining": {"block_size": block_size}}
    if fits:
        assert args_from_dict(data).pretraining.block_size == block_size
    else:
        (problem,) = problems_of(data)
        assert problem.startswith("<dict>: pretraining.block_size: ")


def test_overrides_replace_file_keys_by_the_same_names(run_file):
    path = run_file(GOOD_FILE + "\n[pretraining]\nblock_size = 128\n")
    args = load_run_file(
        path,
        {
            "batch_size": 16,
            "max-grad-norm": 0,  # dashes stand for underscores
            "pretraining.segment_documents": False,  # a dotted name sets a key of a table
            "lr_scheduler_kwargs.num_cycles": 0.25,
        },
    )
    assert args.batch_size == 16
    assert args.max_grad_norm == 0.0
    assert args.pretraining == PretrainingConfig(block_size=128, segment_documents=False)
    assert args.lr_scheduler_kwargs == {"num_cycles": 0.25}


def test_a_dotted_override_creates_the_table_and_none_unsets(run_file):
    path = run_file(GOOD_FILE + "seed = 7\n")
    args = load_run_file(path, {"pretraining.block_size": 64, "seed": None})
    assert args.pretraining == PretrainingConfig(block_size=64)
    assert args.seed == 42
    path = run_file(GOOD_FILE + "\n[pretraining]\nblock_size = 128\n")
    assert load_run_file(path, {"pretraining": None}).pretraining is None


def test_a_table_replaced_on_the_command_line_is_blamed_there(run_file):
    path = run_file(GOOD_FILE + "\n[pretraining]\nblock_size = 128\n")
    with pytest.raises(ConfigError) as error:
        load_run_file(path, {"pretraining": {"block_size": 1}})
    assert error.value.problems == ["command line: pretraining.block_size: must be > 1, got 1"]


def test_lines_inside_a_multiline_string_are_not_keys(run_file):
    text = 'wandb_project = """\nbatch_size = 1\n"""\n' + GOOD_FILE.replace("= 8", "= 0")
    with pytest.raises(ConfigError, match=rf"^{run_file(text)}:8: batch_size: must be > 0"):
        load_run_file(run_file(text))


def test_overrides_are_validated_like_file_values(run_file):
    path = run_file(GOOD_FILE)
    with pytest.raises(ConfigError) as error:
        load_run_file(path, {"batch_size": "x", "learning_rat": 1.0, "learning_rate.x": 1})
    assert error.value.problems == [
        "command line: learning_rate.x: learning_rate is not a table",
        'command line: batch_size: expected an integer, got "x" (a string)',
        "command line: unknown key 'learning_rat'; did you mean 'learning_rate'?",
    ]


@pytest.mark.parametrize(
    ("mode", "limits", "message"),
    [
        ("step", {}, "training_mode: 'step' needs max_steps > 0"),
        ("token", {}, "training_mode: 'token' needs max_tokens > 0"),
        ("epoch", {"max_steps": 10}, "max_steps: applies only with training_mode = 'step'"),
        ("step", {"max_steps": 9, "max_tokens": 10}, "max_tokens: applies only with"),
        ("token", {"max_tokens": 9, "max_epochs": 3}, "max_epochs: applies only with"),
    ],
)
def test_training_mode_needs_its_own_limit_and_no_other(mode, limits, message):
    (problem,) = problems_of({**REQUIRED, "training_mode": mode, **limits})
    assert problem.startswith(f"<dict>: {message}")


def test_each_training_mode_with_its_limit_is_accepted():
    for mode, limits in [
        ("epoch", {"max_epochs": 3}),
        ("step", {"max_steps": 10}),
        ("token", {"max_tokens": 10_000}),
        ("infinite", {"lr_scheduler": "constant"}),
    ]:
        assert args_from_dict({**REQUIRED, "training_mode": mode, **limits}).training_mode == mode


@pytest.mark.parametrize("scheduler", ["linear", "cosine", "polynomial", "cosine_with_min_lr"])
def test_infinite_mode_refuses_schedulers_that_need_the_total_step_count(scheduler):
    kwargs = {"min_lr_rate": 0.1} if scheduler == "cosine_with_min_lr" else {}
    data = {**REQUIRED, "training_mode": "infinite", "lr_scheduler": scheduler}
    (problem,) = problems_of({**data, "lr_scheduler_kwargs": kwargs})
    assert problem.startswith(f"<dict>: lr_scheduler: {scheduler!r} needs the total number")


@pytest.mark.parametrize(
    ("scheduler", "kwargs"),
    [
        ("constant", {}),
        ("constant_with_warmup", {}),
        ("inverse_sqrt", {"timescale": 100}),
        ("warmup_stable_decay", {"num_stable_steps": 100, "num_decay_steps": 10}),
    ],
)
def test_infinite_mode_accepts_schedulers_without_a_total(scheduler, kwargs):
    data = {**REQUIRED, "training_mode": "infinite", "lr_scheduler": scheduler}
    assert args_from_dict({**data, "lr_scheduler_kwargs": kwargs}).lr_scheduler == scheduler


def test_warmup_stable_decay_in_infinite_mode_needs_num_stable_steps():
    data = {**REQUIRED, "training_mode": "infinite", "lr_scheduler": "warmup_stable_decay"}
    (problem,) = problems_of({**data, "lr_scheduler_kwargs": {"num_decay_steps": 10}})
    assert "needs the total number of steps" in problem


def test_scheduler_kwargs_are_checked_against_the_schedule():
    problems = problems_of(
        {**REQUIRED, "lr_scheduler_kwargs": {"num_cycle": 2, "num_training_steps": 10}}
    )
    assert problems == [
        "<dict>: lr_scheduler_kwargs: 'cosine' takes no 'num_cycle' (it takes: num_cycles); "
        "did you mean 'num_cycles'?",
        "<dict>: lr_scheduler_kwargs: num_training_steps: mt computes it from the training length",
    ]
    (problem,) = problems_of({**REQUIRED, "lr_scheduler": "warmup_stable_decay"})
    assert problem == "<dict>: lr_scheduler_kwargs: 'warmup_stable_decay' needs num_decay_steps"


def test_constant_schedule_with_warmup_steps_is_refused():
    (problem,) = problems_of({**REQUIRED, "lr_scheduler": "constant", "num_warmup_steps": 10})
    assert "use lr_scheduler = 'constant_with_warmup'" in problem


def test_wandb_names_without_a_project_are_refused():
    (problem,) = problems_of({**REQUIRED, "wandb_run_name": "r1"})
    assert problem == "<dict>: wandb_run_name: has no effect without wandb_project"
    assert args_from_dict({**REQUIRED, "wandb_run_name": "r1", "wandb_project": "p"})


def test_cross_key_problems_in_a_file_point_at_a_line(run_file):
    path = run_file(GOOD_FILE + 'training_mode = "infinite"\nlr_scheduler = "linear"\n')
    with pytest.raises(ConfigError, match=rf"^{path}:9: lr_scheduler: 'linear' needs the total"):
        load_run_file(path)


def test_python_api_validates_on_construction_and_assignment():
    with pytest.raises(ConfigError, match="^batch_size: must be > 0, got 0$"):
        TrainingArgs(**{**REQUIRED, "batch_size": 0})
    with pytest.raises(ConfigError, match="^training_mode: 'step' needs max_steps > 0$"):
        TrainingArgs(**REQUIRED, training_mode="step")
    with pytest.raises(ConfigError, match=r"^block_size: must be > 1, got 1$"):
        PretrainingConfig(block_size=1)
    args = TrainingArgs(**REQUIRED, pretraining=PretrainingConfig(block_size=64))
    assert args == args_from_dict({**REQUIRED, "pretraining": {"block_size": 64}})
    with pytest.raises(ConfigError, match="^seed: must be >= 0"):
        args.seed = -1
    with pytest.raises(ConfigError, match="^pretraining: expected a PretrainingConfig"):
        TrainingArgs(**REQUIRED, pretraining={"block_size": 64})


def test_args_to_dict_holds_every_key_and_reads_back():
    args = args_from_dict({**REQUIRED, "pretraining": {"block_size": 64}})
    data = args_to_dict(args)
    assert set(data) == {field.name for field in attrs.fields(TrainingArgs)}
    assert data["pretraining"] == {"block_size": 64, "segment_documents": True}
    assert args_from_dict(data) == args


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {
            "pretraining": {"block_size": 128, "segment_documents": False},
            "lr_scheduler": "cosine_with_min_lr",
            "lr_scheduler_kwargs": {"min_lr_rate": 0.1, "num_cycles": 0.5},
            "learning_rate": 3,
            "eps": 1.5e-12,
            "use_liger_kernels": False,
            "save_dtype": "bfloat16",
            "min_samples_per_checkpoint": 10_000,
            "wandb_project": "proj",
            "wandb_run_name": 'a "quoted"\nname, é',
        },
    ],
)
def test_resolved_run_file_reads_back_to_equal_args(tmp_path, extra):
    args = args_from_dict({**REQUIRED, **extra})
    path = tmp_path / "run.toml"
    write_run_file(args, path)
    assert load_run_file(path) == args
    assert os.listdir(tmp_path) == ["run.toml"]  # no temporary file left behind
    text = path.read_text()
    assert "seed = 42" in text  # defaults are filled in
    assert ("use_liger_kernels" in text) == ("use_liger_kernels" in extra)  # None is left out


def test_writing_replaces_a_previous_file_whole(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("old content that is much longer than nothing\n" * 100)
    args = args_from_dict(REQUIRED)
    write_run_file(args, path)
    assert load_run_file(path) == args


def test_help_lists_every_key_with_type_and_default():
    text = render_help()
    for field in attrs.fields(TrainingArgs):
        if field.name != "pretraining":
            assert f"\n  {field.name}  (" in text, field.name
    assert "\n  pretraining.block_size  (integer, required)" in text
    assert "\n  pretraining.segment_documents  (boolean, default true)" in text
    assert "\n  batch_size  (integer, required)" in text
    assert '\n  lr_scheduler  (string, default "cosine")' in text
    assert "\n  use_liger_kernels  (boolean, default: not set)" in text
    assert "constant_with_warmup" in text  # scheduler choices come from transformers


def test_mini_trainer_block_size_flag_sets_the_pretraining_table(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'model_name_or_path = "m"\ndata_path = "d.jsonl"\noutput_dir = "o"\nbatch_size = 4\n'
        "max_tokens_per_gpu = 128\nlearning_rate = 1e-5\n"
    )
    args = load_run_file(path, {"block-size": 64})
    assert args.pretraining is not None and args.pretraining.block_size == 64
