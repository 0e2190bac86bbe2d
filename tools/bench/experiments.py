"""Levers tried with the throughput benchmark that mt does not have (or has as a default the
experiment overrides): extra keys of an ``--extra`` contestant, taken out of its mt keys and
applied to the contestant's process before it trains. Kept so that the tables of RESULTS.md can
be run again.

* ``compile_kwargs``: other ``torch.compile`` arguments for mt's compiled blocks, e.g.
  ``{"dynamic": true}`` or ``{"options": {"guard_filter_fn": NAME}}`` (NAME a ``torch.compiler``
  function);
* ``functorch_config``: settings of the compiler's forward/backward partitioner, e.g.
  ``{"activation_memory_budget": 0.6}``;
* ``reshard_after_forward``: every decoder block resharded after its forward (true), or none;
* ``keep_gradients``: gradients zeroed between steps, never freed.
"""

from __future__ import annotations

import torch


def apply_experiments(keys: dict) -> dict:
    """``keys`` less the experiment keys, whose changes are now in effect in this process."""
    compile_kwargs = keys.pop("compile_kwargs", None)
    if compile_kwargs:
        _compile_blocks_with(compile_kwargs)
    for name, value in keys.pop("functorch_config", {}).items():
        setattr(torch._functorch.config, name, value)
    reshard = keys.pop("reshard_after_forward", None)
    if reshard is not None:
        import mt_fsdp.shard

        shard = mt_fsdp.shard.fully_shard
        mt_fsdp.shard.fully_shard = lambda module, **options: shard(
            module, **{**options, "reshard_after_forward": reshard})  # fmt: skip
    if keys.pop("keep_gradients", False):
        zero_grad = torch.optim.Optimizer.zero_grad
        torch.optim.Optimizer.zero_grad = lambda self, set_to_none=True: zero_grad(self, False)
    return keys


def _compile_blocks_with(kwargs: dict) -> None:
    """Make ``nn.Module.compile`` (what mt calls on each block) take ``kwargs`` instead of its
    own."""
    options = dict(kwargs.get("options", {}))
    if "guard_filter_fn" in options:
        options["guard_filter_fn"] = getattr(torch.compiler, options["guard_filter_fn"])
    original = torch.nn.Module.compile

    def compile_with(module, *args, **own) -> None:
        own.update({key: value for key, value in kwargs.items() if key != "options"})
        original(module, *args, **own, **({"options": options} if options else {}))

    torch.nn.Module.compile = compile_with
