"""Levers tried with the throughput benchmark that mt does not have (or has as a default the
experiment overrides): extra keys of an ``--extra`` contestant, taken out of its mt keys and
applied to the contestant's process before it trains. Kept so that the tables of RESULTS.md can
be run again.

* ``compile_kwargs``: other ``torch.compile`` arguments for mt's compiled blocks, e.g.
  ``{"dynamic": true}`` or ``{"options": {"guard_filter_fn": NAME}}`` (NAME a ``torch.compiler``
  function), or inductor settings: ``{"options": {"coordinate_descent_tuning": true}}``;
* ``functorch_config``: settings of the compiler's forward/backward partitioner, e.g.
  ``{"activation_memory_budget": 0.6}``;
* ``reshard_after_forward``: every decoder block resharded after its forward (true), or none;
* ``reduce_dtype``: the dtype FSDP2 reduces gradients in, on any rank count (mt: float32 over
  several ranks, the weights' own dtype on one), e.g. ``"float32"``;
* ``keep_gradients``: gradients zeroed between steps, never freed;
* ``float8_config``: fields of torchao's ``Float8LinearConfig`` changed from the recipe's, a
  dict for a nested config, e.g. ``{"gemm_config_grad_input": {"use_fast_accum": true}}``;
* ``float8_min_dimension``: the smallest side of a layer FP8 converts, for the run's recipe
  (``mt_core.model.float8.MIN_DIMENSION``), e.g. 1024 to convert the 8B shape's key/value
  projections.
"""

from __future__ import annotations

import dataclasses

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
        _shard_with(lambda options: {**options, "reshard_after_forward": reshard})
    reduce_dtype = keys.pop("reduce_dtype", None)
    if reduce_dtype is not None:
        dtype = getattr(torch, reduce_dtype)
        _shard_with(lambda options: {**options, "mp_policy": dataclasses.replace(
            options["mp_policy"], reduce_dtype=dtype)})  # fmt: skip
    if keys.pop("keep_gradients", False):
        zero_grad = torch.optim.Optimizer.zero_grad
        torch.optim.Optimizer.zero_grad = lambda self, set_to_none=True: zero_grad(self, False)
    changes = keys.pop("float8_config", None)
    if changes:
        _float8_config_with(changes)
    bound = keys.pop("float8_min_dimension", None)
    if bound is not None:
        from mt_core.model import float8

        float8.MIN_DIMENSION[keys.get("float8") or "tensorwise"] = bound
    return keys


def _shard_with(change) -> None:
    """Make mt's ``fully_shard`` calls take ``change(options)`` instead of their options."""
    import mt_fsdp.shard

    shard = mt_fsdp.shard.fully_shard
    mt_fsdp.shard.fully_shard = lambda module, **options: shard(module, **change(options))


def _float8_config_with(changes: dict) -> None:
    """Make torchao's recipes (what mt builds its FP8 layers from) carry ``changes``."""
    from torchao.float8 import Float8LinearConfig

    recipe = Float8LinearConfig.from_recipe_name

    def changed(name):
        config = recipe(name)
        fields = {
            key: dataclasses.replace(getattr(config, key), **value) if isinstance(value, dict)
            else value
            for key, value in changes.items()
        }  # fmt: skip
        return dataclasses.replace(config, **fields)

    Float8LinearConfig.from_recipe_name = staticmethod(changed)


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
