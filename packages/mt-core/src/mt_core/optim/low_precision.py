"""AdamW with low-precision moments, or with stochastically rounded bfloat16 weights, built on
torchao's optimizers (the torchao extra). Imported only when a run chooses one of them.

torchao's update runs each parameter through one ``torch.compile``-d function that computes in
float32 (whatever the weights' and moments' dtypes); mt hands it each rank's local shard of
FSDP2's DTensors (:class:`_Step`); its 8-bit moments are a tensor subclass that DCP saves and, with the blocks of
:func:`mt_core.optim.quant_blocks.quant_block`, reshards to any rank count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch._dynamo.config as dynamo_config
import torch._functorch.config as functorch_config
import torch.fx.experimental._config as shapes_config
import torchao.optim as ao
from torch import Tensor
from torch._dynamo.utils import disable_cache_limit
from torch.distributed.tensor import DTensor
from torchao.optim.adam import single_param_adam
from torchao.optim.subclass_8bit import OptimState8bit

from mt_core.optim.quant_blocks import QUANT_BLOCK, quant_block

__all__ = ["AdamW", "AdamW8bit"]

# torchao's per-parameter update, compiled when first called. With dynamic shapes (torchao
# compiles it static) one graph serves every parameter of a rank and moment kind (1-D and 2-D
# tensors: two graphs where seven shapes took seven, measured) and every rank count's shards, so the
# on-disk graph cache that one process fills serves the next whatever its shards: the update is
# elementwise (8-bit moments add a maximum per block, exact in any order), so the values are
# the same as the static graphs' bit for bit. The step turns off "duck shaping", which gives equal
# sizes one symbol and so makes a graph for every coincidence of sizes (a square matrix, 256 rows
# like the 8-bit map: four graphs for the tiny example where two serve). A fixed number of
# graphs: the step lifts dynamo's cache limit.
_UPDATE = torch.compile(single_param_adam, fullgraph=True, dynamic=True)


class _Step:
    """What mt changes in torchao's step, for every choice.

    The step is mt's own loop around torchao's compiled per-parameter update
    (``single_param_adam``), for two reasons. It hands the update each rank's local shard, not
    FSDP2's DTensor: the arithmetic is elementwise, so nothing changes but what the compiler
    sees, and a DTensor brings its device mesh into the graph's inputs, whose cache key then
    differs in every process: each process compiled every parameter shape afresh (about 2.5 s of
    CPU a graph), where local tensors are found in PyTorch's on-disk FX graph cache. And lr stays
    the float that torch's optimizers keep (mt's schedule, metrics and JSON checkpoints expect
    it); torchao keeps it as a tensor so that its step does not recompile when the schedule
    moves it, which the tensor made here for each step does as well.

    The update's float arguments (betas, eps, weight decay: fixed for a run) are compiled in
    as constants. Left dynamic, dynamo makes them tensor inputs, then finds that ``lerp`` needs
    its weight as a number and traces the whole function again: about 2 s more at the start of
    every process (2-core CPU), for the same values bit for bit (the tiny example, 12 steps with
    8-bit moments, float32 or bfloat16 weights: the same losses and gradient norms).

    The compiled step is not looked up in PyTorch's on-disk AOTAutograd cache: its key does not
    tell torchao's 8-bit state subclass from a plain tensor of the same shape, so a process could
    load another's step for the other kind of moments (seen: an AttributeError on resume, and a
    segmentation fault).
    """

    param_groups: list[dict[str, Any]]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        torch.optim.Optimizer.add_param_group(self, param_group)  # without torchao's conversion

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader casts every state tensor but ``step`` to its parameter's dtype: the
        moments would come back in the weights' dtype (bfloat16 moments of float32 weights as
        float32 ones, all at once) and the resumed run would no longer round them as saved.
        Here the moments keep the dtype they were saved in, the one the run chose."""
        name = "_process_value_according_to_param_policy"
        policy = vars(torch.optim.Optimizer)[name]

        def keep_moments(param: Tensor, value: Any, param_id: int, groups: Any, key=None) -> Any:
            if key in ("exp_avg", "exp_avg_sq"):
                return value.to(device=param.device)
            return policy.__func__(param, value, param_id, groups, key)

        setattr(torch.optim.Optimizer, name, staticmethod(keep_moments))
        try:
            super().load_state_dict(state_dict)  # type: ignore[misc]
        finally:
            setattr(torch.optim.Optimizer, name, policy)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with (
            disable_cache_limit(),
            dynamo_config.patch(specialize_float=True),
            functorch_config.patch(enable_autograd_cache=False),
            shapes_config.patch(use_duck_shape=False),
        ):
            for group in self.param_groups:
                lr = torch.tensor(group["lr"], dtype=torch.float32)
                beta1, beta2 = group["betas"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if not state:
                        state["step"] = torch.tensor(0.0)
                        state["exp_avg"] = self._new_buffer(p, True)  # type: ignore[attr-defined]
                        state["exp_avg_sq"] = self._new_buffer(p, False)  # type: ignore[attr-defined]
                        if group["amsgrad"]:
                            state["max_exp_avg_sq"] = self._new_buffer(p, False)  # type: ignore[attr-defined]
                    state["step"] += 1
                    maximum = state.get("max_exp_avg_sq")
                    _UPDATE(
                        _local(p.detach()), _local(p.grad), state["step"],
                        _local(state["exp_avg"]), _local(state["exp_avg_sq"]),
                        None if maximum is None else _local(maximum), lr, beta1, beta2,
                        group["weight_decay"], group["eps"], self.is_adamw,  # type: ignore[attr-defined]
                        self.bf16_stochastic_round and p.dtype is torch.bfloat16,  # type: ignore[attr-defined]
                    )  # fmt: skip
        return loss


def _local(tensor: Tensor) -> Tensor:
    """A rank's shard of an FSDP2 DTensor (its storage: updates in place reach the DTensor)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class AdamW(_Step, ao._AdamW):
    """torchao's AdamW (float32 arithmetic; with ``bf16_stochastic_round``, bfloat16 weights are
    rounded stochastically) with both moments stored in ``state_dtype``: torchao would keep
    them in the weights' dtype, so float32 master weights would get float32 moments."""

    def __init__(self, params: Iterable[Tensor], *, state_dtype: torch.dtype, **kwargs: Any):
        self.state_dtype = state_dtype
        super().__init__(params, **kwargs)

    def _new_buffer(self, p: Tensor, signed: bool) -> Tensor:
        return super()._new_buffer(p, signed).to(self.state_dtype)


class AdamW8bit(_Step, ao.AdamW8bit):
    """torchao's 8-bit AdamW: each moment stored as one byte a value (a code of a dynamic
    quantization map) and one float32 scale per block of values, the blocks chosen from the
    parameter's whole shape (:func:`~mt_core.optim.quant_blocks.quant_block`: :data:`QUANT_BLOCK` values,
    fewer where a row is not a multiple of it) so that they are the same on any rank count;
    1-D and small tensors keep the weights' dtype."""

    def __init__(self, params: Iterable[Tensor], **kwargs: Any):
        super().__init__(params, block_size=QUANT_BLOCK, **kwargs)

    def _new_buffer(self, p: Tensor, signed: bool) -> Tensor:
        # torchao decides from the rank's shard (>= 4096 values, a multiple of its one block):
        # on another rank count the same parameter could get plain moments, or blocks that
        # straddle the new shards, and its checkpoint would not load there
        local = p.to_local() if isinstance(p, DTensor) else p
        block = quant_block(tuple(p.shape))
        if block is None or local.numel() == 0:
            out = torch.zeros_like(local)
        else:
            # a float32 appearance whatever the weights' dtype: the view that wraps a shard in
            # a DTensor drops it (to float32), and with bfloat16 weights the two then disagree
            # and torch.compile refuses the step
            out = OptimState8bit.zeros(local.shape, signed, block, local.device,
                                       dtype=torch.float32)  # fmt: skip
        if isinstance(p, DTensor):  # shards may differ in size: the whole shape is given
            out = DTensor.from_local(out, p.device_mesh, p.placements, run_check=False,
                                     shape=p.shape, stride=p.stride())  # fmt: skip
        return out.to(p.device)  # from_local moves it to the mesh's device (cpu_offload: back)
