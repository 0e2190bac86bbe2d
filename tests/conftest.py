"""Fixtures shared by the cross-package tests: tolerances from the arithmetic, tiny random-init
models and SFT datasets built through mt-data, and runs of `mt run` in this process, in a fresh
one or under torchrun. Everything is made on the fly (nothing is downloaded)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from itertools import count
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedConfig, PreTrainedModel

from mt_core.trainer.loss import minibatch_loss, minibatch_tensors
from mt_data import SampleDataset, collate_minibatch, open_token_store


@pytest.fixture(scope="session", autouse=True)
def _one_thread_per_worker():
    """Under pytest-xdist the workers already fill the cores: a second thread per worker would
    only spin in OpenMP's waits (and the fresh processes these tests start use one thread too)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def load_module(path: Path) -> ModuleType:
    """A Python file that is not part of a package, as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def load_tool() -> Callable[[str], ModuleType]:
    """``load_tool("tools/module_map.py")``: a script of tools/ (not a package) as a module, for
    the tests of what it computes."""

    return lambda relative: load_module(Path(__file__).resolve().parents[1] / relative)


# ---- Tolerances from the arithmetic -------------------------------------------------------------
# u is float32's unit roundoff: one rounding moves a value by at most u of its size. Two float32
# computations of one quantity that differ only in the order of their sums (packing, ranks, kernel
# or CPU instruction set, compiled or eager) differ by at most γ_n = n·u of its size, n the number
# of terms summed along the way (Higham, Accuracy and Stability of Numerical Algorithms, §3.1,
# §4.2); a model's loss or gradient goes through sums over its tokens, hidden sizes and vocabulary.
U32 = torch.finfo(torch.float32).eps / 2


def float32_rtol(*lengths: int) -> float:
    """γ_n for a quantity made by sums of these lengths one after another (γ_a + γ_b <= γ_(a+b))."""
    return sum(lengths) * U32


def pair_rtol(config, tokens: int) -> float:
    """Two float32 computations of a model's loss or gradients that sum in other orders (packed or
    per sample, split minibatches): each is within γ_n of the exact value, n = the tokens summed
    plus the hidden, intermediate and vocabulary sizes, so they are within 2γ_n of each other."""
    sizes = (config.hidden_size, config.intermediate_size, config.vocab_size)
    return 2 * float32_rtol(tokens, *sizes)


def trajectory_rtol(
    tokens: int, sizes: tuple[int, ...], *, steps: int, lr: float, params: int
) -> float:
    """Two float32 runs of ``steps`` steps whose sums differ in order (other rank counts), with
    eps >= max_grad_norm = 1: each update moves their weights apart by at most lr 2γ_n per element
    (:func:`first_step_atol`), which moves a loss by at most |∇L|_1 lr 2γ_n <= √P |∇L|_2 lr 2γ_n,
    P parameters. With √P lr <= 1 and gradients of norm <= 1, each step adds at most one more
    2γ_n to the loss's own 2γ_n (n the tokens plus the model ``sizes``)."""
    assert math.sqrt(params) * lr <= 1, "the bound needs √P lr <= 1"
    return 2 * float32_rtol(tokens, *sizes) * (1 + steps)


def adamw_first_step(
    weights: dict, grads: dict, *, lr: float, eps: float, weight_decay: float = 0.0
) -> dict[str, torch.Tensor]:
    """The weights after AdamW's first step, in float64. Bias correction makes m = g and v = g², so
    the betas drop out: w (1 - lr wd) - lr g / (|g| + eps). Weights without a gradient stay."""
    out = {}
    for name, w in weights.items():
        w = w.detach().double()
        g = grads.get(name)
        out[name] = (
            w
            if g is None
            else (w * (1 - lr * weight_decay) - lr * g.double() / (g.double().abs() + eps))
        )
    return out


def first_step_atol(
    weight: torch.Tensor, *, lr: float, eps: float, grad_error: float
) -> torch.Tensor:
    """How far a float32 first AdamW step may land from :func:`adamw_first_step` when its gradient
    may be off by ``grad_error``: g / (|g| + eps) has slope eps / (|g| + eps)² <= 1 / eps, so the
    update moves by at most lr · grad_error / eps; plus the float32 rounding of the update's four
    operations on |w| and on the update (<= lr). Tests choose eps near the largest gradient, so
    the first term stays small while |g| / eps still spans the nonlinear range."""
    return lr * grad_error / eps + 4 * U32 * (weight.detach().double().abs() + lr)  # fmt: skip


# Small enough for CPU tests in milliseconds, with grouped-query attention (2 KV heads for 4).
TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 128,
}


@pytest.fixture
def tiny_causal_lm() -> Callable[..., PreTrainedModel]:
    """``tiny_causal_lm(config_class, seed=0, **overrides)`` -> a float32 random-init causal LM of
    :data:`TINY_SHAPE` (``overrides`` replace or add config fields), in train mode."""

    def build(config_class: type[PreTrainedConfig], seed: int = 0, **overrides) -> PreTrainedModel:
        config = config_class(**{**TINY_SHAPE, **overrides})
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()

    return build


@pytest.fixture
def sft_dataset(tmp_path_factory) -> Callable[[list[dict]], SampleDataset]:
    """``sft_dataset(rows)`` -> SampleDataset of JSONL ``rows`` ({"input_ids", "labels"}), built
    through a real token store."""
    folder = tmp_path_factory.mktemp("sft")
    numbers = count()

    def build(rows: list[dict]) -> SampleDataset:
        path = folder / f"data{next(numbers)}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return SampleDataset(open_token_store(path, cache_dir=folder / "cache"))

    return build


# The padding-free equivalence pattern (test_padding_free.py, test_model_families.py): a packed
# minibatch through mt's loss against the unmodified HF model run on each sample alone.


def sft_rows(seed: int, vocab: int, num_samples: int = 6) -> list[dict]:
    """Samples of 2..40 tokens; a prompt-like prefix and scattered positions are not learnt."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(num_samples):
        length = int(rng.integers(2, 41))
        tokens = rng.integers(0, vocab, length)
        labels = tokens.copy()
        labels[: int(rng.integers(0, length // 2 + 1))] = -100
        labels[rng.random(length) < 0.2] = -100
        labels[-1] = tokens[-1]  # at least one target, so the dataset keeps the sample
        rows.append({"input_ids": tokens.tolist(), "labels": labels.tolist()})
    return rows


def packed(dataset: SampleDataset, ids, global_count: int) -> dict:
    """The samples ``ids`` as one packed row: keyword arguments of minibatch_loss."""
    minibatch = collate_minibatch(dataset, np.array(ids, dtype=np.int64), global_count)
    return minibatch_tensors(minibatch, torch.device("cpu"))


def global_count(dataset: SampleDataset, ids) -> int:
    return int(sum(dataset.loss_counts[i] for i in ids))


def grads(model) -> dict[str, torch.Tensor]:
    """The gradients of the trained (not frozen) parameters."""
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def packed_loss_and_grads(model, minibatches) -> tuple[float, dict[str, torch.Tensor]]:
    """Accumulates the gradients of ``minibatches`` (kwargs of minibatch_loss) as training does."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    for minibatch in minibatches:
        loss = minibatch_loss(model, **minibatch)
        loss.backward()
        total += loss.item()
    return total, grads(model)


def reference_loss_and_grads(model, dataset, ids) -> tuple[float, dict[str, torch.Tensor]]:
    """The unmodified HF path: eager attention (its explicit causal / sliding-window mask is the
    definition), each sample alone, labels unshifted (HF shifts them), HF's mean loss weighted
    back to a sum and divided by the batch's target count."""
    # Really switched back: the padding-free function would refuse these calls (no cu_seq_lens).
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    count = global_count(dataset, ids)
    model.zero_grad(set_to_none=True)
    total = 0.0
    for i in ids:
        sample = dataset.kept[i]
        input_ids = torch.from_numpy(np.asarray(dataset.store.tokens(sample), dtype=np.int64))
        labels = torch.from_numpy(np.asarray(dataset.store.sample_labels(sample), dtype=np.int64))
        loss = model(input_ids=input_ids[None], labels=labels[None]).loss
        loss = loss * int(dataset.loss_counts[i]) / count
        loss.backward()
        total += loss.item()
    return total, grads(model)


def grad_difference(actual: dict, expected: dict) -> tuple[float, str]:
    """The largest gradient difference relative to the largest expected gradient, and where."""
    assert actual.keys() == expected.keys()
    scale = max(g.abs().max().item() for g in expected.values())
    assert scale > 0
    return max(((actual[n] - g).abs().max().item() / scale, n) for n, g in expected.items())


@pytest.fixture(scope="session")
def equivalence() -> SimpleNamespace:
    """The helpers above (importlib mode: test modules cannot import each other or conftest)."""
    return SimpleNamespace(
        sft_rows=sft_rows, packed=packed, global_count=global_count, grads=grads,
        packed_loss_and_grads=packed_loss_and_grads,
        reference_loss_and_grads=reference_loss_and_grads, grad_difference=grad_difference,
        U32=U32, float32_rtol=float32_rtol, pair_rtol=pair_rtol, adamw_first_step=adamw_first_step,
        first_step_atol=first_step_atol, trajectory_rtol=trajectory_rtol,
    )  # fmt: skip


# Runs mt's real train() but SIGKILLs itself inside step KILL_AT_STEP (an environment variable),
# after the forward and backward passes and before the optimizer step: the worst moment to die.
# Run as ``python killer.py RUN.toml OUTPUT_DIR``, also under torchrun.
KILLER = """
import os, signal, sys
import mt_core.trainer.step as trainer_step
from mt_core import load_run_file, train
calls = 0
original = trainer_step.clip_gradients
def clip_then_die(model, max_norm):
    global calls
    calls += 1
    if calls == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return original(model, max_norm)
trainer_step.clip_gradients = clip_then_die
train(load_run_file(sys.argv[1], {"output_dir": sys.argv[2]}))
"""


@pytest.fixture(scope="session")
def killer_source() -> str:
    """The text of a script that trains and kills itself mid-step (see :data:`KILLER`)."""
    return KILLER


# ---- Runs ----------------------------------------------------------------------------------------
# The tiny Llama that the end-to-end tests train (a few thousand parameters, untied head).
TINY_LLAMA = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64,
}  # fmt: skip
BIN = Path(sys.executable).parent  # the workspace venv: python, mt and torchrun
# One thread per process: the runs are tiny, and torchrun's ranks share the machine's cores.
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
FORKED_RANKS = load_module(Path(__file__).with_name("forked_ranks.py"))


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory) -> Path:
    """:data:`TINY_LLAMA` with random weights (seed 0), saved once per test run: read-only."""
    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**TINY_LLAMA)).save_pretrained(folder)
    return folder


def write_run(path: Path, **keys) -> Path:
    """A run file of ``keys`` (None: left out)."""
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items() if v is not None))
    return path


def write_counting_data(path: Path) -> Path:
    """40 samples of 5 to 17 tokens counting in steps of 3 (mod 64), the first two masked: the
    data of the resume and multi-node runs."""
    rows = []
    for i in range(40):
        tokens = [(7 * i + 3 * j) % 64 for j in range(5 + i % 13)]
        rows.append({"input_ids": tokens, "labels": [-100] * 2 + tokens[2:]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def launch(*arguments: str, nproc: int = 1, script: Path | None = None, env: dict | None = None,
           check: bool = True) -> subprocess.CompletedProcess:  # fmt: skip
    """``mt ARGUMENTS`` (or ``python SCRIPT ARGUMENTS``) in a new process, or on ``nproc``
    ranks started as torchrun starts them, each forked from a process that has imported mt
    already (tests/forked_ranks.py: the start-up is paid once per pytest worker); with
    ``check``, a failure shows its stderr."""
    result = FORKED_RANKS.launch_forked(list(arguments), nproc=nproc, script=script,
                                        env={**ENV, **(env or {})})  # fmt: skip
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def exported_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    """The weights of the one HF export in ``output_dir``."""
    (folder,) = (output_dir / "hf_format").iterdir()
    return load_file(folder / "model.safetensors")


def train_here(output_dir: Path, run_file: Path | None = None, **keys):
    """A run in this process (no start-up cost) of ``keys``, or of ``run_file`` with ``keys`` as
    overrides, into ``output_dir``: the run's result and its metrics."""
    from mt_core import args_from_dict, load_run_file, train

    keys = {**keys, "output_dir": str(output_dir)}
    result = train(load_run_file(run_file, keys) if run_file else args_from_dict(keys))
    return result, metrics(output_dir)


def same_first_step(one: Path, two: Path, tokens: int, lr: float = 1e-2) -> None:
    """Two float32 runs of one step of :data:`TINY_LLAMA`-sized models with eps = max_grad_norm
    = 1 (clipped gradients are <= 1, so every update is at most lr / eps sensitive to its
    gradient): the losses and gradient norms within 2γ_n, n the batch's tokens plus hidden,
    intermediate and vocabulary sizes, and every weight within twice first_step_atol of the
    exact step, so within that of each other."""
    a, b = metrics(one), metrics(two)
    sizes = (TINY_LLAMA["hidden_size"], TINY_LLAMA["intermediate_size"], TINY_LLAMA["vocab_size"])
    rtol = 2 * float32_rtol(tokens, *sizes)
    assert b[0]["loss"] == pytest.approx(a[0]["loss"], rel=rtol)
    assert b[0]["grad_norm"] == pytest.approx(a[0]["grad_norm"], rel=rtol)
    a, b = exported_weights(one), exported_weights(two)
    assert a.keys() == b.keys()
    for name in a:
        atol = 2 * first_step_atol(a[name], lr=lr, eps=1.0, grad_error=rtol / 2)
        error = (b[name].double() - a[name].double()).abs()
        assert (error <= atol).all(), (name, (error / atol).max().item())


@pytest.fixture(scope="session")
def runs() -> SimpleNamespace:
    """The helpers above (importlib mode: test modules cannot import conftest)."""
    return SimpleNamespace(
        TINY_LLAMA=TINY_LLAMA, BIN=BIN, ENV=ENV, write_run=write_run,
        write_counting_data=write_counting_data, launch=launch,
        metrics=metrics, exported_weights=exported_weights, train_here=train_here,
        same_first_step=same_first_step,
    )  # fmt: skip
