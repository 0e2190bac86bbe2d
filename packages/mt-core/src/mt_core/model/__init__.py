"""The model room: an HF causal LM built, patched and sharded for padding-free training.

- ``build``: the order of set-up (meta device, kernels, attention, checkpointing, compile,
  offload, FSDP2, weights) and the model's config and folder;
- ``attention``, ``attention_kernels``: padding-free attention backends behind transformers'
  attention interface; ``sequence_parallel``: one row's tokens split over a group of ranks;
- ``recurrent``: state-space and linear-attention layers run per document;
- ``compiled_blocks``: regional compilation, the sizes that change between minibatches dynamic;
  ``block_calls``: code run around a block's whole call (compiled graph and hooks inside);
- ``activation_offload``: the blocks' saved activations parked in host memory;
- ``determinism``: the kernel settings of bit-reproducible runs (the key ``deterministic``);
- ``float8``: which linear layers compute in FP8 and their conversion (the key ``float8``);
- ``families``: what differs between architectures (VLMs, MXFP4 experts, export layouts).

May import: mt_core.config, mt_core.errors, mt_fsdp, torch, transformers. Not plan, optim or
trainer: the rooms above it import this one.
"""
