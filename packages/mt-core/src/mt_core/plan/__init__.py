"""The planning room: how a run fits its machine, decided before any weight loads.

- ``memory``: the memory and FLOP model of one GPU (arithmetic only, no torch);
- ``flops``: FLOPs per token, datasheet peaks, MFU;
- ``shape``: a model's exact shape from its config.json (built on the meta device);
- ``fit``: the activation budget, kept-gathered blocks and offloads that make a run fit;
- ``resolve``: the one function that fills every unset speed and memory setting, used by the
  trainer and by ``mt check`` alike.

May import: mt_core.config, mt_core.model (attention backends, parameter counts),
mt_core.optim.quant_blocks, mt_fsdp. Not mt_core.trainer. ``memory`` and ``flops`` import no
torch at module level, so ``mt check`` reports a run file's mistakes before loading it.
"""
