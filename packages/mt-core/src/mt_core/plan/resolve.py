"""The one resolver of a run's unset speed and memory settings.

A run file may leave Liger, compilation, the attention backend, the activation budget, the
offloads and the gradient sync unset; :func:`resolve` fills each in from the run file and the
:class:`Machine` it trains on. The trainer calls it for the machine it runs on
(:func:`this_machine`), ``mt check`` for the GPU it plans for (:func:`planned_machine`): what a
plan describes is what a run does.

The rules (each measured where it is a speed choice: tools/bench/RESULTS.md):

* Liger's kernels: on a GPU where liger-kernel is installed and has kernels for the
  architecture (without them the logits are materialised, and the memory plan says so); kept
  in deterministic runs: the fused loss's backward is chunked matmuls in a fixed order and a
  kernel per row, with no atomics;
* compiled decoder blocks: on a GPU;
* compute in bfloat16 on a GPU (FSDP mixed precision), in train_dtype on the CPU, or in float32
  where the CPU has no fast kernel for it (:func:`compute_dtype`, with a note); the decoder
  blocks' large linear layers in FP8 where the run file sets ``float8`` (a ConfigError on the
  CPU and on GPUs without FP8 tensor cores: :func:`mt_core.model.float8.float8_problem`);
* attention ``auto``: the first backend that can run on the machine (flash-attn-4, flash-attn 2,
  PyTorch's varlen, per-document SDPA), the first that computes attention sinks for a model
  with them, and in a deterministic run the first with a deterministic backward pass there
  (an explicit backend without one is a ConfigError);
* gradients reduce-scattered after every minibatch on several GPUs, for master weights
  narrower than float32 and under cpu_offload where the GPU has no room to sum them over the
  step (:func:`mt_core.plan.fit.syncs_every_minibatch`);
* the activation budget, kept-gathered blocks and the offloads: :func:`mt_core.plan.fit.fit_to_gpu`
  for the GPU and host memory the machine leaves the process.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from mt_core.config import ConfigError, TrainingArgs
from mt_core.plan import fit as fitting
from mt_core.plan import room as rooms
from mt_core.plan.fit import Fit, most_minibatches, run_settings, syncs_every_minibatch
from mt_core.plan.memory import (
    GIB,
    ModelShape,
    Settings,
    compiled_share,
    estimate,
    kept_activation_share,
    worst_minibatch,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from mt_core.plan.memory import Gpu
    from mt_fsdp import DistContext

__all__ = [
    "Machine",
    "Resolved",
    "compute_dtype",
    "planned_machine",
    "resolve",
    "resolve_this_process",
    "this_machine",
]

# compute capability of the GPUs ``mt check --gpu`` knows (flash-attn-4 needs 9.0)
_CAPABILITY = {"H100": (9, 0), "H200": (9, 0), "A100": (8, 0), "A100-40": (8, 0)}
# what oneDNN's half-precision matrix products need of an x86 CPU (:func:`slow_cpu_dtypes`)
_ONEDNN_NEEDS = {"bfloat16": "AVX-512", "float16": "AVX-512-FP16 or AMX"}


@dataclass(frozen=True)
class Machine:
    """What a run's settings depend on of the machine it trains on."""

    gpu: bool  # CUDA GPUs (else the CPU)
    world_size: int
    liger_installed: bool  # liger-kernel imports there
    attention_backends: tuple[str, ...]  # those that can run there, in the order auto prefers
    gpu_bytes: float | None = None  # the GPU memory one process may plan for (None: no GPU)
    host_bytes: float = math.inf  # the host memory one process may fill with offloads
    # the GPU's compute capability where a choice depends on it (flash-attn-4 can run there:
    # its deterministic backward does not run on 12.x; float8 is set: FP8 tensor cores), else None
    gpu_capability: tuple[int, int] | None = None
    # the half-precision train_dtypes whose matrix products this CPU has no fast kernel for
    slow_cpu_dtypes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Resolved:
    """Every speed and memory setting of a run, as it will train."""

    liger: bool
    compile_blocks: bool
    attn_backend: str
    sync_each_minibatch: bool
    train_dtype: str  # the master weights' (the run file's)
    compute_dtype: str  # what the forward and backward passes compute in
    deterministic: bool  # bit-reproducible kernels (mt_core.model.determinism)
    float8: str | None  # the FP8 recipe of the blocks' large linear layers (None: bfloat16)
    fit: Fit  # activation budget, kept-gathered blocks, offloads (and what to say of them)
    settings: Settings  # what the memory estimate is made for: the run with its fit
    shape: ModelShape | None = None  # built where the fit needs it (a GPU)
    notes: tuple[str, ...] = field(default=())  # settings that differ from what one expects

    def describe(self) -> str:
        """One line of what was chosen, in the words of ``mt check``'s plan."""
        fit = self.fit
        on = {True: "on", False: "off"}
        return (
            f"weights {self.train_dtype}, compute {self.compute_dtype}"
            + (f" (large linear layers FP8 {self.float8})" if self.float8 else "")
            + f", attention "
            f"{self.attn_backend}, liger {on[self.liger]}, compiled blocks "
            f"{on[self.compile_blocks]}, activation budget {fit.activation_budget:.2f}, "
            f"activation offload {on[fit.activation_offload]}, cpu_offload "
            f"{on[fit.cpu_offload]}, gradient sync "
            f"{'every minibatch' if self.sync_each_minibatch else 'once a step'}"
            + (", OSFT W0 in host memory" if fit.osft_reference_on_host else "")
            + (", deterministic on" if self.deterministic else "")
        )

    def memory_report(
        self, first_tokens: int, later_tokens: int, measured_bytes: float
    ) -> str | None:
        """One line for the end of a GPU run: its peak against ``mt check``'s estimate for the
        minibatches it ran (on one GPU: ``first_tokens`` the largest first minibatch of a step,
        ``later_tokens`` the largest later one, 0 where no step had two; a later one starts its
        backward pass with the step's earlier gradients alive), and where compiled blocks kept
        part of their activations, the share the peak implies against the share the plan
        counts (a calibration point of the memory model's compiled-activation term). None
        without a shape (no GPU)."""
        if self.shape is None or max(first_tokens, later_tokens) <= 0 or measured_bytes <= 0:
            return None
        run = worst_minibatch(self.shape, self.settings, first_tokens, later_tokens)
        planned = estimate(self.shape, run).peak
        which = "first of a step" if run.minibatches == 1 else "after a step's first"
        line = (
            f"memory: peak {measured_bytes / GIB:.1f} GiB allocated; mt check's estimate for the "
            f"largest minibatch {which} ({run.max_tokens:,} tokens) {planned / GIB:.1f} GiB "
            f"({planned / measured_bytes - 1:+.1%})"
        )
        share = kept_activation_share(self.shape, run, measured_bytes)
        if share is not None and run.activation_budget < 1:
            line += (
                f"; the compiled blocks kept about {share:.2f} of their activations beyond "
                f"each block's input, where the plan counts "
                f"{compiled_share(self.shape, run.activation_budget):.2f} (budget "
                f"{run.activation_budget:.2f})"
            )
        return line


def resolve(
    args: TrainingArgs,
    config: PretrainedConfig,
    machine: Machine,
    lengths: np.ndarray,
    *,
    shape: ModelShape | None = None,
    warn: bool = True,
) -> Resolved:
    """Every unset speed and memory setting of ``args`` on ``machine``, for training samples of
    these ``lengths``. ``shape``: the model's (:func:`mt_core.plan.shape.run_shape`), built
    here where the machine has a GPU and it is not given; ``warn``: log a warning where nothing
    makes the run fit."""
    # torch: only once the run file is good
    from mt_core.model.attention import auto_backend, deterministic_backward_problem
    from mt_core.model.float8 import MIN_DIMENSION, float8_problem
    from mt_core.plan.shape import liger_supports, run_shape

    if args.float8 is not None:
        problem = float8_problem(machine.gpu, machine.gpu_capability)
        if problem is not None:
            raise ConfigError([f"float8: {problem}"])
    notes = []
    liger = args.use_liger_kernels
    if liger is None:
        liger = machine.gpu and machine.liger_installed
        if liger and liger_supports(config.model_type) is False:
            liger = False
            notes.append(
                f"liger-kernel has no kernels for model_type {config.model_type!r}: the logits "
                "are materialised (the loss row)"
            )
    compiled = machine.gpu if args.torch_compile is None else args.torch_compile
    if args.float8 is not None and not compiled:
        notes.append(
            "float8 without compiled blocks: torchao's scaling and casts around each FP8 "
            "product run as separate kernels, which torch.compile fuses; expect little gain"
        )
    if machine.gpu and shape is None:
        shape = run_shape(config, args)
    if args.float8 is not None and shape is not None and not shape.float8_params:
        notes.append(
            f"float8 = {args.float8!r} converts no linear layer of this model (each has a side "
            "too small for FP8 to pay, mt_core.model.float8.MIN_DIMENSION): it computes in "
            "bfloat16"
            + (
                f"; 'tensorwise' converts from {MIN_DIMENSION['tensorwise']} up"
                if args.float8 != "tensorwise"
                else ""
            )  # fmt: skip
        )
    compute = compute_dtype(args.train_dtype, machine)
    if not machine.gpu and compute != args.train_dtype:
        notes.append(
            f"train_dtype = {args.train_dtype!r} computes in float32 on this CPU: it has no fast "
            f"{args.train_dtype} matrix products (oneDNN's need "
            f"{_ONEDNN_NEEDS[args.train_dtype]}) and PyTorch's fallback loop is 10-100x slower "
            f"(the weights, their gradients and the optimizer state stay {args.train_dtype}; the "
            "bundled example in bfloat16 on a 2-core AVX2 CPU: 8,400 tokens/s computing in "
            "float32, 980 in bfloat16)"
        )
    attention = args.attn_backend
    if attention == "auto":
        attention = auto_backend(
            machine.attention_backends, sinks=bool(shape and shape.sinks),
            deterministic=args.deterministic, capability=machine.gpu_capability,
        )  # fmt: skip
    elif args.deterministic:
        problem = deterministic_backward_problem(attention, machine.gpu_capability)
        if problem is not None:
            raise ConfigError([
                f"attn_backend: {problem}, which deterministic = true needs: use attn_backend "
                "= 'flash_attn' (flash-attn 2), 'torch_varlen' or 'auto' (which picks one that "
                "has it)"
            ])  # fmt: skip
    fit = fitting.fit_to_gpu(
        args, config, capacity_bytes=machine.gpu_bytes if machine.gpu else None,
        host_bytes=machine.host_bytes, world_size=machine.world_size, compiled=compiled,
        liger=liger, lengths=lengths, shape=shape, warn=warn,
    )  # fmt: skip
    minibatches = most_minibatches(args, lengths, machine.world_size)
    run = run_settings(args, machine.world_size, liger, minibatches, compiled)
    return Resolved(
        liger=liger,
        compile_blocks=compiled,
        attn_backend=attention,
        sync_each_minibatch=syncs_every_minibatch(args, machine.world_size, fit),
        train_dtype=args.train_dtype,
        compute_dtype=compute,
        deterministic=args.deterministic,
        float8=args.float8,
        fit=fit,
        settings=fit.applied(run),
        shape=shape,
        notes=tuple(notes),
    )


def resolve_this_process(
    args: TrainingArgs, config: PretrainedConfig, ctx: DistContext, lengths: np.ndarray
) -> Resolved:
    """:func:`resolve` on this process's machine: its GPU's room
    (:func:`mt_core.plan.room.gpu_room`, said when less than the whole GPU) and its share of the
    node's host memory; the main rank prints what the fit chose. A run file whose cpu_offload
    the node's memory cannot hold is a ConfigError."""
    on_gpu = ctx.device.type == "cuda"
    capacity, smaller = rooms.gpu_room(ctx.device, ctx.world_size) if on_gpu else (None, "")
    if smaller:
        print(f"rank {ctx.rank}: planning for {capacity / GIB:.1f} GiB of GPU memory: {smaller}",
              flush=True)  # fmt: skip
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    available = rooms.available_host_bytes()
    machine = this_machine(
        ctx, gpu_bytes=capacity, host_bytes=rooms.host_room_bytes(available, local_processes),
        float8=args.float8 is not None,
    )  # fmt: skip
    resolved = resolve(args, config, machine, lengths)
    if ctx.is_main:  # the run's first words: what it chose, as mt check says it
        print(f"settings {resolved.describe()}", flush=True)
        if resolved.fit.summary:
            print(resolved.fit.summary, flush=True)
        for note in resolved.notes:
            print(f"note: {note}", flush=True)
    problem = fitting.host_memory_problem(
        args, config, world_size=ctx.world_size, available_bytes=available,
        local_processes=local_processes,
    )  # fmt: skip
    if problem is not None:
        raise ConfigError([problem])
    return resolved


def this_machine(
    ctx: DistContext, *, gpu_bytes: float | None, host_bytes: float, float8: bool = False
) -> Machine:
    """The machine this process trains on: its device, the kernels installed, and the GPU and
    host memory its fit may plan for (:func:`mt_core.plan.room.gpu_room`,
    :func:`mt_core.plan.room.host_room_bytes`); ``float8``: the run asks for FP8 compute, whose
    tensor cores its GPU's compute capability says."""
    import torch

    from mt_core.model.attention import runnable_backends
    from mt_core.model.build import liger_available

    on_gpu = ctx.device.type == "cuda"
    backends = runnable_backends(ctx.device)
    # asked only where it decides something (and where runnable_backends has asked already)
    asks = on_gpu and (float8 or "flash_attn_4" in backends)
    capability = tuple(torch.cuda.get_device_capability(ctx.device)) if asks else None
    return Machine(
        gpu=on_gpu,
        world_size=ctx.world_size,
        liger_installed=on_gpu and liger_available(),
        attention_backends=backends,
        gpu_bytes=gpu_bytes if on_gpu else None,
        host_bytes=host_bytes,
        gpu_capability=capability,
        slow_cpu_dtypes=() if on_gpu else slow_cpu_dtypes(),
    )


def slow_cpu_dtypes() -> tuple[str, ...]:
    """The half-precision dtypes this x86 CPU multiplies without a fast kernel. oneDNN's
    bfloat16 products need AVX-512 and its float16 ones AVX-512-FP16 or AMX; without them
    PyTorch falls back to a scalar loop (pytorch/pytorch#146508: 1024x128 by 128x256 took 50 ms
    in bfloat16 against 0.44 ms in float32 on an AVX2 CPU). Other CPUs: none said."""
    import platform

    import torch

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ()
    native = {
        "bfloat16": torch.ops.mkldnn._is_mkldnn_bf16_supported(),
        "float16": torch.ops.mkldnn._is_mkldnn_fp16_supported(),
    }
    return tuple(dtype for dtype, fast in native.items() if not fast)


def planned_machine(
    device: Gpu, world_size: int, capability: tuple[int, int] | None = None
) -> Machine:
    """The machine ``mt check`` plans for: ``world_size`` GPUs like ``device`` with mt's GPU
    install (liger-kernel is a dependency on Linux) and the attention kernels installed here, for
    a GPU of compute ``capability`` (by default that of the GPUs ``--gpu`` knows, else 9.0).
    Its host memory is not known here: offloads are planned as if it had room."""
    from mt_core.model.attention import runnable_backends

    if capability is None:
        capability = _CAPABILITY.get(device.name, (9, 0))
    return Machine(
        gpu=True,
        world_size=world_size,
        liger_installed=True,
        attention_backends=runnable_backends("cuda", capability=capability),
        gpu_bytes=device.memory_gib * GIB,
        gpu_capability=capability,
    )


def compute_dtype(train_dtype: str, machine: Machine) -> str:
    """What the forward and backward passes compute in (FSDP2 casts the gathered weights to it):
    bfloat16 on a GPU; on a CPU train_dtype, or float32 where the CPU has no fast kernel for it.
    float32 holds every bfloat16 or float16 product exactly and sums in float32 as their kernels
    do; it rounds less between the operations, at float32's speed instead of a scalar loop's."""
    if machine.gpu:
        return "bfloat16"
    return "float32" if train_dtype in machine.slow_cpu_dtypes else train_dtype
