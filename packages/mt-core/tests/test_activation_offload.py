"""Activation offloading on a CPU: the same bookkeeping as on a GPU with plain synchronous copies
(no pinned memory, no side stream). Every saved tensor that is offloaded comes back as a fresh
tensor with the same bytes, strides and dtype, so the backward pass does the same arithmetic on
the same numbers: the loss and every gradient are equal bit for bit, in eager and compiled
blocks, with and without activation checkpointing."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from mt_core.model.activation_offload import ActivationOffload
from mt_core.model.build import checkpoint_blocks

CPU = torch.device("cpu")
HIDDEN, LAYERS = 64, 4
LLAMA = dict(
    hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=128,
)  # fmt: skip
LENGTHS = (40, 41)  # two steps; the second length makes a compiled block dynamic in it


def _llama(*, checkpointing: bool, compiled: bool) -> nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA), dtype=torch.float32).train()
    model.config.use_cache = False  # as mt_core.model.build.build_model
    if checkpointing:
        checkpoint_blocks(model)
    if compiled:
        for block in model.model.layers:
            block.compile()
    return model


def _steps(model: nn.Module, offload: ActivationOffload | None = None, spoil: bool = False):
    """Loss and gradients of one forward and backward pass per length; with ``spoil`` every host
    copy is zeroed between the forward and the backward pass."""
    results = []
    for length in LENGTHS:
        ids = torch.randint(0, LLAMA["vocab_size"], (1, length),
                            generator=torch.Generator().manual_seed(length))  # fmt: skip
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        if spoil:
            for copies in offload._sent.values():
                for copy in copies:
                    copy.host.zero_()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    return results


def _equal(a, b) -> bool:
    return all(
        torch.equal(loss_a, loss_b) and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
        for (loss_a, grads_a), (loss_b, grads_b) in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["kept", "checkpointing"])
def test_offloading_changes_no_bit_of_the_loss_or_gradients(compiled, checkpointing):
    if compiled:
        torch._dynamo.reset()
    expected = _steps(_llama(checkpointing=checkpointing, compiled=compiled))
    model = _llama(checkpointing=checkpointing, compiled=compiled)
    offload = ActivationOffload(CPU, min_bytes=0)  # every saved tensor of these tiny blocks
    offload.install(list(model.model.layers))
    assert _equal(_steps(model, offload), expected)

    # What moved, in the last pass (41 tokens): every block but the last, the same bytes each
    tokens = LENGTHS[-1]
    sent = offload.block_bytes
    assert sent[-1] == 0 and len(set(sent[:-1])) == 1
    block_input = tokens * HIDDEN * 4  # float32
    if checkpointing:  # all that a checkpointed block keeps is its input
        assert sent[0] == block_input
    else:  # the input and much more: every activation the block (or its compiled graph) keeps
        assert sent[0] > 10 * block_input
    # the block before the last was still held when the backward pass began: used where it was
    assert offload.fetched_bytes == sum(sent[: LAYERS - 2])
    assert offload.pass_bytes == sum(sent) == offload.largest_pass_bytes  # 41 > 40 tokens

    # the backward pass really reads the host copies: zeroed, they change the gradients
    model = _llama(checkpointing=checkpointing, compiled=compiled)
    spoiled = ActivationOffload(CPU, min_bytes=0)
    spoiled.install(list(model.model.layers))
    assert not _equal(_steps(model, spoiled, spoil=True), expected)


def test_a_threshold_above_every_saved_tensor_moves_nothing():
    expected = _steps(_llama(checkpointing=False, compiled=False))
    model = _llama(checkpointing=False, compiled=False)
    offload = ActivationOffload(CPU)  # 1 MiB: far above these blocks' tensors
    offload.install(list(model.model.layers))
    assert _equal(_steps(model, offload), expected)
    assert offload.block_bytes == [0] * LAYERS and offload.largest_pass_bytes == 0
    assert offload.fetched_bytes == 0


class _Block(nn.Module):
    """tanh(x W^T) * scale: the matmul saves x and a view of W, tanh its output, the product
    scale and that output again."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, width) / width**0.5)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.weight.t()) * scale


def test_what_a_block_sends_and_what_stays():
    width, rows = 64, 32
    torch.manual_seed(0)
    blocks = [_Block(width) for _ in range(3)]
    x = torch.randn(rows, width, requires_grad=True)
    scale = torch.randn(rows, width)  # given to every block alike, as HF's rotary cos and sin

    def run() -> list[torch.Tensor]:
        hidden = x
        for block in blocks:
            hidden = block(hidden, scale)
        hidden.square().sum().backward()
        grads = [x.grad.clone(), *(block.weight.grad.clone() for block in blocks)]
        x.grad = None
        for block in blocks:
            block.weight.grad = None
        return grads

    expected = run()
    offload = ActivationOffload(CPU, min_bytes=0)
    offload.install(blocks)
    assert all(torch.equal(a, b) for a, b in zip(run(), expected, strict=True))
    # Sent: the block's input and tanh's output, once although two ops save it; kept: the
    # weight's view (the parameter's memory) and the shared scale. The last block sends nothing.
    activation = rows * width * 4
    assert offload.block_bytes == [2 * activation, 2 * activation, 0]
    # block 0 was let go when block 2 started and came back from the host; block 1 was still
    # held when the backward pass began and was used where it was
    assert offload.fetched_bytes == 2 * activation
    # a second pass counts afresh, also where the list holds a block that never runs (such as a
    # vision tower's in a text-only run): a pass starts with a block at or before the last one run
    unused = _Block(width)
    offload.install([unused, *blocks])
    for _ in range(2):
        assert all(torch.equal(a, b) for a, b in zip(run(), expected, strict=True))
        assert offload.block_bytes == [0, 2 * activation, 2 * activation, 0]
        assert offload.fetched_bytes == 2 * activation
    # at or above a tensor's size it moves; a byte more and nothing does
    for threshold, sent in ((activation, 2 * activation), (activation + 1, 0)):
        small = ActivationOffload(CPU, min_bytes=threshold)
        small.install(blocks)
        run()
        assert small.block_bytes == [sent, sent, 0]


def test_no_grad_passes_are_left_alone():
    blocks = [_Block(16) for _ in range(3)]
    offload = ActivationOffload(CPU, min_bytes=0)
    offload.install(blocks)
    with torch.no_grad():
        hidden = torch.randn(4, 16)
        for block in blocks:
            hidden = block(hidden, torch.ones(4, 16))
    assert offload.block_bytes == [0, 0, 0]
    # the blocks keep their class names (found by name, as HF's _no_split_modules lists them),
    # and one class serves every block (one compiled graph for all)
    assert type(blocks[0]).__name__ == "_Block" and len({type(b) for b in blocks}) == 1


def test_checkpointing_is_enabled_without_a_deprecation_warning():
    """transformers 5.2x renamed gradient_checkpointing_enable, which now warns on every run
    with activation_checkpointing; mt calls the new name where it exists."""
    import warnings

    model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA), dtype=torch.float32).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checkpoint_blocks(model)
    assert model.is_gradient_checkpointing
    assert all(block.gradient_checkpointing for block in model.model.layers)
