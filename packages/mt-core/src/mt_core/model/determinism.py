"""Deterministic kernels for bit-reproducible GPU runs (the run-file key ``deterministic``).

Two GPU runs of the same step differ where kernels add floating-point numbers in an order that
changes from run to run: attention backward passes that accumulate a query's gradient with
atomics (in whatever order the thread blocks finish), cuBLAS's split-K reductions into a
shared workspace, and compiled kernels whose tile sizes the compiler picks by timing
candidates (a different winner sums in a different order). :func:`deterministic_kernels`
turns each of them off for the span of a run:

* ``torch.use_deterministic_algorithms(True)``: every op takes its deterministic implementation
  or raises; PyTorch's own flash and memory-efficient attention backward passes (``sdpa``,
  ``torch_varlen``) read it, and :mod:`mt_core.model.attention_kernels` hands it to flash-attn 2
  and flash-attn-4 as their ``deterministic`` argument;
* ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, which cuBLAS needs for deterministic matmuls (torch raises
  without it): it is read when the first cuBLAS handle is made, so the run sets it before any
  GPU work;
* ``torch._inductor.config.deterministic``: the compiled blocks' kernels are chosen without
  timing them;
* cuDNN's attention off: its backward has no deterministic mode in torch (2.11 to 2.15), and
  torch's varlen attention (``torch_varlen``) picks it on Hopper whatever the flag says (SDPA
  skips it under deterministic algorithms by itself).

Uninitialized memory is not filled (torch fills it with NaN under deterministic algorithms by
default, a memset per allocation): mt's kernels read only what they wrote.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

__all__ = ["CUBLAS_WORKSPACE_CONFIG", "deterministic_kernels"]

# the larger of the two workspaces cuBLAS accepts as deterministic (":16:8" is slower)
CUBLAS_WORKSPACE_CONFIG = ":4096:8"


@contextlib.contextmanager
def deterministic_kernels(enabled: bool) -> Iterator[None]:
    """Deterministic kernels inside the block where ``enabled`` (else nothing changes); on leaving,
    every setting is put back as it was, so a later run in the same process is not affected."""
    if not enabled:
        yield
        return
    import torch._inductor.config as inductor_config
    import torch.utils.deterministic as deterministic

    saved_env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        deterministic.fill_uninitialized_memory,
        torch.backends.cuda.cudnn_sdp_enabled(),
    )
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIG
    torch.use_deterministic_algorithms(True)
    deterministic.fill_uninitialized_memory = False
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        with inductor_config.patch(deterministic=True):
            yield
    finally:
        if saved_env is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved_env
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        deterministic.fill_uninitialized_memory = saved[2]
        torch.backends.cuda.enable_cudnn_sdp(saved[3])
