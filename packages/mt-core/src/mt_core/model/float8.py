"""FP8 compute of the decoder blocks' large linear layers (the key ``float8``, torchao.float8).

Which layers convert is one rule, :func:`bfloat16_reason`: a layer computes in FP8 only where
FP8 pays and nothing needs it exact. The conversion swaps ``nn.Linear`` for torchao's
``Float8Linear`` on the bare model, before compilation (which traces its casts) and before
FSDP2 (which must see the float8 weight wrapper to gather tensorwise weights in FP8). The
parameters keep their names, dtype and values: checkpoints and exports are those of a bfloat16
run, and a run resumes with or without the key.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from mt_core.config import ConfigError
from mt_fsdp import decoder_blocks

__all__ = [
    "FP8_CAPABILITY",
    "MIN_DIMENSION",
    "RECIPES",
    "bfloat16_reason",
    "convert_to_float8",
    "float8_layers",
    "float8_problem",
    "gathers_in_float8",
    "refresh_weight_scales",
]

# torchao's Float8LinearRecipeName values mt offers (its third, rowwise_with_gw_hp, computes
# the weight gradient's product, a third of a layer's, in bfloat16: left out until measured)
RECIPES = ("tensorwise", "rowwise")

# FP8 pays only where the matrix product outweighs the scaling and casting around it, by recipe
# the smallest side a converted layer may have. Measured on one H200 (tools/bench/RESULTS.md,
# issue #29; 8,192 tokens, forward + backward of a block's MLP and q projection, compiled):
# tensorwise 1.45x bfloat16 at the 8B shape (4096 x 14336) and 1.29x at the 1B shape (2048 x
# 8192), whole 1B runs 1.05x; rowwise 1.04x at 8B and 0.80x at 1B, whole 8B runs 0.92x. So
# tensorwise converts from 2048 up (the key/value projections of grouped-query attention, 512
# or 1024 wide, stay: torchao's own filters and torchtitan leave such small layers alike), and
# rowwise only from 8192 up (70B-class layers), where its gain is yet to be measured.
MIN_DIMENSION = {"tensorwise": 2048, "rowwise": 8192}
# the first CUDA compute capability with FP8 tensor cores (Ada; Hopper is 9.0, Blackwell 10.0)
FP8_CAPABILITY = (8, 9)
# FP8 GEMMs (torch._scaled_mm) need both dimensions of the weight to be multiples of 16, and so
# the tokens of a row: the inner dimension of the weight gradient's product (the 1B shape's
# 16,087-token rows failed there on an H200)
FP8_ALIGNMENT = 16
# config keys that count a MoE's experts (transformers' names); a linear with that many outputs
# is a router, whose logits choose the experts and stay exact
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts")


def token_multiple(float8: str | None) -> int:
    """What each training row's token count must be a multiple of under the key ``float8`` (its
    value): rows are filled to it by a segment without targets (mt_data.collate.sequence_shard).
    Forward passes alone (validation) need no filling: there the tokens are the products' outer
    dimension, which may be anything."""
    return FP8_ALIGNMENT if float8 else 1


def float8_problem(gpu: bool, capability: tuple[int, int] | None) -> str | None:
    """Why the key ``float8`` cannot run on this machine (a CUDA GPU or not, its compute
    capability), in the words of a ConfigError after the key; None where it can."""
    needs = "FP8 compute needs a GPU with FP8 tensor cores (compute capability 8.9 or more: Ada, "
    needs += "Hopper, Blackwell)"
    if not gpu:
        return f"{needs}, and this run is on the CPU: unset float8 (bfloat16 compute)"
    if capability is None or tuple(capability) < FP8_CAPABILITY:
        found = "unknown" if capability is None else "{}.{}".format(*capability)
        return f"{needs}; this GPU's is {found}: unset float8 (bfloat16 compute)"
    return None


def bfloat16_reason(
    module: nn.Linear, recipe: str = "tensorwise", *, experts: frozenset[int] = frozenset()
) -> str | None:
    """Why this linear layer of a decoder block stays in bfloat16 under ``recipe``, or None where
    it converts. ``experts``: the model's expert counts (a router has that many outputs)."""
    rows, columns = module.out_features, module.in_features
    if not module.weight.requires_grad:
        return "frozen (not trained: no input in training, or routing kept as released)"
    if rows in experts:
        return f"a router ({rows} expert logits)"
    if rows % FP8_ALIGNMENT or columns % FP8_ALIGNMENT:
        return f"{columns} -> {rows}: FP8 matrix products need multiples of {FP8_ALIGNMENT}"
    bound = MIN_DIMENSION[recipe]
    if min(rows, columns) < bound:
        return f"{columns} -> {rows}: too small for FP8 {recipe} to pay (a side under {bound})"
    return None


def float8_layers(model: nn.Module, recipe: str = "tensorwise") -> dict[str, str | None]:
    """Every linear layer of ``model`` by name: None where ``recipe`` converts it, else why it
    stays in bfloat16. Only the decoder blocks' layers may convert: the LM head (the largest
    product, but the loss's logits, which torchtitan keeps in bfloat16 too) and anything
    outside the blocks (embeddings are no linear layers) stay."""
    config = getattr(model, "config", None)
    experts = frozenset(
        count
        for text in ([config, config.get_text_config()] if config is not None else [])
        for key in _EXPERT_COUNTS
        if isinstance(count := getattr(text, key, None), int)
    )
    inside = {id(m) for block in decoder_blocks(model) for m in block.modules()}
    return {
        name: bfloat16_reason(module, recipe, experts=experts) if id(module) in inside
        else "outside the decoder blocks"
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }  # fmt: skip


def gathers_in_float8(recipe: str, shard_ranks: int, offloaded: bool = False) -> bool:
    """Whether FSDP2 gathers the converted weights in FP8: tensorwise ones where they are
    sharded over several ranks (half the bytes of bfloat16 on the wire; rowwise scaling has no
    such gather). On one rank there is nothing to send, and the cast it brings runs outside the
    compiled blocks, once per weight and gather: a 1B run on one H200 ran at 0.89x bfloat16 with
    it and 1.05x without (tools/bench/RESULTS.md, issue #29).

    Not where the shards live in host memory (``offloaded``: cpu_offload): their scales would
    be reduced across ranks on the host, which NCCL cannot do, and FSDP2's copy of each shard
    to the GPU before its gather drops a scale set in advance (torchao's weight wrapper keeps
    none through a copy). Such weights are gathered in bfloat16 and cast inside each product,
    as on one rank."""
    return recipe == "tensorwise" and shard_ranks > 1 and not offloaded


def convert_to_float8(
    model: nn.Module, recipe: str, shard_ranks: int, offloaded: bool = False
) -> int:
    """Swap the layers :func:`float8_layers` converts for torchao's ``Float8Linear`` with this
    recipe (one of :data:`RECIPES`), their weights gathered as :func:`gathers_in_float8` says
    for FSDP2 over ``shard_ranks``, the shards in host memory or not (``offloaded``); returns
    how many."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as error:
        raise ConfigError(
            [f"float8: needs torchao ({error}): pip install 'mt-core[torchao]'"]
        ) from None
    converts = {name for name, reason in float8_layers(model, recipe).items() if reason is None}
    config = Float8LinearConfig.from_recipe_name(recipe)
    if gathers_in_float8(recipe, shard_ranks, offloaded):
        config = dataclasses.replace(config, enable_fsdp_float8_all_gather=True)
    convert_to_float8_training(
        model, config=config, module_filter_fn=lambda module, name: name in converts
    )
    return len(converts)


def refresh_weight_scales(model: nn.Module) -> None:
    """The FP8 scales of the weights FSDP2 gathers in FP8, all in one reduction; call after
    every change of the weights (the optimizer step, OSFT's projection after it). Each gather
    then uses its weight's scale instead of reducing its own (torchao's
    ``precompute_float8_dynamic_scale_for_fsdp``, which torchtitan calls at the same place). A
    scale once set is used until the next call, so no weight may change without one. Nothing
    to do where no weight is gathered in FP8."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)
