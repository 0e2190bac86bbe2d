"""mt check: exact model counts from config.json alone, the memory formula, the plan drawn with
the run's own sampler and packer, the verdict and its exit status."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from mt import cli
from mt.check import make_plan
from mt.check_report import render, suggestions
from mt.errors import CommandError
from mt_core.config import load_run_file
from mt_core.model.build import matmul_parameter_count
from mt_core.plan.memory import (
    GIB,
    ModelShape,
    Settings,
    estimate,
    gpu,
    largest_fitting_tokens,
    osft_reference_bytes,
    osft_state_bytes,
    worst_minibatch,
)
from mt_core.plan.shape import OsftSettings, model_shape, osft_settings
from mt_data import InfiniteSampler
from mt_osft import trainable_rank
from mt_packing import pack_minibatches

# Llama-3.2-1B as mt check sees it (the counts are what model_shape gives for its config)
ONE_B = ModelShape(
    architecture="LlamaForCausalLM", params=1_235_814_400, grad_params=1_235_814_400,
    trainable=1_235_814_400, matmul_params=1_235_814_400, layers=16, hidden=2048,
    intermediate=8192, heads=32, kv_heads=8, head_dim=64, vocab=128256,
    block_params=60_821_504, root_params=262_668_288 + 2048, head_params=262_668_288,
    # float8: q, o and the MLP of every block (its key/value projections are 512 wide)
    float8_params=16 * (2 * 2048**2 + 3 * 2048 * 8192),
)  # fmt: skip
LLAMA_1B = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
)  # fmt: skip
SMALL = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=96,
)  # fmt: skip


@pytest.mark.parametrize("tied", [True, False])
def test_counts_from_the_config_equal_the_real_models(tied):
    config = LlamaConfig(**SMALL, tie_word_embeddings=tied)
    real = AutoModelForCausalLM.from_config(config)
    shape = model_shape(config)
    assert shape.params == sum(p.numel() for p in real.parameters())  # a tied weight once
    assert shape.matmul_params == matmul_parameter_count(real)
    assert shape.block_params == sum(p.numel() for p in real.model.layers[0].parameters())
    assert shape.root_params == shape.params - 3 * shape.block_params
    assert shape.head_params == 96 * 32
    assert (shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.head_dim) == (
        3,
        32,
        4,
        2,
        8,
    )


def test_the_1b_shape_is_what_model_shape_reads():
    assert model_shape(LlamaConfig(**LLAMA_1B)) == ONE_B


def test_osft_counts_the_trainable_subspace_and_its_extra_memory():
    config = LlamaConfig(**SMALL)
    full = model_shape(config)
    assert model_shape(config, osft=OsftSettings(ratio=1.0)) == full  # ratio 1: full fine-tuning
    frozen = model_shape(config, osft=OsftSettings(ratio=0.0))
    targets = 3 * (32 * 32 + 2 * 16 * 32 + 32 * 32 + 3 * 32 * 64)  # q, k, v, o, gate, up, down
    assert frozen.grad_params == frozen.trainable == full.params - targets
    assert osft_state_bytes(frozen, "float32") == 0
    quarter = model_shape(config, osft=OsftSettings(ratio=0.25))
    shapes = [(32, 32), (16, 32), (16, 32), (32, 32), (64, 32), (64, 32), (32, 64)]
    lost = 0
    for out, inn in shapes:
        k = min(out, inn) - trainable_rank(min(out, inn), 0.25)
        lost += out * inn - (out - k) * (inn - k)
    assert quarter.trainable == full.params - 3 * lost
    assert quarter.grad_params == full.params  # dense gradients and optimizer state
    # a float32 copy of each target, and bases
    assert osft_state_bytes(quarter, "float32") > 4 * targets


def test_osft_projection_time_is_the_flop_count_at_the_measured_rates(tiny_run):
    """The 8B shape's 224 targets at ratio 0.25: the FLOPs torch's counter measured on the GPU
    for one projection (tools/bench/RESULTS.md: 46.4 TFLOP), and with bfloat16 weights the
    0.074 + 0.094 s the two projections took on one H200; N ranks do 1/N each. ``mt check``'s
    step time is the compute time plus that, and says so."""
    from mt_core.plan.step_time import osft_step_seconds

    eight_b = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=256,
    )  # fmt: skip
    shape = model_shape(eight_b, osft=OsftSettings(ratio=0.25))
    assert shape.osft_projection_flops == pytest.approx(46.4e12, rel=1e-3)
    h200 = gpu("H200").peak_flops
    assert osft_step_seconds(shape, "bfloat16", 1, h200) == pytest.approx(0.074 + 0.094, rel=0.01)
    assert osft_step_seconds(shape, "bfloat16", 8, h200) == pytest.approx(0.168 / 8, rel=0.01)
    assert osft_step_seconds(model_shape(eight_b), "bfloat16", 1, h200) == 0.0
    args = load_run_file(tiny_run, {"osft": True})
    plans = [make_plan(load_run_file(tiny_run), str(tiny_run), batches=2),
             make_plan(args, str(tiny_run), batches=2)]  # fmt: skip
    extra = osft_step_seconds(plans[1].shape, "float32", 1, plans[1].gpu.peak_flops)
    assert extra > 0
    for without, with_osft in zip(plans[0].steps, plans[1].steps, strict=True):
        assert with_osft.time_s == pytest.approx(without.time_s + extra, rel=1e-12)
    assert "OSFT's projections of gradients and weights included" in render(plans[1])


def test_memory_parts_follow_the_documented_formula():
    t, w = 16384, 8
    m = estimate(ONE_B, Settings(max_tokens=t, world_size=w))
    p = ONE_B.params
    assert (m.weights, m.gradients, m.optimizer) == (4 * p / w, 4 * p / w, 8 * p / w)
    per_layer = 2 * (4 * 2048 + 2 * 2048 + 2 * 512 + 3 * 8192) + 4 * 32 + 2 * 4
    assert m.activations == t * 16 * per_layer
    assert m.loss == 8 * t * 2048
    copies = 2 * (ONE_B.root_params + 2 * ONE_B.block_params + ONE_B.head_params)
    assert m.copies == copies + 6 * ONE_B.block_params
    assert m.peak == m.weights + m.optimizer + m.copies + m.activations + m.loss
    assert m.peak_at == "start of backward"

    plain = estimate(ONE_B, Settings(max_tokens=t, world_size=w, liger=False))
    # the logits; whole numbers of bytes, computed exactly in Python's integers
    assert plain.loss - m.loss == 12 * t * 128256
    assert plain.activations - m.activations == t * 16 * (8 * 2048 + 2 * 8192)

    ac = estimate(ONE_B, Settings(max_tokens=t, world_size=w, checkpointing=True))
    assert ac.activations == t * (16 * 2 * 2048 + per_layer)
    assert ac.peak < m.peak


def test_sharding_divides_the_states_but_not_the_activations():
    one = estimate(ONE_B, Settings(max_tokens=8192, world_size=1))
    eight = estimate(ONE_B, Settings(max_tokens=8192, world_size=8))
    assert eight.weights * 8 == one.weights and eight.optimizer * 8 == one.optimizer
    assert eight.activations == one.activations and eight.copies == one.copies


def test_the_optimizer_state_precision_sets_the_moment_bytes():
    run = Settings(max_tokens=8192, world_size=8)
    per_gpu = ONE_B.grad_params // 8  # 154,476,800: 1.24B parameters split evenly
    base = estimate(ONE_B, run)
    # two moments a parameter: float32 4 + 4 bytes, bfloat16 2 + 2, 8-bit 1 + 1 and a float32
    # scale per 256 values each (2·4/256 = 1/32 byte a parameter); whole numbers of bytes
    for state, master, moments in (
        ("float32", "float32", 8 * per_gpu),
        ("bfloat16", "float32", 4 * per_gpu),
        ("8bit", "float32", 2 * per_gpu + per_gpu // 32),
        ("float32", "bfloat16", 8 * per_gpu),
        (None, "bfloat16", 4 * per_gpu),  # not set: the master weights' dtype, as before
    ):
        m = estimate(ONE_B, replace(run, state=state, master=master))
        assert m.optimizer == moments, state
        # the peak (start of backward: weights, state, copies, activations, loss) moves by the
        # state and the master weights only
        assert m.peak - m.optimizer - m.weights == base.peak - base.optimizer - base.weights
    assert estimate(ONE_B, replace(run, state="8bit")).optimizer == 313_781_000


def test_a_deferred_gradient_sync_adds_the_unsharded_float32_gradients():
    run = Settings(max_tokens=8192, world_size=8)
    every, deferred = estimate(ONE_B, run), estimate(ONE_B, replace(run, deferred_sync=True))
    assert deferred.peak - every.peak == 4 * ONE_B.grad_params
    one = Settings(max_tokens=8192, world_size=1)  # one GPU: nothing to defer
    assert estimate(ONE_B, replace(one, deferred_sync=True)).peak == estimate(ONE_B, one).peak
    # ...unless the master weights are bfloat16: FSDP2 accumulates in float32, 4 bytes a
    # parameter at the start of a later minibatch's backward pass, where no bfloat16 gradient
    # exists yet (the bfloat16 gradients of a sync every minibatch are alive there instead),
    # and reduces in float32 too: one block's copy in transit 2 bytes a parameter wider
    narrow = replace(one, master="bfloat16", minibatches=2)
    every, deferred = estimate(ONE_B, narrow), estimate(ONE_B, replace(narrow, deferred_sync=True))
    assert every.peak_at == deferred.peak_at == "start of backward"
    wider_copy = 2 * ONE_B.block_params
    assert deferred.peak - every.peak == 4 * ONE_B.grad_params - every.gradients + wider_copy
    # ...unless the gradients go to host memory: then the deferred ones wait on the GPU
    offload = replace(one, cpu_offload=True)
    gained = estimate(ONE_B, replace(offload, deferred_sync=True)).peak
    assert gained - estimate(ONE_B, offload).peak == 4 * ONE_B.grad_params


def test_the_peak_moves_to_the_end_of_backward_when_activations_are_small():
    m = estimate(ONE_B, Settings(max_tokens=512, world_size=1, checkpointing=True))
    assert m.peak_at == "end of backward"
    assert m.peak == m.weights + m.optimizer + m.gradients + m.copies + m.activations_end


def test_cpu_offload_keeps_only_compute_copies_and_activations_on_the_gpu():
    run = Settings(max_tokens=4096, world_size=2, cpu_offload=True)
    m = estimate(ONE_B, run)
    assert m.peak == m.copies + m.activations + m.loss
    assert m.host == m.weights + m.gradients + m.optimizer


def test_largest_fitting_tokens_is_the_boundary():
    run = Settings(max_tokens=65536, world_size=1)
    budget = 40 * GIB
    tokens = largest_fitting_tokens(ONE_B, run, budget)
    assert estimate(ONE_B, replace(run, max_tokens=tokens)).peak <= budget
    assert estimate(ONE_B, replace(run, max_tokens=tokens + 1)).peak > budget
    assert largest_fitting_tokens(ONE_B, run, 1 * GIB) == 0  # the states alone do not fit


def test_gpu_names():
    assert gpu("h100").memory_gib == gpu("H100-80GB").memory_gib
    assert gpu("A100-40").memory_gib < 40 < gpu("A100").memory_gib
    with pytest.raises(ValueError, match="unknown GPU 'V100'"):
        gpu("V100")


# --- the plan on a real (tiny) run --------------------------------------------------------------


@pytest.fixture
def tiny_run(tmp_path, tiny_model, kit):
    rows = kit.token_rows(40, low=5, high=60, seed=1)
    rows += [{"input_ids": [1] * 80, "labels": [1] * 80}] * 3  # longer than max_tokens_per_gpu
    data = kit.write_jsonl(tmp_path / "data.jsonl", rows)
    return kit.run_toml(
        tmp_path,
        tiny_model,
        data,
        batch_size=8,
        training_mode="epoch",
        max_epochs=2,
        max_steps=None,
    )


def test_the_plan_uses_the_runs_sampler_and_packer(tiny_run):
    args = load_run_file(tiny_run)
    plan = make_plan(args, str(tiny_run), nproc_per_node=2, batches=5)
    assert (plan.file_samples, plan.dropped_long, plan.train_items) == (43, 3, 40)
    assert plan.steps_per_epoch == 5 and plan.total_steps == 10
    # the same batches, drawn and packed independently
    lengths = np.array([len(row) for row in _kept_lengths(tiny_run)])
    sampler = InfiniteSampler(40, 8, seed=args.seed)
    for step in plan.steps:
        batch = next(sampler)
        assert step.tokens == int(lengths[batch].sum())
        plan_of_step = pack_minibatches(lengths[batch], 64, 2)
        assert step.minibatches == len(plan_of_step[0])
        loads = [int(lengths[batch][ids].sum()) for rank in plan_of_step for ids in rank]
        assert step.largest == max(loads) <= 64
        # the fullest first minibatch of a step over the ranks, and the fullest later one
        assert step.first == max(int(lengths[batch][rank[0]].sum()) for rank in plan_of_step)
        later = [int(lengths[batch][ids].sum()) for rank in plan_of_step for ids in rank[1:]]
        assert step.later == max(later, default=0)
    assert plan.fits and plan.world_size == 2
    assert (tiny_run.parent / "out" / "data_cache").is_dir()  # where mt run finds the store


def test_sequence_parallel_groups_share_rows_and_keep_the_long_samples(tiny_run, capsys):
    """Groups of 2 GPUs hold rows of 2 x 64 tokens: the 80-token samples are kept, each step is
    packed over the 2 groups, each GPU holds half of its fullest row and computes half of it."""
    import json

    args = load_run_file(tiny_run, {"sequence_parallel_size": 2})
    plan = make_plan(args, str(tiny_run), nproc_per_node=4, batches=5)
    assert (plan.file_samples, plan.dropped_long, plan.train_items) == (43, 0, 43)
    lines = [json.loads(x) for x in Path(args.data_path).read_text().splitlines()]
    lengths = np.array([len(row["input_ids"]) for row in lines])
    sampler = InfiniteSampler(43, 8, seed=args.seed)
    for step in plan.steps:
        batch = next(sampler)
        assert step.tokens == int(lengths[batch].sum())
        rows = pack_minibatches(lengths[batch], 128, 2)
        assert step.minibatches == len(rows[0])
        loads = [int(lengths[batch][ids].sum()) for group in rows for ids in group]
        assert step.largest == -(-max(loads) // 2) <= 64
    cli.main(["check", str(tiny_run), "--nproc_per_node=4", "--sequence_parallel_size=2"])
    out = capsys.readouterr().out
    assert "dropped: 0 longer than a row of 128 tokens (max_tokens_per_gpu = 64 x " in out
    assert "sequence parallelism: groups of 2 GPUs compute rows of up to 128 tokens" in out
    with pytest.raises(CommandError, match="sequence_parallel_size = 3 does not divide the 4 GPUs"):
        make_plan(load_run_file(tiny_run, {"sequence_parallel_size": 3}), str(tiny_run),
                  nproc_per_node=4)  # fmt: skip
    with pytest.raises(CommandError, match="4 does not divide the model's 4 attention heads and "
                                           "2 key/value heads"):  # fmt: skip
        make_plan(load_run_file(tiny_run, {"sequence_parallel_size": 4}), str(tiny_run),
                  nproc_per_node=4)  # fmt: skip


def _kept_lengths(run_file):
    import json

    args = load_run_file(run_file)
    lines = [json.loads(x) for x in Path(args.data_path).read_text().splitlines()]
    return [row["input_ids"] for row in lines if len(row["input_ids"]) <= args.max_tokens_per_gpu]


def test_check_prints_the_plan_and_exits_0(tiny_run, capsys):
    # returns: exit status 0 (a traceback would be an exception here, failing the test)
    cli.main(["check", str(tiny_run), "--nproc_per_node=2", "--gpu=A100-40"])
    out, err = capsys.readouterr()
    assert "model   LlamaForCausalLM from" in out
    assert "dropped: 3 longer than max_tokens_per_gpu = 64, 0 without a loss-counted token" in out
    assert "activation checkpointing off | on (this run: off)" in out
    for part in ("weights", "gradients", "optimizer state", "activations", "loss", "peak"):
        assert f"\n  {part}" in out
    assert "steps per epoch 5; 10 in all (2 epochs)" in out
    assert "verdict fits" in out and "A100 40 GB" in out
    assert "AdamW: 2 x float32, 1/2 shard" in out
    assert err == ""
    cli.main(["check", str(tiny_run), "--nproc_per_node=2", "--gpu=A100-40",
              "--optimizer_state_dtype=8bit"])  # fmt: skip
    assert "AdamW: 2 x 8-bit, a float32 scale per 256, 1/2 shard" in capsys.readouterr().out


def test_check_says_the_settings_in_the_words_of_the_runs_first_line(tiny_run, capsys):
    """One line of every resolved setting, as the run prints it before its first step
    (``settings`` + Resolved.describe(); test_check_agrees: the same Resolved)."""
    cli.main(["check", str(tiny_run), "--gpu=H100", "--deterministic=true"])
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("settings ")]
    assert line.startswith("settings weights float32, compute bfloat16, attention ")
    assert ", liger on, compiled blocks on, activation budget 1.00, " in line
    assert line.endswith(", gradient sync once a step, deterministic on")


def llama_8b(tmp_path: Path, kit) -> tuple[Path, Path]:
    """The config of Llama-3.1-8B (no weights at all: mt check needs none) and 64 samples of
    100 to 4,000 tokens."""
    model = tmp_path / "llama-8b"
    LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256,
    ).save_pretrained(model)  # fmt: skip
    return model, kit.write_jsonl(
        tmp_path / "data.jsonl", kit.token_rows(64, low=100, high=4000, seed=2)
    )


def test_steps_that_never_fill_a_row_show_their_own_peak(tmp_path, kit, capsys):
    """Batches whose rows never fill up peak lower than the plan's full row: mt check gives that
    peak too, for the worse of the sampled steps' fullest first minibatch and fullest later one
    (its backward pass starts with the first one's gradients alive), what the trainer's own last
    line compares a GPU run's peak with; a plan whose rows fill up says nothing of it."""
    model, _ = llama_8b(tmp_path, kit)
    keys = dict(batch_size=24, train_dtype="bfloat16", optimizer_state_dtype="bfloat16")
    # 24 samples of 1,000-1,399 tokens a step: two rows of 14k or so, of 20,480
    data = kit.write_jsonl(tmp_path / "short.jsonl", kit.token_rows(96, low=1000, high=1400))
    run = kit.run_toml(tmp_path, model, data, max_tokens_per_gpu=20480, **keys)
    plan = make_plan(load_run_file(run), str(run), gpu_name="H200", batches=4)
    first = max(step.first for step in plan.steps)
    later = max(step.later for step in plan.steps)
    assert 0 < later <= first < 0.8 * 20480  # every step: two rows, neither near full
    worst = worst_minibatch(plan.shape, plan.settings, first, later)
    assert worst.minibatches == 2 and worst.max_tokens == later  # the gradients tip it
    peak = estimate(plan.shape, worst).peak
    assert peak < 0.97 * plan.memory.peak
    cli.main(["check", str(run), "--gpu=H200", "--batches=4"])
    out = capsys.readouterr().out
    assert (
        f"(the sampled steps peak {peak / GIB:.1f} GiB, at a later minibatch of {later:,} tokens "
        "on one GPU; the verdict\n   assumes a full 20,480 after a first, as a longer run of this "
        "data may bring)"
    ) in out
    # rows that fill up (24 samples of 1,024 tokens: three full rows a step): nothing to add
    even = kit.write_jsonl(tmp_path / "even.jsonl", kit.token_rows(96, low=1024, high=1025))
    full = kit.run_toml(tmp_path, model, even, max_tokens_per_gpu=8192, **keys)
    cli.main(["check", str(full), "--gpu=H200", "--batches=4"])
    assert "the sampled steps peak" not in capsys.readouterr().out


def test_a_run_that_does_not_fit_exits_1_and_says_what_to_change(tmp_path, kit, capsys):
    model, data = llama_8b(tmp_path, kit)
    run = kit.run_toml(
        tmp_path, model, data, batch_size=32, max_tokens_per_gpu=32768, cpu_offload=False
    )
    with pytest.raises(SystemExit) as exit_:
        cli.main(["check", str(run), "--nproc_per_node=4", "--gpu=A100-40"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 1, err
    assert "8.03 B parameters" in out
    assert "verdict DOES NOT FIT" in out
    # compiled blocks recomputing all they can (budget 0) are not enough either
    assert "activation_memory_budget 0.00" in out
    for change in (
        "activation_checkpointing = true: peak 40.7 GiB, still too much",
        "cpu_offload = true (slower; 119.7 GiB of host memory per node): peak 34.5 GiB, fits",
        "--nnodes=2 (8 GPUs): peak 34.2 GiB, fits",  # at the budget chosen there
    ):
        assert f"- {change}" in out, change
    assert err == ""
    # On 8 H100s the compiled blocks keep 36% of their activations and the run fits: the
    # largest such share, as the trainer chooses it.
    plan = make_plan(load_run_file(run), str(run), nproc_per_node=8, batches=2)
    assert plan.fits and plan.settings.activation_budget == 0.36
    usable = plan.gpu.usable_gib * GIB
    assert plan.memory.peak <= usable
    assert estimate(plan.shape, replace(plan.settings, activation_budget=0.37)).peak > usable
    # eager blocks keep all: a shorter row is enough too
    # (activation offload off: it would make it fit, test_activation_offload_*)
    eager_keys = {"torch_compile": False, "activation_offload": False}
    eager = make_plan(load_run_file(run, eager_keys), str(run), 8, batches=2)
    assert not eager.fits and eager.settings.activation_budget == 1.0
    assert suggestions(eager)[:2] == [
        "activation_checkpointing = true: peak 29.4 GiB, fits",
        "max_tokens_per_gpu = 13,213: peak 71.5 GiB, fits",
    ]


def test_mistakes_exit_2_without_a_traceback(tmp_path, tiny_model, kit, capsys):
    rows = kit.token_rows(6)
    rows[3] = {"input_ids": [1, 2, 3], "labels": [1, 2]}
    data = kit.write_jsonl(tmp_path / "data.jsonl", rows)
    run = kit.run_toml(tmp_path, tiny_model, data)
    cases = [
        ([str(run)], f"mt: error: {data}:4: 'labels' has 2 entries but 'input_ids' has 3"),
        (
            [str(run), "--gpu=V100"],
            "mt: error: --gpu: unknown GPU 'V100'; choose one of H100, H200, A100, A100-40",
        ),
        (
            [str(run), "--nproc_per_nod=2"],
            "mt: error: check: unknown option --nproc_per_nod; did you mean --nproc_per_node?",
        ),
        (
            [str(run), "--batch_sise=3"],
            "mt: error: command line: unknown key 'batch_sise'; did you mean 'batch_size'?",
        ),
        (
            [str(run), "--model_name_or_path=" + str(tmp_path)],
            f"mt: error: command line: model_name_or_path: {tmp_path} has no config.json",
        ),
    ]
    for arguments, message in cases:
        with pytest.raises(SystemExit) as exit_:
            cli.main(["check", *arguments])
        err = capsys.readouterr().err
        assert exit_.value.code == 2, (arguments, err)
        assert message in err.splitlines(), err


def test_option_values_are_checked(tiny_run):
    args = load_run_file(tiny_run)
    with pytest.raises(CommandError, match="--nnodes: expected a positive integer"):
        make_plan(args, str(tiny_run), nnodes=0)
    with pytest.raises(CommandError, match=r"--mfu: expected a fraction"):
        make_plan(args, str(tiny_run), mfu=40)


def test_bf16_training_halves_the_states():
    fp32 = estimate(ONE_B, Settings(max_tokens=1024, world_size=1))
    bf16 = estimate(ONE_B, Settings(max_tokens=1024, world_size=1, master="bfloat16"))
    assert bf16.weights * 2 == fp32.weights and bf16.optimizer * 2 == fp32.optimizer
    assert torch.tensor(0).dtype == torch.int64  # torch imported for the model tests above


def test_the_runs_osft_keys_reach_the_count(tiny_run):
    assert osft_settings(load_run_file(tiny_run)) is None  # osft = false
    args = load_run_file(tiny_run, {"osft": True, "osft_upcast_dtype": "float64"})
    assert osft_settings(args) == OsftSettings(ratio=0.25, upcast_bytes=8)
    adaptive = load_run_file(
        tiny_run,
        {"osft": True, "osft_adaptive_ratios": True, "osft_target_patterns": ["*.q_proj"]},
    )
    assert osft_settings(adaptive) == OsftSettings(ratio=0.3, target_patterns=("*.q_proj",))
    plan = make_plan(args, str(tiny_run), batches=1)
    assert plan.shape.trainable < plan.shape.params and plan.memory.osft > 0
    assert "OSFT" in render(plan)


def test_an_output_dir_not_writable_here_checks_in_a_temporary_cache(tiny_run, tmp_path):
    (tmp_path / "a-file").write_text("")
    args = load_run_file(tiny_run, {"output_dir": str(tmp_path / "a-file" / "out")})
    plan = make_plan(args, str(tiny_run), batches=1)
    assert "is not writable here: data checked in a temporary cache" in plan.cache_note
    assert plan.train_items == 40


def test_an_architecture_without_liger_kernels_counts_its_logits(tmp_path, kit):
    from transformers import GPT2Config

    model = tmp_path / "gpt2"
    GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=128).save_pretrained(
        model
    )
    data = kit.write_jsonl(tmp_path / "data.jsonl", kit.token_rows(16))
    run = kit.run_toml(tmp_path, model, data)
    plan = make_plan(load_run_file(run), str(run), batches=2)
    assert plan.shape.architecture == "GPT2LMHeadModel" and plan.shape.intermediate == 128
    assert not plan.settings.liger
    assert plan.memory.loss == 12 * 64 * 64 + 8 * 64 * 32
    assert any("no kernels for model_type 'gpt2'" in note for note in plan.notes)


def test_without_gpu_the_plan_is_for_this_machines_gpu(tiny_run, monkeypatch):
    """On a machine with a GPU (here a stand-in H200 as torch reports one) mt check plans for it:
    its memory and peak; an unknown GPU keeps its memory and takes an H100's peak; without CUDA
    the plan is for an H100 80 GB."""
    from types import SimpleNamespace

    args = load_run_file(tiny_run)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert make_plan(args, str(tiny_run)).gpu == gpu("H100")
    found = SimpleNamespace(name="NVIDIA H200", total_memory=150_012_862_464)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: found)
    plan = make_plan(args, str(tiny_run))
    assert plan.gpu.memory_gib == 150_012_862_464 / GIB and plan.gpu.peak_flops == 989e12
    assert plan.gpu.label == "NVIDIA H200 140 GiB (this machine's)"
    assert make_plan(args, str(tiny_run), gpu_name="A100-40").gpu == gpu("A100-40")  # --gpu wins
    found.name = "NVIDIA RTX 9999"
    plan = make_plan(args, str(tiny_run))
    assert plan.gpu.peak_flops == gpu("H100").peak_flops
    assert plan.gpu.label.endswith("peak FLOP/s taken as an H100's")


def test_activation_offload_is_a_lever_of_mt_check(tmp_path, kit, capsys):
    model, data = llama_8b(tmp_path, kit)
    run = kit.run_toml(
        tmp_path, model, data, batch_size=32, max_tokens_per_gpu=32768, cpu_offload=False
    )
    # Per token and layer the blocks keep a = 2·(4h + 2q + 2k + 3i) + 4·heads + 8 bytes (Liger);
    # offloaded, the GPU holds 2 of the 32 layers and the host the 31 others.
    a = 2 * (4 * 4096 + 2 * 4096 + 2 * 1024 + 3 * 14336) + 4 * 32 + 8
    tokens = 32768

    # 4 A100-40s: the weights, gradients and AdamW state leave too little room even so
    with pytest.raises(SystemExit):
        cli.main(["check", str(run), "--nproc_per_node=4", "--gpu=A100-40"])
    host = 4 * 31 * tokens * 2 * 4096  # budget 0: each layer keeps only its input
    assert (
        f"- activation_offload = true (PCIe traffic; {host / GIB:.1f} GiB of host memory per "
        "node): peak 35.1 GiB, still too much"
    ) in capsys.readouterr().out

    # 8 H100s, eager blocks (no budget to lower): the trainer turns the offload on, and says so
    eager = load_run_file(run, {"torch_compile": False})
    plan = make_plan(eager, str(run), nproc_per_node=8, batches=2)
    assert plan.fits and plan.settings.activation_offload
    without = replace(plan.settings, activation_offload=False)
    assert estimate(plan.shape, without).peak > plan.gpu.usable_gib * GIB
    # every part but the activations is the same: 30 of the 32 layers' fewer on the GPU
    assert estimate(plan.shape, without).activations - plan.memory.activations == 30 * tokens * a
    assert plan.memory.host == 31 * tokens * a
    cli.main(["check", str(run), "--nproc_per_node=8", "--torch_compile=false"])
    out = capsys.readouterr().out
    assert "32,768 tokens x 32 layers, Liger on, 2 of them on the GPU    8.51 | 4.75" in out
    assert "(activation_offload on: so that the row fits, the blocks' saved activations" in out
    assert f"host memory     offloaded activations: {31 * tokens * a / GIB:.1f} GiB per GPU" in out
    assert "verdict fits" in out
    # set in the run file: no note of the fit's choice; with cpu_offload the host holds both
    cli.main(["check", str(run), "--nproc_per_node=8", "--torch_compile=false",
              "--activation_offload=true", "--cpu_offload=true"])  # fmt: skip
    out = capsys.readouterr().out
    assert "(activation_offload on" not in out
    state = 16 * plan.shape.params / 8  # float32 weights, gradients and two moments, 1/8 each
    assert (
        "host memory     weights, gradients, optimizer state and offloaded activations: "
        f"{(state + 31 * tokens * a) / GIB:.1f} GiB per GPU"
    ) in out


def test_mt_check_turns_cpu_offload_on_as_the_trainer_would(tmp_path, kit, capsys):
    """The run that does not fit four A100-40s above, with cpu_offload left unset: nothing but
    cpu_offload makes it fit, so the plan is made with it on, as the trainer's fit would choose
    (its peak, the host memory it needs, and why); set false, the same run does not fit."""
    model, data = llama_8b(tmp_path, kit)
    run = kit.run_toml(tmp_path, model, data, batch_size=32, max_tokens_per_gpu=32768)
    cli.main(["check", str(run), "--nproc_per_node=4", "--gpu=A100-40"])
    out = capsys.readouterr().out
    assert "verdict fits" in out
    assert "(in host memory: cpu_offload)" in out
    assert "(cpu_offload on: nothing else fits" in out
    assert "cheapest settings that fit:" in out  # how it would fit without the slowest lever
    # 16 bytes a parameter in host memory: 8.03e9 x 16 / 4 GPUs a GPU, x 4 a node
    assert (
        "host memory     weights, gradients and optimizer state: 29.9 GiB per GPU, 119.7 GiB per node"
        in out
    )
    with pytest.raises(SystemExit) as exit_:
        cli.main(["check", str(run), "--nproc_per_node=4", "--gpu=A100-40", "--cpu_offload=false"])
    assert exit_.value.code == 1
    assert "verdict DOES NOT FIT" in capsys.readouterr().out


def test_osfts_frozen_copies_in_host_memory_are_named_and_counted(tmp_path, kit, capsys):
    """OSFT at the 1B shape on an H100 (float32 master weights): under cpu_offload its W0 and
    bases wait in host memory beside the 16 bytes a parameter of weights, gradients and AdamW
    state, and the report says so in the OSFT row and the host-memory line, and that the step
    time leaves the offload's own cost out; with osft_reference_on_host alone W0 is the host
    memory; with neither there is none."""
    model = tmp_path / "llama-1b"
    LlamaConfig(**LLAMA_1B).save_pretrained(model)
    data = kit.write_jsonl(tmp_path / "d.jsonl", kit.token_rows(64, low=100, high=4000, seed=2))
    run = kit.run_toml(tmp_path, model, data, max_tokens_per_gpu=4096, osft=True)
    shape = make_plan(load_run_file(run), str(run), gpu_name="H100", batches=2).shape
    bases = osft_state_bytes(shape, "float32", reference_on_host=True)
    w0 = osft_reference_bytes(shape, "float32")
    assert bases > 0 and w0 == 4 * shape.osft_reference_values > 0

    cli.main(["check", str(run), "--gpu=H100", "--cpu_offload=true"])
    out = capsys.readouterr().out
    row = "  OSFT            {:<58}{:>7.2f}"  # (the table's columns)
    assert (
        row.format("frozen weights and bases (in host memory: cpu_offload)", (w0 + bases) / GIB)
        in out
    )
    held = 16 * shape.params + w0 + bases
    assert (
        "host memory     weights, gradients, optimizer state and OSFT's frozen weights and "
        f"bases: {held / GIB:.1f} GiB per GPU"
    ) in out
    assert "(cpu_offload not counted: each minibatch copies the weights to the GPU" in out

    cli.main(["check", str(run), "--gpu=H100", "--osft_reference_on_host=true"])
    out = capsys.readouterr().out
    assert row.format("singular bases (frozen weights in host memory)", bases / GIB) in out
    assert f"host memory     OSFT's frozen weights: {w0 / GIB:.2f} GiB per GPU" in out
    assert "cpu_offload not counted" not in out

    cli.main(["check", str(run), "--gpu=H100", "--osft_reference_on_host=false"])
    out = capsys.readouterr().out
    assert "  host memory  " not in out and "cpu_offload not counted" not in out

    # at 8B (float32) nothing else fits one H100: the fit's own choice names OSFT's state too
    model, data = llama_8b(tmp_path, kit)
    run = kit.run_toml(tmp_path, model, data, max_tokens_per_gpu=4096, osft=True)
    cli.main(["check", str(run), "--gpu=H100"])
    assert (
        "(cpu_offload on: nothing else fits, so the weights, gradients and optimizer state (and "
        "OSFT's frozen weights and bases)\n   wait in host memory"
    ) in capsys.readouterr().out


def test_fp8_at_budget_1_counts_what_the_blocks_keep_less(tmp_path, kit, capsys):
    """A 1B run with float8 = 'tensorwise' on an H200 fits with every activation kept: the plan
    counts h + 2i bytes less per token and layer (mt_core.plan.memory.float8_kept_saving,
    measured against the compiler) than the same run without the key, exactly that many GiB at
    the row, and mt check says so under its table. With activation checkpointing, or without
    the key, nothing is said."""
    from mt_core.plan.memory import float8_kept_saving

    assert float8_kept_saving(ONE_B, "tensorwise") == 2048 + 2 * 8192
    assert float8_kept_saving(replace(ONE_B, moe=True), "tensorwise") == 0  # not measured
    assert float8_kept_saving(replace(ONE_B, float8_params=0), "tensorwise") == 0
    model = tmp_path / "llama-1b"
    LlamaConfig(**LLAMA_1B).save_pretrained(model)
    data = kit.write_jsonl(tmp_path / "d.jsonl", kit.token_rows(64, low=100, high=4000, seed=2))
    run = kit.run_toml(tmp_path, model, data, max_tokens_per_gpu=16384, float8="tensorwise")
    plan = make_plan(load_run_file(run), str(run), gpu_name="H200", batches=2)
    assert plan.settings.compiled and plan.settings.activation_budget == 1
    plain = make_plan(load_run_file(run, {"float8": None}), str(run), gpu_name="H200", batches=2)
    assert plain.settings.activation_budget == 1 and plan.memory.peak_at == "start of backward"
    saving = (2048 + 2 * 8192) * 16 * 16384
    assert plain.memory.activations - plan.memory.activations == saving
    assert plain.memory.peak - plan.memory.peak == saving
    cli.main(["check", str(run), "--gpu=H200"])
    out = capsys.readouterr().out
    assert (
        "  (float8 = 'tensorwise': counted above: the compiled blocks keep 18,432 B less per "
        f"token and layer,\n   {saving / GIB:.2f} GiB at this row)"
    ) in out
    cli.main(["check", str(run), "--gpu=H200", "--activation_checkpointing=true"])
    assert "keep 18,432 B less" not in capsys.readouterr().out
