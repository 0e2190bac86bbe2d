"""Compiled decoder blocks: the sizes that change between minibatches (the tokens of a row, the
number of its documents, the longest document) are dynamic from the first call, so no later
minibatch recompiles. The blocks run as in training: sharded by FSDP2 (one gloo rank), whose
hooks hand them views of their inputs, with gradients on. Counted with dynamo's own frame
counter, the graphs left eager: the compiler's guards are what is tested, not its kernels."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch._dynamo.testing import CompileCounter
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AttentionInterface, LlamaConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from mt_core.model.block_calls import call_around
from mt_core.model.compiled_blocks import TUNED, compile_blocks


def _reads_segments(module, query, key, value, attention_mask, **kwargs):
    """Causal attention that also reads cu_seq_lens_q, as the varlen kernels do (so that the
    compiled graph depends on its length)."""
    out, weights = sdpa_attention_forward(module, query, key, value, None, is_causal=True)
    return out + 0 * kwargs["cu_seq_lens_q"].sum(), weights


AttentionInterface.register("test_reads_segments", _reads_segments)

# (tokens, documents): the length (and with it the longest document) changes every minibatch,
# the document count only at the fourth
ROWS = ((12, 3), (17, 3), (23, 3), (23, 5), (9, 2))


@pytest.fixture
def one_rank_group():
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if started:
        dist.destroy_process_group()


def _frames_compiled(marked: bool) -> int:
    torch._dynamo.reset()
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=2)  # fmt: skip
    config._attn_implementation = "test_reads_segments"
    torch.manual_seed(0)
    blocks = [LlamaDecoderLayer(config, index) for index in range(2)]
    rope = LlamaRotaryEmbedding(config)
    counter = CompileCounter()
    if marked:
        compile_blocks(blocks, backend=counter)
    else:  # the negative control: torch.compile's automatic dynamic shapes alone
        for block in blocks:
            block.compile(backend=counter)
    mesh = init_device_mesh("cpu", (1,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    for tokens, documents in ROWS:
        hidden = torch.randn(1, tokens, 32, requires_grad=True)
        positions = torch.arange(tokens)[None]
        starts = torch.linspace(0, tokens, documents + 1).to(torch.int32)
        longest = int((starts[1:] - starts[:-1]).max())
        kwargs = dict(position_ids=positions, position_embeddings=rope(hidden, positions),
                      cu_seq_lens_q=starts, cu_seq_lens_k=starts, max_length_q=longest,
                      max_length_k=longest)  # fmt: skip
        for block in blocks:
            hidden = block(hidden, **kwargs)
        hidden.sum().backward()
    return counter.frame_count


def test_no_minibatch_after_the_first_recompiles_a_block(one_rank_group):
    # two blocks of one class share one graph; every later row passes its guards
    assert _frames_compiled(marked=True) == 1
    # left to automatic dynamic shapes: the first new length recompiles, and so does the first
    # new document count, however late it comes (step 4 of an 8B run on an H200)
    assert _frames_compiled(marked=False) == 3


def test_tuned_blocks_hand_the_compiler_the_tuning_options():
    """What the compiler is given, by the backend's own keywords (the graphs left eager): the
    tuning options only where asked for (FP8 runs, mt_core.model.build) and the run is not
    deterministic."""
    given = []

    def backend(graph, example_inputs, **keywords):
        given.append(keywords.get("options"))
        return graph.forward

    for tune, deterministic in ((False, False), (True, False), (True, True)):
        torch._dynamo.reset()
        block = torch.nn.Linear(4, 4)
        with torch._inductor.config.patch(deterministic=deterministic):
            compile_blocks([block], backend=backend, tune_kernels=tune)
            block(torch.randn(1, 3, 4))
    # deterministic runs are not tuned: a timing's winner may sum in another order
    assert given == [None, {"coordinate_descent_tuning": True}, None] and given[1] == TUNED


def test_code_around_a_block_runs_outside_in_the_order_installed():
    block = torch.nn.Linear(2, 2)
    seen = []

    def around(name):
        def run(call, *args, **kwargs):
            seen.append(f"{name} in")
            out = call(*args, **kwargs)
            seen.append(f"{name} out")
            return out

        return run

    call_around(block, "first", around("first"))
    call_around(block, "second", around("second"))
    call_around(block, "first", around("first again"))  # replaces "first", in its place
    x = torch.ones(1, 2)
    assert torch.equal(block(x), torch.nn.functional.linear(x, block.weight, block.bias))
    assert seen == ["first again in", "second in", "second out", "first again out"]
    assert type(block).__name__ == "Linear" and isinstance(block, torch.nn.Linear)
    assert list(block.state_dict()) == ["weight", "bias"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    yield
    torch._dynamo.reset()
