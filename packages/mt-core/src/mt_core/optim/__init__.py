"""The optimizer room: AdamW and its schedule.

- ``build``: the optimizer (torch's fused AdamW, or torchao's with low-precision moments or
  stochastic rounding), the LR schedule (transformers' factory) and gradient clipping;
- ``low_precision``: the torchao-based AdamW variants (imported only when a run asks for them);
- ``quant_blocks``: which values of a parameter share one scale in 8-bit moments (no torch).

May import: mt_core.config, torch, torchao. Nothing else of mt_core.
"""
