"""Blocks kept gathered from forward to backward (reshard_after_forward=False) give the same
gradients and leave every weight in its shard once the backward pass is done."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from mt_fsdp import decoder_blocks, materialize, parameters_on_meta, reshard_all, shard_model


def _sharded(config, state, ctx, reshard_after_forward: bool):
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    shard_model(model, ctx.mesh, param_dtype=None, reshard_after_forward=reshard_after_forward)
    materialize(model, ctx.device, lambda m: None)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.to_local().copy_(state[name])  # one process: the shard is the whole tensor
    return model


def _gathered(block) -> bool:
    return not any(isinstance(p, DTensor) for p in block.parameters())


def test_blocks_kept_gathered_give_the_same_gradients(dist_ctx, tiny_config):
    torch.manual_seed(0)
    state = AutoModelForCausalLM.from_config(tiny_config()).state_dict()
    tokens = torch.randint(0, tiny_config().vocab_size, (1, 16))
    grads, during = {}, {}
    for keep in (False, True):
        model = _sharded(tiny_config(), state, dist_ctx, reshard_after_forward=not keep)
        first = decoder_blocks(model)[0]
        loss = model(tokens, labels=tokens).loss
        during[keep] = _gathered(first)  # between forward and backward
        loss.backward()
        assert not _gathered(first)  # the backward pass put it back in its shards
        grads[keep] = {n: p.grad.to_local().clone() for n, p in model.named_parameters()}
        with torch.no_grad():  # a forward without backward leaves it gathered: reshard_all
            model(tokens)
        assert _gathered(first) == keep
        reshard_all(model)
        assert not _gathered(first)
    assert during == {False: False, True: True}
    for name, grad in grads[False].items():  # the same arithmetic, only the gathers differ
        torch.testing.assert_close(grads[True][name], grad, rtol=0, atol=0, msg=name)
