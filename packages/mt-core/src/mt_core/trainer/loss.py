"""Loss of one packed minibatch, normalised by the target count of the whole global batch.

Each minibatch returns ``sum of its token cross-entropies / global_num_loss_tokens``; summing the
backward passes of every minibatch of every rank therefore gives the gradient of one big unpadded
batch, however the samples were packed.

The unmodified HF model computes it, through its own loss function (or Liger's fused linear
cross-entropy when Liger patched the model): ``shift_labels`` hands it targets that are already
shifted per sample (so it does not shift the packed row across document boundaries), and
``num_items_in_batch`` switches it to ``reduction="sum"`` divided by that count. transformers
5.17 to 5.24 (``loss_utils.ForCausalLMLoss``) and liger-kernel 0.8 both read them so.
"""

from __future__ import annotations

from typing import TypedDict

import numpy as np
import torch
from transformers import PreTrainedModel

from mt_data import IGNORE_INDEX, PackedMinibatch

__all__ = ["MinibatchTensors", "minibatch_loss", "minibatch_tensors"]


class MinibatchTensors(TypedDict):
    """The keyword arguments of :func:`minibatch_loss` after the model."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    global_num_loss_tokens: int


def minibatch_tensors(minibatch: PackedMinibatch, device: torch.device) -> MinibatchTensors:
    """The numpy arrays of ``minibatch`` as tensors on ``device``, keyed for ``minibatch_loss``:
    ``minibatch_loss(model, **minibatch_tensors(minibatch, device))``."""
    device = torch.device(device)
    # a copy from pageable host memory is still safe with non_blocking: it only overlaps more
    # when the source happens to be pinned
    non_blocking = device.type == "cuda"

    def move(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(device, non_blocking=non_blocking)

    return MinibatchTensors(
        input_ids=move(minibatch.input_ids),
        position_ids=move(minibatch.position_ids),
        targets=move(minibatch.labels),
        cu_seqlens=move(minibatch.cu_seqlens),
        max_seqlen=int(minibatch.max_seqlen),
        global_num_loss_tokens=int(minibatch.global_num_loss_tokens),
    )


def minibatch_loss(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    targets: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    global_num_loss_tokens: int,
) -> torch.Tensor:
    """(Sum of the token cross-entropies of one packed row) / ``global_num_loss_tokens``.

    ``input_ids``, ``position_ids`` and ``targets`` are ``(1, T)`` int64 on the model's device;
    ``targets[t]`` is the token position ``t`` predicts (already shifted, -100 where none);
    ``cu_seqlens`` (int32, ``(n + 1,)``) and ``max_seqlen`` describe the documents of the row.
    The model must use padding-free attention (:func:`mt_core.model.attention.use_padding_free_attention`).

    An empty minibatch (``T == 0``) runs one dummy token whose target is ignored, so forward and
    backward still reach every parameter (FSDP's collectives must match on all ranks): its loss
    is exactly 0, attached to the graph, and adds exactly 0 to every gradient.
    """
    if global_num_loss_tokens < 1:
        raise ValueError(f"global_num_loss_tokens must be >= 1, got {global_num_loss_tokens}")
    if input_ids.shape[1] == 0:
        device = input_ids.device
        input_ids = torch.zeros((1, 1), dtype=torch.long, device=device)
        position_ids = torch.zeros((1, 1), dtype=torch.long, device=device)
        targets = torch.full((1, 1), IGNORE_INDEX, dtype=torch.long, device=device)
        cu_seqlens = torch.tensor([0, 1], dtype=torch.int32, device=device)
        max_seqlen = 1
    output = model(
        input_ids=input_ids,
        position_ids=position_ids,
        cu_seq_lens_q=cu_seqlens,
        cu_seq_lens_k=cu_seqlens,  # the same object: torch's varlen may then pick cuDNN
        max_length_q=max_seqlen,
        max_length_k=max_seqlen,
        labels=targets,  # the model only computes a loss when labels are given...
        shift_labels=targets,  # ...and then uses these as they are, unshifted
        num_items_in_batch=global_num_loss_tokens,
        use_cache=False,
        # said, not left to the config: Liger's forward reads the deprecated
        # config.use_return_dict when return_dict is None, and transformers warns
        return_dict=True,
    )
    if output.loss is None:
        raise ValueError(f"{type(model).__name__} computed no loss; it is not a causal LM head")
    return output.loss
