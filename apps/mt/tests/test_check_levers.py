"""mt check's levers: the peak per GPU with each memory-saving setting, and the cheapest
combination that fits when the run as asked does not (issue #18)."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from itertools import product

import pytest
from transformers import LlamaConfig

from mt import cli
from mt.check import make_plan
from mt.check_levers import cheapest_fit, levers
from mt.check_plan import fitted
from mt_core import load_run_file
from mt_core.plan.memory import GIB, estimate

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)  # fmt: skip
LLAMA_70B = dict(LLAMA_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                 num_attention_heads=64)  # fmt: skip


@pytest.fixture(scope="module", params=[LLAMA_8B], ids=["8B"])
def run_file(tmp_path_factory, request):
    """Llama-3.1-8B (its config only: mt check needs no weights), rows of 16,384 tokens, 64
    samples of 100 to 4,000 tokens."""
    return write_run(tmp_path_factory.mktemp("levers"), request.param)


def write_run(folder, config: dict):
    model = folder / "model"
    LlamaConfig(**config).save_pretrained(model)
    rng = random.Random(2)
    rows = []
    for _ in range(64):
        ids = [rng.randrange(1000) for _ in range(rng.randrange(100, 4000))]
        rows.append(json.dumps({"input_ids": ids, "labels": ids}))
    (folder / "data.jsonl").write_text("\n".join(rows) + "\n")
    run = folder / "run.toml"
    run.write_text(
        f'model_name_or_path = "{model}"\ndata_path = "{folder / "data.jsonl"}"\n'
        f'output_dir = "{folder / "out"}"\nbatch_size = 32\nmax_tokens_per_gpu = 16384\n'
        # cpu_offload unset would be turned on where nothing else fits, as the trainer does
        "learning_rate = 1e-5\nuse_liger_kernels = true\ncpu_offload = false\n"
    )
    return run


def plan_of(run_file, gpu: str = "H100", **keys):
    return make_plan(load_run_file(run_file, keys), str(run_file), gpu_name=gpu, batches=2)


def fitted_peak(plan, **changes) -> float:
    run = replace(plan.settings, **changes)
    return estimate(plan.shape, fitted(plan.args, plan.shape, run, plan.gpu)).peak


def test_each_lever_is_listed_with_its_own_fitted_peak(run_file, capsys):
    """8B with float32 state on one H100 does not fit (16 bytes a parameter: 120 GiB before
    activations); bfloat16 weights with stochastic rounding (8 bytes) or CPU offload do."""
    plan = plan_of(run_file)
    assert not plan.fits
    usable = plan.gpu.usable_gib * GIB
    expected = {  # the lever's keys: its change, and whether it fits alone
        "optimizer_state_dtype = 'bfloat16'": (dict(state="bfloat16"), False),
        "optimizer_state_dtype = '8bit'": (dict(state="8bit"), False),
        "train_dtype = 'bfloat16', stochastic_rounding = true": (dict(master="bfloat16"), True),
        "train_dtype = 'bfloat16', stochastic_rounding = true, optimizer_state_dtype = '8bit'": (
            dict(master="bfloat16", state="8bit"), True),
        "activation_checkpointing = true": (dict(checkpointing=True), False),
        "activation_offload = true": (dict(activation_offload=True), False),
        "cpu_offload = true": (dict(cpu_offload=True), True),
    }  # fmt: skip
    assert [lever.keys for lever in levers(plan.settings)] == list(expected)
    with pytest.raises(SystemExit):
        cli.main(["check", str(run_file), "--gpu=H100"])
    out = capsys.readouterr().out
    for keys, (changes, fits) in expected.items():
        peak = fitted_peak(plan, **changes)
        assert (peak <= usable) == fits, keys
        assert (
            f"          - {keys}: peak {peak / GIB:.1f} GiB, {'fits' if fits else 'still'}" in out
        )


def test_the_cheapest_fitting_combination_is_named(run_file, capsys):
    """Among every combination that fits, the one named needs no CPU offload (some fit without)
    and recomputes least: with bfloat16 weights and 8-bit moments the compiled blocks keep more
    of their activations than with bfloat16 weights alone, so that one is cheaper."""
    plan = plan_of(run_file)
    chosen, peak = cheapest_fit(plan)
    assert [lever.keys for lever in chosen] == [
        "train_dtype = 'bfloat16', stochastic_rounding = true, optimizer_state_dtype = '8bit'"
    ]
    both = replace(plan.settings, master="bfloat16", state="8bit")
    alone = replace(plan.settings, master="bfloat16")
    budget = fitted(plan.args, plan.shape, both, plan.gpu).activation_budget
    assert budget > fitted(plan.args, plan.shape, alone, plan.gpu).activation_budget
    assert peak == fitted_peak(plan, master="bfloat16", state="8bit") <= plan.gpu.usable_gib * GIB
    with pytest.raises(SystemExit):
        cli.main(["check", str(run_file), "--gpu=H100"])
    assert (
        "cheapest settings that fit: train_dtype = 'bfloat16', stochastic_rounding = true, "
        f"optimizer_state_dtype = '8bit' (peak {peak / GIB:.1f} GiB)"
    ) in capsys.readouterr().out


def test_offload_is_named_only_when_nothing_else_fits(tmp_path):
    """Llama-3.1-70B on one H100: its weights alone are 131 GiB in bfloat16, so no precision
    change fits, with or without checkpointing. CPU offload alone is named: its compiled
    blocks keep some of their activations (less recomputation than checkpointing), and once
    the state is in host memory bfloat16 weights lower the GPU's peak only by one block's
    gradient copy for the reduction (float32 to bfloat16 on one GPU: 1.7 GB), which saves
    less than a hundredth of a step of recomputation: not worth a precision change."""
    plan = plan_of(write_run(tmp_path, LLAMA_70B))
    usable = plan.gpu.usable_gib * GIB
    for master, state, checkpointing in product(("float32", "bfloat16"), (None, "bfloat16", "8bit"),
                                                (False, True)):  # fmt: skip
        assert fitted_peak(plan, master=master, state=state, checkpointing=checkpointing) > usable
    chosen, peak = cheapest_fit(plan)
    assert [lever.keys for lever in chosen] == ["cpu_offload = true"]
    offloaded = replace(plan.settings, cpu_offload=True)
    assert fitted(plan.args, plan.shape, offloaded, plan.gpu).activation_budget > 0
    assert peak <= usable


def test_a_run_that_fits_names_no_cheapest_settings(run_file, capsys):
    cli.main(["check", str(run_file), "--gpu=H200", "--optimizer_state_dtype=bfloat16"])
    out = capsys.readouterr().out
    assert "verdict fits" in out and "levers" in out and "cheapest" not in out


def test_fp8_is_a_speed_lever_only_on_gpus_with_fp8_tensor_cores(run_file, tmp_path, capsys):
    """On an H200 (compute capability 9.0) float8 is listed, with the share of the matmul
    weights it converts (8B: q, o and the MLP of every block, 6.71 B of 7.50 B); on an A100
    (8.0) it is not, and a run file that sets it there is one error at the key's line."""
    from mt.check_levers import float8_lever

    hopper = plan_of(run_file, "H200")
    assert hopper.shape.float8_params == 32 * (2 * 4096**2 + 3 * 4096 * 14336)
    lever = float8_lever(hopper)
    assert lever.changes == dict(float8="tensorwise")
    assert lever.cost.startswith("speed: 89% of the matmul weights compute in FP8")
    cli.main(["check", str(run_file), "--gpu=H200"])
    peak = fitted_peak(hopper, float8="tensorwise")  # listed with its fitted peak as the others
    line = f"          - float8 = 'tensorwise': peak {peak / GIB:.1f} GiB, "
    assert any(x.startswith(line) and x.endswith(f"({lever.cost})")
               for x in capsys.readouterr().out.splitlines())  # fmt: skip
    assert float8_lever(plan_of(run_file, "A100")) is None
    with pytest.raises(SystemExit):
        cli.main(["check", str(run_file), "--gpu=A100"])
    assert "float8 =" not in capsys.readouterr().out

    with_key = tmp_path / "run.toml"
    with_key.write_text(run_file.read_text() + 'float8 = "tensorwise"\n')
    line = len(with_key.read_text().splitlines())
    with pytest.raises(SystemExit) as exit_status:
        cli.main(["check", str(with_key), "--gpu=A100"])
    assert exit_status.value.code == 2
    assert (
        f"{with_key}:{line}: float8: FP8 compute needs a GPU with FP8 tensor cores (compute "
        "capability 8.9 or more: Ada, Hopper, Blackwell); this GPU's is 8.0: unset float8"
    ) in capsys.readouterr().err


def test_fp8_in_the_plan_settings_time_and_memory(run_file, capsys):
    """Set on an H200: the settings line says it, the time is bounded below by the converted
    layers' products at twice bfloat16's rate, the memory plan is bfloat16's (and says so),
    and the lever is no longer offered."""
    from mt.check_levers import float8_lever
    from mt_core.plan.step_time import float8_time_factor

    plain = plan_of(run_file, "H200")
    fp8 = plan_of(run_file, "H200", float8="tensorwise")
    assert "compute bfloat16 (large linear layers FP8 tensorwise)" in fp8.resolved.describe()
    assert fp8.memory == plain.memory
    assert any(note.startswith("float8: weights, gradients and optimizer state are as without")
               for note in fp8.notes)  # fmt: skip
    assert float8_lever(fp8) is None
    for slow, fast in zip(plain.steps, fp8.steps, strict=True):
        # about 5.5 of the 8B's 6N + attention FLOPs a token are in the FP8 layers' products
        assert 0.5 < fast.time_s / slow.time_s < 0.6
    shape = fp8.shape
    assert float8_time_factor(shape, 1000, 0) == 1 - shape.float8_params / (2 * shape.matmul_params)
    cli.main(["check", str(run_file), "--gpu=H200", "--float8=tensorwise"])
    out = capsys.readouterr().out
    assert "settings weights float32, compute bfloat16 (large linear layers FP8 tensorwise)" in out
    assert "the FP8 layers (89% of the matmul weights) at twice bfloat16's rate" in out
