"""Optimizer-state precision and stochastic rounding (issue #18): the moments are stored as
chosen and take the bytes the memory model counts; plain bfloat16 weights lose small updates and
stochastic rounding keeps them on average; each setting trains the tiny example like float32
AdamW, on one process and on two gloo ranks; each resumes bit for bit."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from mt_core.optim.build import build_optimizer
from mt_core.optim.quant_blocks import quant_block
from mt_core.plan.memory import STATE_BYTES

# the tests of the training runs go to one worker (pytest-xdist): they share the runs of `trained`
SHARES_RUNS = pytest.mark.xdist_group("optimizer_precision")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny"
U32 = torch.finfo(torch.float32).eps / 2
SETTINGS = {  # run-file keys of each choice besides float32 AdamW
    "bfloat16 moments": dict(optimizer_state_dtype="bfloat16"),
    "8-bit moments": dict(optimizer_state_dtype="8bit"),
    "bfloat16 weights, stochastic rounding": dict(train_dtype="bfloat16", stochastic_rounding=True),
    "bfloat16 weights, stochastic rounding, 8-bit moments": dict(
        train_dtype="bfloat16", stochastic_rounding=True, optimizer_state_dtype="8bit"
    ),
}


def example_matrices() -> list[tuple[int, int]]:
    """The shapes of the tiny example's matrices: embeddings and LM head, q/o, k/v, gate/up, down."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(EXAMPLE / "model")
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * config.head_dim
    return [(v, h), (h, h), (kv, h), (i, h), (h, i)]


def one_step(master: torch.dtype, **choices) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A 64 x 256 weight (16,384 values: torchao quantizes it) and a 64-value bias (too small to
    quantize) after one AdamW step."""
    torch.manual_seed(0)
    model = nn.Linear(256, 64).to(master)
    optimizer = build_optimizer(model, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                                **choices)  # fmt: skip
    model(torch.randn(8, 256, dtype=master)).square().sum().backward()
    optimizer.step()
    return model, optimizer


@pytest.mark.parametrize(
    ("master", "state", "stochastic", "stored"),
    [
        (torch.float32, None, False, torch.float32),
        (torch.float32, "bfloat16", False, torch.bfloat16),
        (torch.float32, "8bit", False, None),
        (torch.bfloat16, None, True, torch.bfloat16),
        (torch.bfloat16, "float32", True, torch.float32),
        (torch.bfloat16, "8bit", True, None),
    ],
)
def test_the_moments_are_stored_as_chosen_in_the_bytes_the_memory_model_counts(
    master, state, stochastic, stored
):
    model, optimizer = one_step(master, state_dtype=state, stochastic_rounding=stochastic)
    plain = state is None and not stochastic
    assert isinstance(optimizer, torch.optim.AdamW) == plain  # today's path stays torch's AdamW
    assert all(isinstance(group["lr"], float) for group in optimizer.param_groups)
    # as on resume: torch's loader would cast the moments to the weights' dtype
    optimizer.load_state_dict(optimizer.state_dict())
    weight, bias = optimizer.state[model.weight], optimizer.state[model.bias]
    for key in ("exp_avg", "exp_avg_sq"):
        if stored is None:  # 8-bit: a byte per value and a float32 scale per block
            moment = weight[key]
            assert moment.codes.dtype == torch.uint8 and moment.codes.numel() == 64 * 256
            assert moment.scale.dtype == torch.float32 and moment.scale.numel() == 64 * 256 // 256
            held = moment.codes.nbytes + moment.scale.nbytes
            assert held == STATE_BYTES["8bit"] * model.weight.numel() == 16_640
            assert bias[key].dtype == master  # under 4096 values: not quantized
        else:
            assert weight[key].dtype == bias[key].dtype == stored
            held = weight[key].nbytes
            assert held == STATE_BYTES[str(stored).removeprefix("torch.")] * weight[key].numel()
    # the moments equal float32 AdamW's to their storage precision (first step: (1 - β) g, (1 -
    # β2) g², rounded once: bfloat16 to 2^-8 of each value, 8-bit codes to half the widest step
    # of their map, 0.9 / 64 / 2 of the block's largest value)
    reference, exact = one_step(torch.float32)
    moment = weight["exp_avg"]
    got = moment.dequantize() if stored is None else moment.float()
    want = exact.state[reference.weight]["exp_avg"]
    bound = (0.9 / 64 / 2 * want.abs().max()) if stored is None else 2**-8 * want.abs()
    if master == torch.float32:  # (bfloat16 weights make other gradients)
        assert ((got - want).abs() <= bound + 4 * U32 * want.abs()).all()


@pytest.mark.parametrize(
    ("shape", "block"),
    [
        ((64, 256), 256),  # rows a multiple of 256 (every matrix of the Llama family)
        ((14336, 4096), 256),
        ((64, 128), 128),  # the tiny example's hidden size: half-row blocks would straddle
        ((100, 2880), 64),  # GPT-OSS's hidden size: 2880 = 45 x 64
        ((4096,), None),  # a norm: shards of a 1-D tensor end anywhere
        ((8, 256), None),  # 2,048 values: too small to be worth it
        ((64, 4097), None),  # no power-of-two factor of 32 or more in the row
    ],
)
def test_8bit_blocks_follow_whole_rows(shape, block):
    """The block depends on the whole shape only and divides a row: FSDP2's shards (whole rows
    on any rank count, uneven ones included) never cut a block, so a checkpoint's moments load
    on any rank count, and each rank stores exactly those blocks (codes and scales)."""
    assert quant_block(shape) == block
    if block is None:
        return
    row = math.prod(shape[1:])
    for world in (1, 2, 3, 5, 8):  # torch.chunk's cuts, as FSDP2 makes them
        rows = [len(chunk) for chunk in torch.empty(shape[0], 0).chunk(world)]
        assert all(r * row % block == 0 for r in rows) and sum(rows) == shape[0]
    weight = nn.Parameter(torch.zeros(shape))
    optimizer = build_optimizer(nn.ParameterList([weight]), lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                                weight_decay=0.0, state_dtype="8bit")  # fmt: skip
    moment = optimizer._new_buffer(weight, signed=True)  # what the first step stores
    assert moment.block_size == block and moment.scale.numel() == math.prod(shape) // block


def test_the_compiled_step_makes_one_graph_per_tensor_rank_in_one_pass():
    """Every process compiles torchao's update afresh (about 2 s a graph on a 2-core CPU, at
    the start of every run), so the count matters. With 8-bit moments the matrices' update is
    one graph and the vectors' (plain moments: too small to quantize) another, whatever the
    sizes: left to its default, the compiler would make one more for a square matrix (its two
    sizes equal) and one more for 256 rows (the size of the 8-bit map), as the tiny example
    has. Each graph is traced once: with its float arguments left dynamic, the compiler would
    trace the first one twice (it restarts when lerp needs its weight as a constant), which
    its AOT-autograd count shows as an attempt that did not finish. The count starts from an
    empty compile cache (this process's other compiled functions compile again when next
    called)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = nn.ParameterList(
        nn.Parameter(torch.randn(shape))
        for shape in [(64, 256), (128, 128), (256, 128), (512, 256), (128,), (300,)]
    )
    optimizer = build_optimizer(model, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                                state_dtype="8bit")  # fmt: skip
    for parameter in model:
        parameter.grad = torch.randn_like(parameter)

    def count() -> list[int]:  # graphs made, compilations started and finished
        return [
            counters["stats"]["unique_graphs"],
            *(counters["aot_autograd"][k] for k in ("total", "ok")),
        ]

    before = count()
    optimizer.step()
    assert [a - b for a, b in zip(count(), before, strict=True)] == [2, 2, 2]


def test_torchao_alone_would_keep_float32_moments_for_float32_weights():
    """The negative control of the test above: torchao's AdamW keeps its moments in the
    weights' dtype, so mt's choice of bfloat16 moments is what makes them bfloat16."""
    from torchao.optim import _AdamW

    model = nn.Linear(256, 64)
    optimizer = _AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model(torch.randn(8, 256)).sum().backward()
    optimizer.step()
    assert optimizer.state[model.weight]["exp_avg"].dtype == torch.float32


def test_bfloat16_weights_lose_small_updates_and_stochastic_rounding_keeps_them_on_average():
    """2^18 weights of 1.5, where bfloat16 values are 2^-7 apart, each given the same gradient
    for 4 AdamW steps of lr 2^-9: with a constant gradient every update is lr (m̂ = g, v̂ = g²,
    eps negligible), a quarter of the spacing, so the exact weight ends at 1.5 - 4·2^-9."""
    n, steps, lr, spacing = 2**18, 4, 2**-9, 2**-7

    def trained(master: torch.dtype, **choices) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Module()
        model.w = nn.Parameter(torch.full((n,), 1.5, dtype=master))
        optimizer = build_optimizer(model, lr=lr, betas=(0.9, 0.95), eps=1e-12,
                                    weight_decay=0.0, **choices)  # fmt: skip
        for _ in range(steps):
            model.w.grad = torch.ones_like(model.w)
            optimizer.step()
        return model.w.detach().double()

    exact = 1.5 - steps * lr
    # float32 master weights move by it, to float32's rounding of each step (u of 1.5 each)
    assert (trained(torch.float32) - exact).abs().max() <= steps * 2 * U32 * 1.5
    # round to nearest: each update is under half the spacing and is lost, every step
    assert (trained(torch.bfloat16) == 1.5).all()  # torch's AdamW, today's bfloat16 path
    assert (trained(torch.bfloat16, state_dtype="float32") == 1.5).all()  # torchao, nearest
    rounded = trained(torch.bfloat16, stochastic_rounding=True)
    # each step rounds to one of the two neighbours of its float32 result: after 4 steps every
    # weight is on the grid between 1.5 - 4·2^-7 and 1.5
    grid = (1.5 - rounded) / spacing
    assert ((grid == grid.round()) & (grid >= 0) & (grid <= steps)).all()
    # Each rounding is unbiased (up with probability the dropped fraction), so every weight's
    # expected value is the float32 result; the 2^18 weights are independent draws in a range
    # of a = 4·2^-7, and Hoeffding's inequality puts their mean within a·√(ln(2/p) / 2n) of it
    # except with probability p = 1e-9; plus float32's rounding of the four results.
    a, p = steps * spacing, 1e-9
    bound = a * math.sqrt(math.log(2 / p) / (2 * n)) + steps * 2 * U32 * 1.5
    assert abs(rounded.mean().item() - exact) <= bound
    assert steps * lr > 30 * bound  # the bound tells "moved by 4·2^-9" from "did not move"


# ---- Training the tiny example -------------------------------------------------------------------
# 30 steps of 16 samples at a constant lr of 1e-4: the float32 loss falls from 5.58 by about 0.19,
# and most updates are smaller than half the bfloat16 spacing of their weight (weights ~0.02:
# 2^-13). Half the example's batch, for the suite's time: the runs with bfloat16 weights compute
# in bfloat16 on a CPU with its kernels (in float32 on one without: mt_core.plan.resolve).
# Each run keeps a checkpoint of step 27: the resume tests continue it for the last three steps,
# and the run itself is the uninterrupted one they must equal.
STEPS, LR, CHECKPOINT_AT = 30, 1e-4, 27
LEARNS = 0.15  # the float32 run's drop must exceed it (0.19 measured): the runs do learn


def example_keys(**setting) -> dict:
    return dict(model_name_or_path=str(EXAMPLE / "model"), data_path=str(EXAMPLE / "data.jsonl"),
                batch_size=16, max_tokens_per_gpu=1024, learning_rate=LR, num_warmup_steps=0,
                lr_scheduler="constant", training_mode="step", max_steps=STEPS, seed=42,
                save_final_checkpoint=False, checkpoint_every_steps=CHECKPOINT_AT,
                attn_backend="sdpa", **setting)  # fmt: skip


def test_no_cpu_compiler_is_one_clear_error_before_any_weight(runs, tmp_path, monkeypatch):
    """torchao's step is compiled, on the CPU with a C++ compiler: without one the run stops
    with one message before the model is built (build_model here would fail the test)."""
    import torch._inductor.cpp_builder as cpp_builder

    import mt_core.trainer.setup as trainer_setup
    from mt_core import ConfigError

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda *args: "no-such-c++")
    monkeypatch.setattr(trainer_setup, "build_model", lambda *args, **kwargs: pytest.fail("loaded"))
    with pytest.raises(ConfigError, match=r"optimizer_state_dtype = 'bfloat16'.*C\+\+ compiler"):
        runs.train_here(tmp_path / "out", **example_keys(optimizer_state_dtype="bfloat16"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, runs):
    """``trained(name, nproc)``: the output_dir of ``SETTINGS[name]`` (or "float32", or "bfloat16
    weights": plain rounding) trained on the tiny example, made once and only read."""
    root = tmp_path_factory.mktemp("precision")
    made: dict[tuple[str, int], Path] = {}
    extra = {"float32": {}, "bfloat16 weights": dict(train_dtype="bfloat16")}

    def get(name: str, nproc: int = 1) -> Path:
        if (name, nproc) not in made:
            keys = example_keys(**{**SETTINGS, **extra}[name])
            out = root / f"{len(made)}"
            if nproc == 1:
                runs.train_here(out, **keys)
            else:
                run = runs.write_run(root / f"{len(made)}.toml", **keys, output_dir=str(out))
                runs.launch("run", str(run), nproc=nproc)
            made[name, nproc] = out
        return made[name, nproc]

    return get


@pytest.fixture(scope="module")
def curve(trained, runs):
    """``curve(name, nproc)``: the losses of :func:`trained`'s run."""
    return lambda name, nproc=1: [line["loss"] for line in runs.metrics(trained(name, nproc))]


# Margin: the coarsest stored moment is the 8-bit one, within half its map's widest step, 0.70%
# of its block's largest value. An update made from such moments is off by about that fraction,
# so to first order the loss drop, the sum of the updates' effects, is off by about that
# fraction; three times it, 2.1% of the float32 run's whole drop, leaves room for the second-
# order terms and the compounding over 30 steps. Stochastic rounding adds zero-mean noise; so
# does the bfloat16 arithmetic that bfloat16 weights compute in on a CPU with bfloat16 kernels
# (no bound is derived for these two: they average out over the sums of a loss and over the
# steps). Plain bfloat16 weights at this lr lose most updates and miss by far more (the
# negative control).
MARGIN = 3 * 0.9 / 64 / 2


def within_margin(losses: list[float], reference: list[float]) -> tuple[bool, float]:
    drop = reference[0] - min(reference)
    assert drop > LEARNS, drop
    worst = max(abs(a - b) for a, b in zip(losses, reference, strict=True))
    return worst <= MARGIN * drop, worst / drop


@SHARES_RUNS
@pytest.mark.slow(20)
@pytest.mark.parametrize("name", SETTINGS)
def test_each_setting_trains_within_the_margin_of_float32(curve, name):
    assert len(curve(name)) == STEPS
    ok, share = within_margin(curve(name), curve("float32"))
    assert ok, f"{name}: {share:.2%} of the float32 drop"


@SHARES_RUNS
@pytest.mark.slow(8)
def test_plain_bfloat16_weights_miss_the_margin(curve):
    """The negative control: the test above can fail (today's train_dtype = 'bfloat16')."""
    ok, share = within_margin(curve("bfloat16 weights"), curve("float32"))
    assert not ok, f"{share:.2%}"


# Two of the four settings over the whole run (the other two over 10 steps below, to keep the
# suite's time): the 8-bit moments and stochastic rounding of the last one cover the two
# mechanisms that differ across shards (blocks, random bits); the first takes the other code
# path (torchao's AdamW with bfloat16 moment buffers).
@SHARES_RUNS
@pytest.mark.slow(45)
@pytest.mark.parametrize("name", ["bfloat16 moments",
                                  "bfloat16 weights, stochastic rounding, 8-bit moments"])  # fmt: skip
def test_two_gloo_ranks_train_like_one_process(curve, name):
    """Two ranks sum their gradients in another order than one process (float32: relative
    differences of γ_n), draw other random bits for stochastic rounding, and may round a
    stored moment to the neighbouring code where the two float32 values straddle a rounding
    boundary. None of this is bit for bit; each is within the margin above. The 8-bit blocks are
    the same on both (quant_block: whole rows of the matrix), and every matrix of the example
    has 8-bit moments (asserted below), so the comparison covers all of them."""
    for shape in example_matrices():
        assert quant_block(shape) is not None, shape
    ok, share = within_margin(curve(name, nproc=2), curve(name))
    assert ok, f"{name}: 2 ranks differ from 1 by {share:.2%} of the drop"


@SHARES_RUNS
@pytest.mark.slow(25)
@pytest.mark.parametrize("name", ["8-bit moments", "bfloat16 weights, stochastic rounding"])
def test_the_other_settings_train_alike_on_two_ranks(curve, runs, tmp_path, name):
    """The two settings the test above leaves out, over their first 10 steps (the suite's
    time): two gloo ranks stay within the same margin of one process, the same share of the
    one-process run's whole drop."""
    keys = {**example_keys(**SETTINGS[name]), "max_steps": 10}
    run = runs.write_run(tmp_path / "run.toml", **keys, output_dir=str(tmp_path / "out"))
    runs.launch("run", str(run), nproc=2)
    two = [line["loss"] for line in runs.metrics(tmp_path / "out")]
    one = curve(name)
    drop = one[0] - min(one)
    assert len(two) == 10 and drop > LEARNS, (two, drop)
    worst = max(abs(a - b) for a, b in zip(two, one[:10], strict=True))
    assert worst <= MARGIN * drop, (
        f"{name}: 2 ranks differ from 1 by {worst / drop:.2%} of the drop"
    )


# ---- Resume --------------------------------------------------------------------------------------


@SHARES_RUNS
@pytest.mark.slow(25)
@pytest.mark.parametrize(
    ("name", "nproc"),
    [("bfloat16 moments", 1), ("bfloat16 weights, stochastic rounding, 8-bit moments", 2)],
)
def test_each_setting_resumes_bit_for_bit(trained, runs, tmp_path, capsys, name, nproc):
    """A copy of a run of the curves above resumed from its checkpoint of step 27: steps 28-30
    equal the uninterrupted run's bit for bit (8-bit moments and the random bits of stochastic
    rounding included: the checkpoint holds the quantized state and every rank's generator)."""
    whole = trained(name, nproc)
    resumed = shutil.copytree(whole, tmp_path / "resumed")
    keys = example_keys(**SETTINGS[name])
    if nproc == 1:  # in this process: the checkpoint, not the command line, is the subject
        capsys.readouterr()
        (result, _) = runs.train_here(resumed, **keys)
        assert result.steps == STEPS
        said = capsys.readouterr().out
    else:
        run = runs.write_run(tmp_path / "run.toml", **keys, output_dir=str(resumed))
        said = runs.launch("run", str(run), nproc=nproc).stdout
    assert f"(step {CHECKPOINT_AT})" in said and "resumed from" in said, said[-2000:]
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == [f"step_{CHECKPOINT_AT}"]
    want, again = runs.metrics(whole), runs.metrics(resumed)
    assert [s["step"] for s in again] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm", "lr"):
        assert [s[key] for s in again] == [s[key] for s in want], key
    checkpoint = resumed / "checkpoints" / f"step_{CHECKPOINT_AT}"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == CHECKPOINT_AT


@SHARES_RUNS
@pytest.mark.slow(30)
def test_an_8bit_checkpoint_resumes_on_another_rank_count(trained, curve, runs, tmp_path):
    """The 2-rank run's checkpoint of step 27 resumes on 3 ranks, whose shards of the
    example's 64-row matrices (22, 22 and 20 rows) cut the 2-rank shards mid-way: its 8-bit
    moments load (block by block: quant_block makes the same blocks on every rank count), and
    steps 28-30 continue the curve within the margin that holds between 2 ranks and 1 process
    (other summation orders, other random bits for stochastic rounding). At the end the run
    exports the model to HF as any run does: it loads, in the example's names and shapes."""
    from transformers import AutoModelForCausalLM

    name = "bfloat16 weights, stochastic rounding, 8-bit moments"
    whole = trained(name, 2)
    resumed = shutil.copytree(whole, tmp_path / "resumed")
    keys = dict(example_keys(**SETTINGS[name]), save_final_checkpoint=True)
    run = runs.write_run(tmp_path / "run.toml", **keys, output_dir=str(resumed))
    said = runs.launch("run", str(run), nproc=3).stdout
    assert f"(step {CHECKPOINT_AT})" in said and "resumed from" in said, said[-2000:]
    again = runs.metrics(resumed)
    assert [s["step"] for s in again] == list(range(1, STEPS + 1))
    ok, share = within_margin([s["loss"] for s in again], curve(name, 2))
    assert ok, f"3 ranks after 2 differ by {share:.2%} of the drop"
    initial = AutoModelForCausalLM.from_pretrained(EXAMPLE / "model").state_dict()
    exported = runs.exported_weights(resumed)
    assert {k: v.shape for k, v in exported.items()} == {
        k: v.shape for k, v in initial.items() if k in exported
    } and len(exported) >= len(initial) - 1  # (an LM head tied to the embeddings: stored once)
    assert all(torch.isfinite(v).all() for v in exported.values())
    assert not torch.equal(exported["model.norm.weight"].float(), initial["model.norm.weight"])
