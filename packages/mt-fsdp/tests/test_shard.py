"""Blocks kept gathered from forward to backward (reshard_after_forward=False) give the same
gradients and leave every weight in its shard once the backward pass is done."""

from __future__ import annotations

import pytest
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


@pytest.mark.parametrize(
    "master, compute, deferred, reduced_in",
    [
        (torch.float32, torch.bfloat16, True, torch.float32),  # one GPU's float32 default
        (torch.bfloat16, None, False, torch.bfloat16),  # bfloat16 weights' default
        (torch.bfloat16, None, True, torch.float32),  # ... with sync_gradients_every_minibatch off
    ],
)
def test_one_rank_reduces_in_the_weights_dtype_unless_minibatches_add_up_unreduced(
    dist_ctx, tiny_config, master, compute, deferred, reduced_in
):
    """On one rank FSDP2's reduction only copies, so it runs in the weights' own dtype (not
    float32 for bfloat16 weights), except where minibatches add up unreduced until the step's
    last (a deferred sync), which FSDP2 sums in float32. The gradients of three minibatches must
    be, bit for bit, those of the unsharded model computing in bfloat16: each minibatch's cast
    to the weights' dtype and summed there, or summed in float32 and cast once (deferred)."""
    torch.manual_seed(0)
    config = tiny_config()
    reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = reference.state_dict()
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=master)
    shard_model(model, dist_ctx.mesh, param_dtype=compute, deferred_sync=deferred)
    materialize(model, dist_ctx.device, lambda m: None)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.to_local().copy_(state[name])
    policies = {m._get_fsdp_state()._mp_policy for m in model.modules() if hasattr(m, "reshard")}
    assert {p.reduce_dtype for p in policies} == {reduced_in}

    buffers = {name: buffer.clone() for name, buffer in reference.named_buffers()}
    reference.to(torch.bfloat16)  # FSDP2 casts the parameters alone: the buffers stay float32
    for name, buffer in buffers.items():
        reference.get_buffer(name).data = buffer
    minibatches = [torch.randint(0, config.vocab_size, (1, 24)) for _ in range(3)]
    summed_in = reduced_in if deferred else master
    expected = {name: torch.zeros_like(param, dtype=summed_in) for name, param in state.items()}
    for index, tokens in enumerate(minibatches):
        model.set_requires_gradient_sync(not deferred or index == len(minibatches) - 1)
        model(tokens, labels=tokens).loss.backward()
        reference.zero_grad()
        reference(tokens, labels=tokens).loss.backward()
        for name, total in expected.items():
            total += reference.get_parameter(name).grad.to(summed_in)
    for name, param in model.named_parameters():
        assert param.grad.dtype == master, name
        expect = expected[name].to(master)
        torch.testing.assert_close(param.grad.to_local(), expect, rtol=0, atol=0, msg=name)
