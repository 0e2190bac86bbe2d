"""Fitting a run to its GPU: the memory estimate with an activation budget and with several
minibatches per step, the largest budget that fits, and the budget the trainer chooses."""

import logging
from dataclasses import replace

import numpy as np
import pytest
from transformers import LlamaConfig

from mt_core import args_from_dict
from mt_core.plan.fit import (
    Fit,
    choose_fit,
    fit_to_gpu,
    run_settings,
    syncs_every_minibatch,
)
from mt_core.plan.memory import (
    COMPUTE_BYTES,
    GIB,
    RESERVED_GIB,
    Settings,
    activation_bytes_per_token_layer,
    compiled_bytes_per_token_layer,
    compiled_share,
    estimate,
    fitting_activation_budget,
    reduce_bytes,
    usable_bytes,
)
from mt_core.plan.room import gpu_room, gpu_room_bytes
from mt_core.plan.shape import model_shape

# Llama-3.2-3B as config.json has it: float32 weights, gradients and AdamW state are 48 GiB
LLAMA_3B = LlamaConfig(
    hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
    num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True,
)  # fmt: skip
LLAMA_1B = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64,
)  # fmt: skip
LLAMA_8B = LlamaConfig(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, vocab_size=128256,
)  # fmt: skip
H100 = 81559 * 2**20  # what torch.cuda reports as the H100's total memory


@pytest.fixture(scope="module")
def shape():
    return model_shape(LLAMA_3B)


def test_a_budget_keeps_the_partitioners_share_of_what_lies_beyond_the_blocks_input(shape):
    """Compiled blocks at budget b keep c·h + b·(a - c·h) per token and layer up to the share of
    torch's more aggressive min-cut, a - c·(2h + i) (the norms' outputs and SwiGLU's product
    recomputed), that share for every budget above it, and a at 1; eager blocks ignore the
    budget. (tests/test_compiled_activations.py holds the formula to the compiler itself.)"""
    run = Settings(max_tokens=8192, world_size=1, minibatches=2, compiled=True)  # peak: start
    full = estimate(shape, run)
    per = activation_bytes_per_token_layer(shape, liger=True)
    held = COMPUTE_BYTES * shape.hidden
    cut = per - COMPUTE_BYTES * (2 * shape.hidden + shape.intermediate)
    assert full.activations == 8192 * shape.layers * per
    share = (cut - held) / (per - held)
    assert 0.65 < share < 0.67  # the 3B block's: where the line meets the plateau
    for budget in (0.0, 0.3, 0.6, share + 0.01, 0.75, 0.99):
        m = estimate(shape, replace(run, activation_budget=budget))
        kept = min(held + budget * (per - held), cut)
        assert compiled_bytes_per_token_layer(shape, budget) == kept
        assert m.activations == 8192 * shape.layers * kept  # estimate's own float64 operations
        assert m.peak_at == "start of backward"
        # The other parts are whole numbers of bytes below 2^53: float64 adds them exactly. Only
        # adding the (fractional) activations and then the loss rounds, by at most u = 2^-53 of
        # the peak each, twice per peak; the two differences round by at most u·peak more each.
        gap = full.activations - m.activations
        assert full.peak - m.peak == pytest.approx(gap, rel=0, abs=6 * 2**-53 * full.peak)
        assert compiled_share(shape, budget) == pytest.approx(min(budget, share), rel=1e-12)
    plateau = {estimate(shape, replace(run, activation_budget=b)).peak for b in (0.7, 0.8, 0.99)}
    assert len(plateau) == 1
    # eager blocks: what the budget says does not reach them
    eager = replace(run, compiled=False)
    assert estimate(shape, replace(eager, activation_budget=0.3)) == estimate(shape, eager)
    assert estimate(shape, eager).activations == full.activations  # Liger's kernels: the same a
    # activation checkpointing recomputes everything anyway: the budget changes nothing
    ac = replace(run, checkpointing=True)
    assert estimate(shape, replace(ac, activation_budget=0.2)) == estimate(shape, ac)


def test_later_minibatches_start_their_backward_with_the_gradients_alive(shape):
    one = estimate(shape, Settings(max_tokens=8192, world_size=1))
    several = estimate(shape, Settings(max_tokens=8192, world_size=1, minibatches=3))
    assert one.peak_at == several.peak_at == "start of backward"
    # every part is a whole number of bytes below 2^53, which float64 adds exactly
    assert several.peak - one.peak == one.gradients
    # 69.7 GiB: measured 69.1 GiB on one H100 with 64 samples of the SFT mix per step
    # (tools/bench/RESULTS.md, issue #7)
    assert f"{several.peak / GIB:.1f}" == "69.7"  # to the 0.1 GiB that figure is given to
    # deferred on 8 GPUs: the whole float32 gradients are counted once, not twice
    run = Settings(max_tokens=8192, world_size=8, deferred_sync=True)
    assert estimate(shape, replace(run, minibatches=3)).peak == estimate(shape, run).peak


def test_the_largest_fitting_budget(shape):
    usable = usable_bytes(H100)
    # Exact: each side rounds once, in its product by 0.92, of operands that differ by the
    # factor 2^30 (the rest is exact in binary); rounding commutes with powers of two.
    assert usable / GIB == (81559 / 1024 - 1.5) * 0.92
    short = Settings(max_tokens=4096, world_size=1, minibatches=2, compiled=True)
    assert fitting_activation_budget(shape, short, usable) == 1.0  # fits as it is
    long = replace(short, max_tokens=16384)
    budget = fitting_activation_budget(shape, long, usable)
    assert budget == 0.51  # 0.50 measured on one H100 at 71.2 GiB estimated, 69.7 real
    assert estimate(shape, replace(long, activation_budget=budget)).peak <= usable
    assert estimate(shape, replace(long, activation_budget=budget + 0.01)).peak > usable
    assert fitting_activation_budget(shape, replace(long, max_tokens=2**18), usable) is None
    assert fitting_activation_budget(shape, replace(long, checkpointing=True), usable) == 1.0


def _args(tmp_path, **keys):
    """A run file's keys; cpu_offload false unless said (where it is unset the fit may turn it
    on for a run that fits no other way: its own test)."""
    return args_from_dict(
        {"model_name_or_path": str(tmp_path), "data_path": str(tmp_path / "d.jsonl"),
         "output_dir": str(tmp_path / "out"), "learning_rate": 1e-5, "batch_size": 64,
         "max_tokens_per_gpu": 16384, "cpu_offload": False, **keys}
    )  # fmt: skip


def test_the_trainer_chooses_the_budget_for_its_gpu(tmp_path, shape, caplog):
    lengths = np.full(1000, 600)  # 64 samples of 600 tokens: 38,400 tokens, 3 rows of 16,384
    choose = dict(config=LLAMA_3B, world_size=1, liger=True, lengths=lengths)
    args = _args(tmp_path)
    fit = fit_to_gpu(args, capacity_bytes=H100, compiled=True, **choose)
    assert (fit.activation_budget, fit.keep_gathered) == (0.51, False)  # no room to keep them
    assert fit.summary.startswith("activation_memory_budget 0.51: ")
    assert "16,384 tokens per GPU fit (estimated peak 71.6 of 71.9 GiB usable)" in fit.summary
    # one minibatch per step (the whole batch fits a row): no gradients of earlier ones
    one_row = dict(choose, lengths=np.full(1000, 200))
    run = Settings(max_tokens=16384, world_size=1, compiled=True)
    expected = fitting_activation_budget(shape, run, usable_bytes(H100))
    fit = fit_to_gpu(args, capacity_bytes=H100, compiled=True, **one_row)
    assert fit.activation_budget == expected > 0.51
    # the run file's value wins; eager blocks, checkpointing and the CPU keep everything
    # (activation offload, which would make the run fit, is off: test_activation_offload_*)
    chosen = _args(tmp_path, activation_memory_budget=0.8, activation_offload=False)
    assert fit_to_gpu(chosen, capacity_bytes=H100, compiled=True, **choose).activation_budget == 0.8
    assert fit_to_gpu(chosen, capacity_bytes=None, compiled=True, **choose) == Fit(0.8)
    assert fit_to_gpu(chosen, capacity_bytes=H100, compiled=True, **choose).summary == ""
    assert fit_to_gpu(args, capacity_bytes=H100, compiled=False, **choose).activation_budget == 1
    ac = _args(tmp_path, activation_checkpointing=True)
    assert fit_to_gpu(ac, capacity_bytes=H100, compiled=True, **choose).activation_budget == 1
    assert fit_to_gpu(args, capacity_bytes=None, compiled=True, **choose) == Fit()
    # the 1B shape fits as it is: blocks stay gathered, and the log says so
    one_b = dict(choose, config=LlamaConfig(**{**LLAMA_3B.to_dict(), **LLAMA_1B}))
    fit = fit_to_gpu(args, capacity_bytes=H100, compiled=True, **one_b)
    assert (fit.activation_budget, fit.keep_gathered) == (1.0, True)
    assert fit.summary.startswith("decoder blocks stay gathered from forward to backward")
    # a row that cannot fit at all: recompute all the compiler can, and say what to change
    small = 40 * GIB
    with caplog.at_level(logging.WARNING, logger="mt_core.plan.fit"):
        assert (
            fit_to_gpu(args, capacity_bytes=small, compiled=True, **choose).activation_budget == 0
        )
    assert "even with the activations recomputed: lower it or set activation_checkpointing" in (
        caplog.text
    )


def test_one_gpu_keeps_the_blocks_gathered_where_that_fits(shape):
    one_b = model_shape(LlamaConfig(**{**LLAMA_3B.to_dict(), **LLAMA_1B}))
    usable = usable_bytes(H100)
    run = Settings(max_tokens=16384, world_size=1, minibatches=2, compiled=True)
    # 1B at 16k: every block's bf16 copy (2.0 GiB more) fits beside all activations
    fit = choose_fit(one_b, run, usable, budget=None)
    assert fit == Fit(activation_budget=1.0, keep_gathered=True)
    kept = estimate(one_b, replace(run, gathered=True))
    extra = (one_b.layers - 2) * COMPUTE_BYTES * one_b.block_params
    assert kept.copies - estimate(one_b, run).copies == extra
    assert kept.peak <= usable
    # 3B at 16k: recomputing activations to make room for gathered blocks is not worth it
    assert choose_fit(shape, run, usable, budget=None) == Fit(0.51, False)
    # but at 4k rows everything fits
    assert choose_fit(shape, replace(run, max_tokens=4096), usable, budget=None) == (Fit(1.0, True))
    # several GPUs (gathering means the whole model on each) and CPU offload: never
    assert not choose_fit(one_b, replace(run, world_size=2), usable, budget=None).keep_gathered
    assert not choose_fit(one_b, replace(run, cpu_offload=True), usable, budget=None).keep_gathered
    # eager blocks: the same rule, no budget
    assert choose_fit(one_b, replace(run, compiled=False), usable, budget=None) == Fit(1.0, True)


def test_the_budget_key_is_a_share(tmp_path):
    from mt_core import ConfigError

    with pytest.raises(ConfigError, match="activation_memory_budget: must be <= 1, got 1.5"):
        _args(tmp_path, activation_memory_budget=1.5)
    assert _args(tmp_path, activation_memory_budget=0).activation_memory_budget == 0.0


@pytest.mark.parametrize(
    "run",
    [
        Settings(max_tokens=8192, world_size=1, minibatches=2),
        Settings(
            max_tokens=8192, world_size=1, minibatches=2, compiled=True, activation_budget=0.25
        ),  # (within the knapsack's line: the budget's share)
        Settings(max_tokens=8192, world_size=1, minibatches=2, checkpointing=True),
        Settings(max_tokens=8192, world_size=4, cpu_offload=True),
    ],
    ids=["all kept", "budget 0.25", "checkpointing", "cpu_offload"],
)
def test_activation_offload_leaves_two_layers_of_activations_on_the_gpu(shape, run):
    offloaded = estimate(shape, replace(run, activation_offload=True))
    kept_here = estimate(shape, run)
    per = activation_bytes_per_token_layer(shape, liger=True)
    # what each layer keeps: its input under checkpointing, else the input and the budget's share
    # of the rest (0.25 and these integers are exact in binary: so is every sum below)
    each = COMPUTE_BYTES * shape.hidden
    if not run.checkpointing:
        each += run.activation_budget * (per - each)
    assert kept_here.activations - offloaded.activations == 8192 * (shape.layers - 2) * each
    assert offloaded.activations_end == kept_here.activations_end  # one layer at the end
    assert offloaded.peak_at == kept_here.peak_at == "start of backward"
    assert kept_here.peak - offloaded.peak == 8192 * (shape.layers - 2) * each
    # the host holds every layer's but the last (the backward pass needs that one first)
    assert offloaded.host - kept_here.host == 8192 * (shape.layers - 1) * each
    # one layer: nothing is sent, nothing changes
    one = replace(shape, layers=1)
    assert estimate(one, replace(run, activation_offload=True)) == estimate(one, run)


def test_the_trainer_turns_activation_offload_on_only_where_nothing_else_fits(tmp_path, shape):
    # 64 samples of 3,000 tokens: two rows of 131,072 per step, the gradients of the first alive
    lengths = np.full(1000, 3000)
    choose = dict(config=LLAMA_3B, world_size=1, liger=True, lengths=lengths)
    long = _args(tmp_path, max_tokens_per_gpu=131072)
    run = Settings(max_tokens=131072, world_size=1, minibatches=2, deferred_sync=True,
                   compiled=True)  # fmt: skip
    usable = usable_bytes(H100)
    assert fitting_activation_budget(shape, run, usable) is None  # no budget is enough
    fit = fit_to_gpu(long, capacity_bytes=H100, compiled=True, **choose)
    offloaded = replace(run, activation_offload=True)
    assert fit.activation_offload
    # and the budget is the largest that fits with it, as without
    # (0.99: from the aggressive cut's share on every budget keeps the same; the fit takes the
    # largest)
    assert fit.activation_budget == fitting_activation_budget(shape, offloaded, usable) == 0.99
    memory = estimate(shape, fit.applied(run))
    assert memory.peak <= usable
    assert fit.summary.endswith(
        "; activation_offload on: the decoder blocks' saved activations wait in host memory "
        f"between their forward and backward passes ({memory.host / GIB:.1f} GiB of it per GPU) "
        f"so that 131,072 tokens per GPU fit (estimated peak {memory.peak / GIB:.1f} of 71.9 GiB "
        "usable)"
    )
    # where the host has less room, the blocks keep less (what they keep is what the host holds)
    room = 100 * GIB
    fit = fit_to_gpu(long, capacity_bytes=H100, host_bytes=room, compiled=True, **choose)
    assert fit.activation_offload and fit.activation_budget == 0.28
    assert estimate(shape, fit.applied(run)).host <= room
    assert estimate(shape, replace(fit.applied(run), activation_budget=0.29)).host > room
    # less room than even the blocks' inputs need: not on (and the run does not fit)
    inputs = estimate(shape, replace(offloaded, activation_budget=0.0)).host
    assert inputs == 131072 * (shape.layers - 1) * COMPUTE_BYTES * shape.hidden
    cramped = fit_to_gpu(long, capacity_bytes=H100, host_bytes=inputs - 1, compiled=True, **choose)
    assert not cramped.activation_offload and cramped.activation_budget == 0
    # a budget that fits: not on; set false: never; set true: always (on CPU too)
    fits = fit_to_gpu(_args(tmp_path), capacity_bytes=H100, compiled=True, **choose)
    assert fits.activation_budget == 0.51 and not fits.activation_offload
    off = _args(tmp_path, max_tokens_per_gpu=131072, activation_offload=False)
    assert not fit_to_gpu(off, capacity_bytes=H100, compiled=True, **choose).activation_offload
    on = _args(tmp_path, activation_offload=True)
    fit = fit_to_gpu(on, capacity_bytes=H100, compiled=True, **choose)
    assert fit.activation_offload and "activation_offload" not in fit.summary  # not chosen
    assert fit_to_gpu(on, capacity_bytes=None, compiled=True, **choose) == Fit(
        activation_offload=True
    )
    assert fit_to_gpu(long, capacity_bytes=None, compiled=True, **choose) == Fit()
    # a GPU too small even so (the weights, gradients and AdamW state alone are 48 GiB): not on
    assert not fit_to_gpu(long, capacity_bytes=50 * GIB, compiled=True, **choose).activation_offload


@pytest.mark.parametrize(
    ("keys", "world_size", "fit", "expected"),
    [
        ({}, 1, Fit(), False),  # one GPU: the deferred whole gradient is the gradient anyway
        # ...but for bfloat16 weights it is float32, twice their own gradients
        ({"train_dtype": "bfloat16"}, 1, Fit(), True),
        ({"train_dtype": "bfloat16", "sync_gradients_every_minibatch": False}, 1, Fit(), False),
        ({}, 2, Fit(), True),  # several: each keeps only its shard between minibatches
        # cpu_offload (asked or chosen): as the fit chose, by the GPU's room for the gradients
        ({}, 1, Fit(cpu_offload=True), True),
        ({}, 1, Fit(cpu_offload=True, deferred_sync=True), False),
        ({"train_dtype": "bfloat16"}, 2, Fit(cpu_offload=True, deferred_sync=True), False),
        ({"sync_gradients_every_minibatch": False}, 1, Fit(cpu_offload=True), False),  # as asked
        ({"sync_gradients_every_minibatch": True}, 1, Fit(), True),
    ],
)
def test_when_gradients_are_reduced_every_minibatch(keys, world_size, fit, expected, tmp_path):
    assert syncs_every_minibatch(_args(tmp_path, **keys), world_size, fit) is expected


def test_under_cpu_offload_gradients_are_summed_on_the_gpu_where_they_fit(tmp_path):
    """cpu_offload and sync_gradients_every_minibatch unset: the 1B shape on 4,096-token rows
    (as measured on one H100: 2.24 s a step instead of 6.29, 10.4 GiB allocated against 10.8
    estimated, tools/bench/RESULTS.md) keeps its whole float32 gradient on the GPU over a
    step's minibatches; one byte less room than that estimate and the gradients go to host
    memory every minibatch; never where the run file says, nor without cpu_offload."""
    from mt_core.plan.shape import run_shape

    one_b = LlamaConfig(**{**LLAMA_3B.to_dict(), **LLAMA_1B})
    args = _args(tmp_path, max_tokens_per_gpu=4096, batch_size=16, cpu_offload=True)
    choose = dict(config=one_b, world_size=1, liger=True, lengths=np.full(1000, 600))
    fit = fit_to_gpu(args, capacity_bytes=H100, compiled=True, **choose)
    assert fit.cpu_offload and fit.deferred_sync
    assert "gradients summed on the GPU over the step and sent to host memory once" in fit.summary
    assert not syncs_every_minibatch(args, 1, fit)
    shape = run_shape(one_b, args)
    run = run_settings(args, 1, True, minibatches=2, compiled=True)
    assert fit.applied(run).deferred_sync and not run.deferred_sync
    deferred = estimate(shape, fit.applied(run))
    synced = estimate(shape, replace(fit, deferred_sync=False).applied(run))
    # the whole float32 gradient on the GPU, less the one block's in transit it replaces
    assert deferred.peak - synced.peak == pytest.approx(4 * shape.grad_params, rel=0.05)
    assert f"{deferred.peak / GIB:.1f}" == "10.8" and f"{synced.peak / GIB:.1f}" == "6.2"
    # the GPU's room decides, to the byte: with every activation kept, then with fewer (the
    # compiled blocks recompute the rest), down to none
    edge = dict(budget=None, may_defer_sync=True)
    assert choose_fit(shape, run, deferred.peak, **edge) == replace(fit, summary="")
    lower = choose_fit(shape, run, deferred.peak - 1, **edge)
    assert lower.deferred_sync and lower.activation_budget == 0.99
    least = estimate(shape, replace(fit.applied(run), activation_budget=0.0)).peak
    assert choose_fit(shape, run, least, **edge).deferred_sync
    assert not choose_fit(shape, run, least - 1, **edge).deferred_sync
    # the run file's choice stands; without cpu_offload there is nothing to keep from the host
    asked = _args(tmp_path, max_tokens_per_gpu=4096, batch_size=16, cpu_offload=True,
                  sync_gradients_every_minibatch=True)  # fmt: skip
    kept = fit_to_gpu(asked, capacity_bytes=H100, compiled=True, **choose)
    assert not kept.deferred_sync and syncs_every_minibatch(asked, 1, kept)
    plain = replace(run, cpu_offload=False)
    assert not choose_fit(shape, plain, usable_bytes(H100), **edge).deferred_sync


def test_under_cpu_offload_the_fit_recomputes_activations_to_sum_the_gradients_on_the_gpu(
    tmp_path,
):
    """The 8B shape at 16,384-token rows on one H100 fits only under cpu_offload; its float32
    gradient (30 GiB) fits beside the activations only if the compiled blocks keep fewer of
    them. Recomputing is the cheaper of the two costs: the fit takes budget 0.50 with the
    gradients on the GPU over 0.99 with them sent to the host every minibatch."""
    lengths = np.full(1000, 600)
    choose = dict(config=LLAMA_8B, world_size=1, liger=True, lengths=lengths, compiled=True)
    unset = _args(tmp_path, batch_size=32, cpu_offload=None)
    fit = fit_to_gpu(unset, capacity_bytes=H100, **choose)
    assert fit.cpu_offload and fit.deferred_sync and fit.activation_budget == 0.5
    every = _args(tmp_path, batch_size=32, cpu_offload=None, sync_gradients_every_minibatch=True)
    synced = fit_to_gpu(every, capacity_bytes=H100, **choose)
    assert synced.cpu_offload and not synced.deferred_sync and synced.activation_budget == 0.99


@pytest.mark.parametrize(
    ("keys", "world_size", "reduced_bytes"),
    [
        ({}, 1, 4),  # float32 weights, deferred sync (one GPU's default): float32
        ({"train_dtype": "bfloat16"}, 1, 2),  # synced every minibatch: the weights' bfloat16
        ({"train_dtype": "bfloat16", "sync_gradients_every_minibatch": False}, 1, 4),
        ({"train_dtype": "bfloat16"}, 8, 4),  # several GPUs sum in float32
    ],
)
def test_the_estimate_reduces_in_the_dtype_the_sharding_chooses(
    keys, world_size, reduced_bytes, tmp_path, shape
):
    """The memory estimate counts one block's gradient in transit as its bfloat16 value and its
    copy in FSDP2's reduction dtype: on one GPU that is what :func:`mt_fsdp.shard_model` picks
    for the run's weights and sync, read here from the policy it applies to a tiny model."""
    import torch
    from transformers import AutoModelForCausalLM

    from mt_fsdp import init_distributed, parameters_on_meta, shard_model, shutdown_distributed

    args = _args(tmp_path, **keys)
    run = run_settings(args, world_size, liger=True)
    assert reduce_bytes(run) == reduced_bytes
    base = estimate(shape, replace(run, master="float32"))
    # the rest of the compute copies does not depend on the reduction: the difference is exact
    assert estimate(shape, run).copies - base.copies == (reduced_bytes - 4) * shape.block_params
    if world_size > 1:
        return  # several ranks: gloo on one process has one; mt-fsdp's tests cover the rule
    ctx = init_distributed("cpu")
    try:
        tiny = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=64)  # fmt: skip
        with parameters_on_meta():
            model = AutoModelForCausalLM.from_config(tiny, dtype=getattr(torch, args.train_dtype))
        deferred = not syncs_every_minibatch(args, world_size, Fit())
        shard_model(model, ctx.mesh, param_dtype=torch.bfloat16, deferred_sync=deferred)
        policy = model._get_fsdp_state()._mp_policy
        assert policy.reduce_dtype.itemsize == reduced_bytes
    finally:
        shutdown_distributed()


def test_cpu_offload_is_chosen_only_where_nothing_else_fits(tmp_path, shape):
    """cpu_offload unset: the 3B shape at 131,072-token rows on one H100 fits neither with the
    smallest activation budget nor with activation offload, so the fit moves the weights,
    gradients and AdamW state to host memory (16 bytes a parameter) and says so; with too
    little host memory available, or set false, or a run that fits without it, it does not."""
    lengths = np.full(1000, 3000)
    choose = dict(config=LLAMA_3B, world_size=1, liger=True, lengths=lengths)
    unset = dict(max_tokens_per_gpu=131072, cpu_offload=None)
    no_room = dict(unset, activation_offload=False)  # set false: cpu_offload is what is left
    run = Settings(max_tokens=131072, world_size=1, minibatches=2, compiled=True)
    usable = usable_bytes(H100)
    assert fitting_activation_budget(shape, run, usable) is None
    fit = fit_to_gpu(_args(tmp_path, **no_room), capacity_bytes=H100, compiled=True, **choose)
    assert fit.cpu_offload and not fit.activation_offload
    # the gradients summed on the GPU (their own test), for which the blocks recompute more
    offloaded = replace(run, cpu_offload=True, deferred_sync=True)
    assert fit.deferred_sync
    assert fit.activation_budget == fitting_activation_budget(shape, offloaded, usable)
    memory = estimate(shape, fit.applied(run))
    assert memory.peak <= usable and memory.host == 16 * shape.params
    assert fit.summary.startswith(f"activation_memory_budget {fit.activation_budget:.2f}")
    assert (
        f"; cpu_offload on: the weights, gradients and optimizer state wait in host memory "
        f"({memory.host / GIB:.1f} GiB of it per GPU) and the optimizer step runs on the CPU, "
        "much slower so that 131,072 tokens per GPU fit"
    ) in fit.summary
    # the host must hold all of it: one byte less available and it stays off
    short = fit_to_gpu(_args(tmp_path, **no_room), capacity_bytes=H100,
                       host_bytes=memory.host - 1, compiled=True, **choose)  # fmt: skip
    assert not short.cpu_offload and estimate(shape, short.applied(run)).peak > usable
    exact = fit_to_gpu(_args(tmp_path, **no_room), capacity_bytes=H100,
                       host_bytes=memory.host, compiled=True, **choose)  # fmt: skip
    assert exact.cpu_offload
    # activation offload, the cheaper lever, is taken first where it makes the run fit
    first = fit_to_gpu(_args(tmp_path, **unset), capacity_bytes=H100, compiled=True, **choose)
    assert first.activation_offload and not first.cpu_offload
    # set false: never; a run that fits without it: not chosen; off a GPU: as set
    off = dict(no_room, cpu_offload=False)
    assert not fit_to_gpu(
        _args(tmp_path, **off), capacity_bytes=H100, compiled=True, **choose
    ).cpu_offload
    fits = fit_to_gpu(
        _args(tmp_path, cpu_offload=None), capacity_bytes=H100, compiled=True, **choose
    )
    assert not fits.cpu_offload and "cpu_offload" not in fits.summary
    assert not fit_to_gpu(
        _args(tmp_path, **no_room), capacity_bytes=None, compiled=True, **choose
    ).cpu_offload
    asked = fit_to_gpu(
        _args(tmp_path, cpu_offload=True), capacity_bytes=None, compiled=True, **choose
    )
    assert asked.cpu_offload


def test_the_fit_plans_for_what_the_process_may_use_of_its_gpu(tmp_path, monkeypatch):
    """A GPU capped by torch's per-process memory fraction, or shared with another process, is
    planned for with what this process may use of it, and the 3B run then keeps fewer
    activations; alone and uncapped, a process plans for the whole GPU as before."""
    import torch

    context = 0.5 * GIB  # this process's CUDA context: the driver no longer counts it free
    assert gpu_room_bytes(H100, free_bytes=H100 - context) == (H100, "")
    # what this process's allocator holds is its own, not another process's
    assert gpu_room_bytes(H100, free_bytes=H100 - context - 10 * GIB, own_bytes=10 * GIB) == (
        H100, "")  # fmt: skip
    room, why = gpu_room_bytes(H100, fraction=0.25, free_bytes=H100 - context)
    assert (room, why) == (H100 * 0.25, "its per-process memory fraction 0.25")
    # another process holds 20 GiB: the rest, with the context's headroom given back to
    # usable_bytes, which takes RESERVED_GIB off again
    other = 20 * GIB
    room, why = gpu_room_bytes(H100, free_bytes=H100 - other - context)
    assert room == H100 - other - context + RESERVED_GIB * GIB
    assert why == "other processes and this one's CUDA context hold 20.5 GiB"
    both = gpu_room_bytes(H100, fraction=0.5, free_bytes=H100 - other - context)
    assert both == (H100 * 0.5, "its per-process memory fraction 0.5")  # the cap is lower
    # what the trainer reads (torch.cuda, stubbed here: no GPU in the tests) is what it plans for
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (H100 - other - context, H100))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 0)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def fraction(device):  # torch's own raises for a device without an index ("cuda")
        assert device == 0
        return 1.0

    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", fraction)
    assert gpu_room(torch.device("cuda", 0), world_size=1) == (room, why)
    assert gpu_room(torch.device("cuda"), world_size=1) == (room, why)  # the current GPU
    lengths = np.full(1000, 600)
    choose = dict(config=LLAMA_3B, world_size=1, liger=True, lengths=lengths, compiled=True)
    whole = fit_to_gpu(_args(tmp_path), capacity_bytes=H100, **choose)
    shared = fit_to_gpu(_args(tmp_path), capacity_bytes=room, **choose)
    assert shared.activation_budget < whole.activation_budget == 0.51


def test_osft_references_wait_in_host_memory_in_the_lean_plan_or_where_only_that_fits():
    """OSFT's frozen copies W0 (one per projected target, in the master dtype) leave the GPU for
    host memory under activation checkpointing (its lean plan: nor do blocks stay gathered), and
    otherwise only where the run fits with them there and not without: before activation
    offload, and never where the run file says osft_reference_on_host."""
    from mt_core.plan.memory import osft_reference_bytes, osft_state_bytes
    from mt_core.plan.shape import OsftSettings

    one_b = model_shape(LlamaConfig(**{**LLAMA_3B.to_dict(), **LLAMA_1B}), osft=OsftSettings(0.25))
    run = Settings(max_tokens=16384, world_size=1, master="bfloat16", minibatches=2,
                   compiled=True)  # fmt: skip
    references = osft_reference_bytes(one_b, "bfloat16")
    assert references == 2 * one_b.osft_reference_values > 0
    # the estimate: W0 counted on the GPU, or in host memory
    on_gpu, hosted = (
        estimate(one_b, run),
        estimate(one_b, replace(run, osft_reference_on_host=True)),
    )
    assert on_gpu.osft - hosted.osft == references == hosted.host - on_gpu.host
    assert hosted.osft == osft_state_bytes(one_b, "bfloat16", reference_on_host=True)
    usable = usable_bytes(H100)
    lean = replace(run, checkpointing=True)
    # the lean plan: W0 to the host, blocks not kept gathered, though everything fits
    assert estimate(one_b, lean).peak < usable / 2
    fit = choose_fit(one_b, lean, usable, budget=None, may_host_reference=True)
    assert fit.osft_reference_on_host and not fit.keep_gathered
    # the run file's osft_reference_on_host = false (may_host_reference off): W0 stays
    kept = choose_fit(one_b, lean, usable, budget=None)
    assert not kept.osft_reference_on_host and not kept.keep_gathered
    # without checkpointing, room to spare: W0 stays on the GPU
    assert not choose_fit(one_b, run, usable, budget=None,
                          may_host_reference=True).osft_reference_on_host  # fmt: skip
    # a GPU with room for the run only with W0 in host memory (at budget 0): it goes there, and
    # activation offload, though allowed, is not needed
    tight = estimate(one_b, replace(run, activation_budget=0.0, osft_reference_on_host=True)).peak
    assert estimate(one_b, replace(run, activation_budget=0.0)).peak > tight + references / 2
    fit = choose_fit(one_b, run, tight, budget=None, may_offload=True,
                     may_host_reference=True)  # fmt: skip
    assert fit.osft_reference_on_host and not fit.activation_offload
    assert estimate(one_b, fit.applied(run)).peak <= tight
    # not allowed to move W0: nothing else fits it (activation offload saves less than W0)
    fit = choose_fit(one_b, run, tight, budget=None, may_offload=True)
    assert not fit.osft_reference_on_host and estimate(one_b, fit.applied(run)).peak > tight


def test_osft_at_8b_on_one_h100_offloads_its_frozen_data_with_the_weights(tmp_path):
    """The run mini_trainer's users bring: Llama-3.1-8B, OSFT at ratio 0.25, float32 master
    weights, one H100. Weights, gradients and AdamW state alone (16 bytes a parameter, 120 GiB)
    fit no 80 GB GPU, so the fit turns cpu_offload on; OSFT's W0 and bases then wait in host
    memory with them (mt_osft.placement stages each target's to the GPU for its projections):
    the host holds all of it, the GPU the rest, and the summary says so."""
    from mt_core.plan.fit import most_minibatches
    from mt_core.plan.memory import osft_state_bytes
    from mt_core.plan.shape import run_shape

    args = _args(tmp_path, osft=True, osft_unfreeze_rank_ratio=0.25, cpu_offload=None)
    lengths = np.full(1000, 600)
    fit = fit_to_gpu(args, config=LLAMA_8B, capacity_bytes=H100, world_size=1, compiled=True,
                     liger=True, lengths=lengths)  # fmt: skip
    assert fit.cpu_offload
    shape = run_shape(LLAMA_8B, args)
    run = run_settings(args, 1, True, most_minibatches(args, lengths, 1), compiled=True)
    memory = estimate(shape, fit.applied(run))
    frozen = osft_state_bytes(shape, "float32")  # W0 and the bases
    # as measured on an H200 (tools/gpu/osft_step_cost.py, tools/bench/RESULTS.md): 46.06 GiB
    assert f"{frozen / GIB:.2f}" == "46.06"
    assert memory.host == 16 * shape.params + frozen and memory.peak <= usable_bytes(H100)
    assert (
        "cpu_offload on: the weights, gradients and optimizer state (and OSFT's frozen copies "
        f"and bases) wait in host memory ({memory.host / GIB:.1f} GiB of it per GPU)"
    ) in fit.summary


def test_a_cpu_offload_the_node_cannot_hold_is_one_clear_error(tmp_path):
    """cpu_offload = true where the node's available memory cannot hold what its processes keep
    there: the message says how much per process and for the node, what is available and what
    lowers it, and names OSFT's frozen data where the run has it. Memory enough to the byte,
    unknown memory, or no cpu_offload: no problem."""
    from mt_core.plan.fit import host_memory_problem
    from mt_core.plan.room import readable_size
    from mt_core.plan.shape import run_shape

    for keys, names in (({}, "AdamW state of its shard;"),
                        ({"osft": True}, "AdamW state of its shard, and OSFT's frozen copies and "
                                         "bases;")):  # fmt: skip
        args = _args(tmp_path, cpu_offload=True, **keys)
        host = estimate(run_shape(LLAMA_8B, args), run_settings(args, 2, liger=True)).host
        problem = dict(config=LLAMA_8B, world_size=2, local_processes=2)
        said = host_memory_problem(args, available_bytes=2 * host - 1, **problem)
        assert said is not None and said.startswith(
            f"cpu_offload = true keeps {readable_size(host)} per process in host memory "
            f"(weights, gradients and {names} {readable_size(2 * host)} for the 2 process(es) "
            f"of this node), but only {readable_size(2 * host - 1)} is available"
        ), said
        assert "optimizer_state_dtype = 'bfloat16'" in said
        assert host_memory_problem(args, available_bytes=2 * host, **problem) is None
        assert host_memory_problem(args, available_bytes=None, **problem) is None
    plain = _args(tmp_path, cpu_offload=False)
    assert host_memory_problem(plain, available_bytes=1.0, **problem) is None


def test_the_end_of_a_gpu_run_says_its_peak_against_the_plan(tmp_path, shape):
    """Resolved.memory_report (the trainer's last line on a GPU) and kept_activation_share: the
    estimate is that of the run's worse minibatch, its largest first one of a step or its
    largest later one (which starts its backward pass with the step's earlier gradients alive);
    a peak equal to it gives the planned share back; 2 GiB less lowers the share by 2 GiB over
    what a unit of it holds (tokens x layers x (a - c·h)); with activation offload (two layers
    on the GPU) and at the end of the backward pass alike; nothing to infer for checkpointed or
    eager blocks, nothing to say without the model's shape (no GPU)."""
    from mt_core.plan.memory import kept_activation_share
    from mt_core.plan.resolve import Machine, resolve

    machine = Machine(gpu=True, world_size=1, liger_installed=True,
                      attention_backends=("sdpa",), gpu_bytes=usable_bytes(H100))  # fmt: skip
    resolved = resolve(_args(tmp_path), LLAMA_3B, machine, np.full(1000, 600), shape=shape,
                       warn=False)  # fmt: skip
    assert resolved.settings.compiled and resolved.settings.minibatches == 2
    later = replace(resolved.settings, max_tokens=12000, minibatches=2)
    budget = later.activation_budget
    assert resolved.compile_blocks and 0 < budget < compiled_share(shape, 0.99)
    planned = estimate(shape, later).peak
    # the first minibatch of a step is larger, but the later one, with the gradients, is worse
    first = replace(later, max_tokens=13000, minibatches=1)
    assert estimate(shape, first).peak < planned
    report = resolved.memory_report(13000, 12000, planned)
    assert report == (
        f"memory: peak {planned / GIB:.1f} GiB allocated; mt check's estimate for the largest "
        f"minibatch after a step's first (12,000 tokens) {planned / GIB:.1f} GiB (+0.0%); the "
        f"compiled blocks kept about {budget:.2f} of their activations beyond each block's "
        f"input, where the plan counts {budget:.2f} (budget {budget:.2f})"
    )
    # steps of one minibatch: the first ones are all there is
    alone = resolved.memory_report(16000, 0, planned)
    single = estimate(shape, replace(later, max_tokens=16000, minibatches=1)).peak
    assert f"first of a step (16,000 tokens) {single / GIB:.1f} GiB" in alone
    unit = (
        12000
        * shape.layers
        * (activation_bytes_per_token_layer(shape, True) - COMPUTE_BYTES * shape.hidden)
    )
    # float64 sums of about 1e11 bytes: each inversion is exact to about 1e-16 of them, and the
    # share is a ratio of such differences (unit ~1e10): rel 1e-12 is a wide margin over that
    lower = kept_activation_share(shape, later, planned - 2 * GIB)
    assert lower == pytest.approx(budget - 2 * GIB / unit, rel=1e-12)
    small = replace(later, max_tokens=64, minibatches=1)  # the peak at the end of the backward
    for other in (replace(later, activation_offload=True), small):
        assert kept_activation_share(shape, other, estimate(shape, other).peak) == pytest.approx(
            budget, rel=1e-12
        )
    assert estimate(shape, small).peak_at == "end of backward"
    # above the aggressive cut's share the plan counts that share, whatever the budget
    high = replace(later, activation_budget=0.9)
    share = kept_activation_share(shape, high, estimate(shape, high).peak)
    assert share == pytest.approx(compiled_share(shape, 0.9), rel=1e-12) and share < 0.67
    assert kept_activation_share(shape, replace(later, checkpointing=True), planned) is None
    assert kept_activation_share(shape, replace(later, compiled=False), planned) is None
    assert replace(resolved, shape=None).memory_report(13000, 12000, planned) is None


LLAMA_8B = LlamaConfig(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, vocab_size=128256,
)  # fmt: skip
H200 = 143771 * 2**20  # what torch.cuda reports as the H200's total memory


def test_fp8_blocks_keep_less_at_budget_1_so_the_fit_may_keep_every_activation(tmp_path):
    """Issue #29's 8B run on one H200 (bfloat16 weights with stochastic rounding, bfloat16
    moments, 16k rows): in bfloat16 every activation does not fit, and the fit recomputes at
    budget 0.99. With FP8 tensorwise the blocks keep h + 2i = 32,768 B less per token and layer
    at budget 1 (17.2 GB at this row), which fits: the run keeps every activation. Below budget
    1 the two are planned alike (FP8 keeps no more: an upper bound). On an H100 neither
    reaches budget 1, and both get the same budget."""
    keys = dict(train_dtype="bfloat16", stochastic_rounding=True,
                optimizer_state_dtype="bfloat16", batch_size=32)  # fmt: skip
    choose = dict(config=LLAMA_8B, world_size=1, liger=True, lengths=np.full(1000, 600),
                  compiled=True)  # fmt: skip
    plain, fp8 = _args(tmp_path, **keys), _args(tmp_path, **keys, float8="tensorwise")
    assert fit_to_gpu(plain, capacity_bytes=H200, **choose).activation_budget == 0.99
    assert fit_to_gpu(fp8, capacity_bytes=H200, **choose).activation_budget == 1.0
    shape = model_shape(LLAMA_8B)
    run = Settings(max_tokens=16384, world_size=1, master="bfloat16", state="bfloat16",
                   compiled=True, minibatches=2)  # fmt: skip
    as_fp8 = replace(run, float8="tensorwise")
    saving = (4096 + 2 * 14336) * 32 * 16384
    assert estimate(shape, run).peak - estimate(shape, as_fp8).peak == saving
    assert estimate(shape, as_fp8).peak <= usable_bytes(H200) < estimate(shape, run).peak
    for budget in (0.99, 0.5, 0.03):
        below = replace(run, activation_budget=budget)
        assert estimate(shape, below) == estimate(shape, replace(below, float8="tensorwise"))
    on_h100 = [fit_to_gpu(a, capacity_bytes=H100, **choose).activation_budget for a in (plain, fp8)]
    assert on_h100[0] == on_h100[1] < 1
