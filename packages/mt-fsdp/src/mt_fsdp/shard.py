"""FSDP2 wrapping: one shard group per decoder block, one at the root.

Sharding per block lets FSDP gather one block's weights just before it runs and free them after,
so peak memory holds one unsharded block at a time. Everything outside the blocks (embeddings,
final norm, LM head) belongs to the root group; tied input/output embeddings are one parameter
there and so stay tied.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

__all__ = ["decoder_blocks", "reshard_all", "shard_model"]


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks, found by the class names HF lists in ``_no_split_modules``
    (the units that must never be split across devices), else by the largest ModuleList."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}")
    return list(max(lists, key=len))


def shard_model(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype | None,
    reduce_dtype: torch.dtype | None = torch.float32,
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
    deferred_sync: bool = False,
) -> nn.Module:
    """Apply ``fully_shard`` to every decoder block, then to the root; gradients are summed.

    The parameters stay in their own dtype (the fp32 master weights); ``param_dtype`` is the
    compute dtype FSDP casts them to when it gathers them (None: no cast), and gradients are
    reduced in ``reduce_dtype`` over several ranks, and on one where minibatches add up
    unreduced until the step's last (``deferred_sync``: FSDP2 sums them in that dtype); else one
    rank reduces in the parameters' own dtype. The model may live on the meta device: sharding
    first and materialising after means no rank ever holds the whole model.
    ``reshard_after_forward=False`` keeps every block gathered from its forward to its backward
    pass: one gather (and cast) per block and minibatch instead of two, for the memory of all
    blocks' compute copies.
    """
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    if mesh.size() == 1 and len(trained) == 1 and not deferred_sync:
        # One rank sums nothing: its "reduction" copies each minibatch's gradients into
        # reduce_dtype and on into the parameters' dtype, exactly. Done in the parameters' own
        # dtype it gives the same gradients and costs least with bfloat16 weights: 8 bytes a
        # parameter against float32's 20 (cast up, FSDP2's copy, cast back). The 8B shape with 8
        # blocks on one H100: 5% faster, 6.9 GiB less reserved (tools/bench/RESULTS.md). Named,
        # not None: torch < 2.15 reads None as the compute dtype.
        (reduce_dtype,) = trained
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    options: dict = {"mesh": mesh, "mp_policy": policy}
    if cpu_offload:
        # pinned host memory lets the copies to and from the GPU overlap compute; a CPU-only
        # run (where the policy changes nothing but is tested) has no driver to pin with
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda")
    blocks = decoder_blocks(model)
    for index, block in enumerate(blocks):
        # The last block's weights are needed again at once by the backward pass: keep them.
        keep = not reshard_after_forward or index == len(blocks) - 1
        fully_shard(block, reshard_after_forward=not keep, **options)
    fully_shard(model, **options)
    # mt normalises each rank's loss by the token count of the whole global batch, so the
    # gradients of the ranks must be summed, not averaged as FSDP does by default.
    # A plain SUM (no pre-multiplied sum, which gloo lacks; NCCL moves it zero-copy).
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)
        elif hasattr(module, "set_reduce_scatter_divide_factor"):  # torch < 2.8
            module.set_reduce_scatter_divide_factor(1.0)
        if hasattr(module, "set_force_sum_reduction_for_comms"):
            module.set_force_sum_reduction_for_comms(True)
    return model


def reshard_all(model: nn.Module) -> None:
    """Put every gathered block back in its shards. A forward without backward (evaluation, a
    probe) leaves the blocks that are not resharded after forward gathered; the backward pass
    would have resharded them."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
