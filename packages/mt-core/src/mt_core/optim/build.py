"""Optimizer, learning-rate schedule and gradient clipping over sharded parameters.

AdamW is PyTorch's (fused on a GPU) when its moments are in the master weights' dtype and the
weights are rounded as usual; lower-precision moments and stochastic rounding of bfloat16
weights take torchao's AdamW (:mod:`mt_core.optim.low_precision`, the torchao extra), whose use
:func:`check_optimizer` vets before any weight is loaded.
"""

from __future__ import annotations

import logging
import shutil

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import get_scheduler

from mt_core.config import ConfigError

__all__ = [
    "STATE_DTYPES",
    "build_optimizer",
    "build_scheduler",
    "check_optimizer",
    "clip_gradients",
    "uses_torchao",
]

logger = logging.getLogger(__name__)

# optimizer_state_dtype's choices; '8bit' is a quantization, not a torch dtype
STATE_DTYPES: dict[str, torch.dtype | None] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "8bit": None,
}


def uses_torchao(state_dtype: str | None, stochastic_rounding: bool, master: torch.dtype) -> bool:
    """Whether these choices need torchao: moments not in the ``master`` weights' dtype, or
    stochastic rounding (torch's AdamW keeps its state in the weights' dtype and rounds to
    nearest)."""
    return stochastic_rounding or (state_dtype is not None and STATE_DTYPES[state_dtype] != master)


def check_optimizer(
    state_dtype: str | None,
    stochastic_rounding: bool,
    master: torch.dtype,
    device: torch.device,
    offloaded: bool = False,
) -> None:
    """One ConfigError, before any weight is loaded, when the chosen optimizer cannot run with
    parameters on ``device``: torchao missing, or no C++ compiler for its compiled CPU step.
    ``offloaded``: the parameters were moved off a GPU (cpu_offload), where a slow CPU step
    deserves a warning."""
    if not uses_torchao(state_dtype, stochastic_rounding, master):
        return
    if offloaded and state_dtype == "8bit":
        # measured on 2 CPU threads, 14.7M values a step: 8-bit moments 275 ms, bfloat16 19 ms
        # (tools/bench/RESULTS.md); on one H200 an 8B step took minutes
        logger.warning(
            "optimizer_state_dtype = '8bit' with cpu_offload = true: torchao's 8-bit step is "
            "about 15x slower on the CPU than bfloat16 moments; optimizer_state_dtype = "
            "'bfloat16' needs 1 byte more per moment value of host memory"
        )
    key = (
        f"optimizer_state_dtype = {state_dtype!r}"
        if state_dtype is not None and STATE_DTYPES[state_dtype] != master
        else "stochastic_rounding = true"
    )
    try:
        import mt_core.optim.low_precision  # noqa: F401
    except ImportError as error:
        raise ConfigError(
            [f"{key} needs torchao ({error}): pip install 'mt-core[torchao]'"]
        ) from None
    if device.type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler

        compiler = get_cpp_compiler()
        if shutil.which(compiler) is None:
            raise ConfigError(
                [
                    f"{key}: torchao's optimizer step is compiled (torch.compile), and on the CPU "
                    f"that needs a C++ compiler; {compiler!r} is not installed (set CXX to one)"
                ]
            )
    elif device.type != "cuda":
        raise ConfigError(
            [f"{key}: torchao's optimizer step runs on CPU and CUDA only, not on {device.type}"]
        )


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    state_dtype: str | None = None,
    stochastic_rounding: bool = False,
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, its moments in ``state_dtype`` (None: the weights'
    dtype); the fused CUDA kernel when torch's AdamW serves and the weights are on a GPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    hyper = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if not uses_torchao(state_dtype, stochastic_rounding, params[0].dtype):
        fused = all(p.device.type == "cuda" for p in params)
        return torch.optim.AdamW(params, **hyper, fused=fused or None)
    from mt_core.optim import low_precision

    if state_dtype == "8bit":
        return low_precision.AdamW8bit(params, **hyper, bf16_stochastic_round=stochastic_rounding)
    moments = params[0].dtype if state_dtype is None else STATE_DTYPES[state_dtype]
    return low_precision.AdamW(
        params, **hyper, state_dtype=moments, bf16_stochastic_round=stochastic_rounding
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    *,
    warmup_steps: int,
    total_steps: int | None,
    kwargs: dict | None = None,
) -> torch.optim.lr_scheduler.LRScheduler:
    """transformers' scheduler factory; ``total_steps`` None only for schedules without an end."""
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup_steps,
        num_training_steps=total_steps,
        scheduler_specific_kwargs=kwargs or None,
    )


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    """The gradients' global L2 norm over all shards of all ranks (a 0-d tensor on the GPU, also
    when the gradients are offloaded to the CPU: reading it waits for the GPU); clipped to
    ``max_norm`` unless it is 0. Every rank gets the same value."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(norm, DTensor):  # sharded gradients: the norm of the local shards, reduced
        local, mesh = norm.to_local(), norm.device_mesh
        if local.device.type != mesh.device_type:  # cpu_offload: NCCL reduces GPU tensors only
            norm = DTensor.from_local(local.to(mesh.device_type), mesh, norm.placements)
        norm = norm.full_tensor()
    if max_norm > 0:
        params = [p for p in model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm
