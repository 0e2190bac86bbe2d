"""A quiet, informative console (issue 16): a normal run prints no warnings of ours, the step line
shows MFU and peak memory, an error under torchrun shows once, and a run-file key that an override
makes inapplicable says how to clear it from the command line.

=============================================  ===============================================
dynamo's lru_cache warning (torch_varlen)      test_torch_varlen_compiles_without_a_warning
transformers' use_return_dict warning          test_the_loss_call_reads_no_use_return_dict
the step line: MFU and peak memory             test_the_step_line_shows_mfu_and_peak_memory,
                                               test_training.test_the_bundled_example_learns
an override clashing with a file's key         test_an_override_that_makes_a_key_inapplicable
                                               _says_how_to_clear_it
no warning in a normal run                     test_training.test_the_bundled_example_learns
an error under torchrun shows once             test_an_error_is_reported_once_per_job,
                                               test_bad_input.test_batch_size_below_the_rank_
                                               count_under_torchrun
=============================================  ===============================================

(torch's "barrier(): using the device under current context" warning is GPU-only: init_distributed
binds NCCL groups to their GPU, and mt_fsdp's barriers name it; nothing of it runs on CPU.)
"""

from __future__ import annotations

import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig

from mt_core import ConfigError, load_run_file
from mt_core import errors as mt_errors
from mt_core.model.attention import register_padding_free_attention, use_padding_free_attention
from mt_core.trainer.loss import minibatch_loss
from mt_core.trainer.metrics import step_text

ROOT = Path(__file__).resolve().parent.parent
TINY_RUN = ROOT / "examples" / "tiny" / "run.toml"


def test_the_step_line_shows_mfu_and_peak_memory():
    gpu = {"step": 7, "loss": 1.25, "lr": 2e-5, "tokens_per_s": 51234.0, "mfu": 0.4123,
           "peak_mem_gib": 61.234}  # fmt: skip
    assert step_text(gpu) == (
        "loss 1.2500  lr 2.00e-05  51,234 tok/s  MFU 41.2%  peak mem 61.23 GiB"
    )
    cpu = {**gpu, "mfu": None, "peak_mem_gib": 0.5}
    assert step_text(cpu) == "loss 1.2500  lr 2.00e-05  51,234 tok/s  peak mem 0.50 GiB"
    bare = {key: value for key, value in cpu.items() if key != "peak_mem_gib"}
    assert step_text(bare) == "loss 1.2500  lr 2.00e-05  51,234 tok/s"


def test_an_override_that_makes_a_key_inapplicable_says_how_to_clear_it():
    with pytest.raises(ConfigError) as caught:
        load_run_file(TINY_RUN, {"training_mode": "step", "max_steps": 3})
    line = next(i for i, text in enumerate(TINY_RUN.read_text().splitlines(), 1)
                if text.startswith("max_epochs"))  # fmt: skip
    assert caught.value.problems == [
        f"{TINY_RUN}:{line}: max_epochs: applies only with training_mode = 'epoch' (it is "
        "'step'); to clear the file's max_epochs from the command line: --max_epochs=None"
    ]
    cleared = load_run_file(TINY_RUN, {"training_mode": "step", "max_steps": 3, "max_epochs": None})
    assert (cleared.training_mode, cleared.max_steps, cleared.max_epochs) == ("step", 3, 1)
    # an overridden key that does not apply needs no such hint: the command line set it
    with pytest.raises(ConfigError) as caught:
        load_run_file(TINY_RUN, {"max_steps": 3})
    assert caught.value.problems == [
        "command line: max_steps: applies only with training_mode = 'step' (it is 'epoch')"
    ]


def test_torch_varlen_compiles_without_a_warning(monkeypatch):
    """The attention function registered for torch_varlen, compiled as mt compiles decoder
    blocks, calls no cached helper (dynamo warns about each). CPU has no varlen kernel, so a
    stand-in with the signature of torch >= 2.15 takes its place and records its keywords."""
    from torch._dynamo import utils as dynamo_utils
    from torch.nn.attention import varlen
    from transformers import AttentionInterface

    calls = []

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, 0),
                    enable_gqa=False):  # fmt: skip
        calls.append(enable_gqa)
        return q * 1

    monkeypatch.setattr(varlen, "varlen_attn", varlen_attn)
    # dynamo gives each warning once a process: one given before this test would not show
    monkeypatch.setattr(dynamo_utils, "warn_once_cache", set())
    function = AttentionInterface()[register_padding_free_attention("torch_varlen")]
    query, key = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)  # 4 query heads, 2 K/V heads
    documents = torch.tensor([0, 2, 6], dtype=torch.int32)
    compiled = torch.compile(function, backend="eager")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out, _ = compiled(torch.nn.Module(), query, key, key, None, cu_seq_lens_q=documents,
                              cu_seq_lens_k=documents, max_length_q=4, max_length_k=4)  # fmt: skip
    finally:
        torch._dynamo.reset()
    assert [str(w.message) for w in caught if "lru_cache" in str(w.message)] == []
    assert out.shape == (1, 6, 4, 8)
    assert calls == [True]  # grouped K/V heads: this signature wants enable_gqa


# Liger 0.8.5's forward passes past_key_values=None, which transformers >= 5.2x renamed to cache:
# a warning of theirs that this test is not about
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_the_loss_call_reads_no_use_return_dict(monkeypatch):
    """Liger's patched forward reads config.use_return_dict, which transformers deprecates with a
    warning, unless the call says return_dict; mt's loss call says it. (Liger's fused loss needs
    a GPU; in eval mode its forward computes the logits and HF's loss, which runs here.)"""
    pytest.importorskip("liger_kernel.transformers")
    from mt_core.model.build import _apply_liger

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    use_padding_free_attention(model, "sdpa")
    _apply_liger(model, loss_only=True)  # what mt applies on a GPU with compiled blocks
    model.eval()

    def deprecated(self):
        raise AssertionError("config.use_return_dict was read")

    monkeypatch.setattr(PretrainedConfig, "use_return_dict", property(deprecated))
    tokens = torch.arange(1, 9)[None]  # two documents, of 3 and 5 tokens
    loss = minibatch_loss(
        model, input_ids=tokens, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]]),
        targets=tokens, cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32), max_seqlen=5,
        global_num_loss_tokens=8,
    )  # fmt: skip
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------
# An error under torchrun shows once


def test_an_error_is_reported_once_per_job(monkeypatch, capsys):
    """report_error in the ranks of one torchrun job, against a store like torchrun's agent's:
    rank 0 writes; another rank only a message that differs from rank 0's, or when rank 0 left
    none in time."""
    agent = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for name, value in {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(agent.port),
                        "TORCHELASTIC_USE_AGENT_STORE": "True",
                        "TORCHELASTIC_RESTART_COUNT": "0"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(mt_errors, "RANK_ZERO_WAIT", timedelta(seconds=0.5))

    def report(rank: int, message: str) -> str:
        monkeypatch.setenv("RANK", str(rank))
        wrote = mt_errors.report_error(message)
        err = capsys.readouterr().err
        assert wrote == bool(err)
        return err

    # rank 0 has not failed (yet): rank 1 waits, then speaks for itself
    assert report(1, "data: no such file") == "mt: error: data: no such file\n"
    assert report(0, "batch_size: too small\nsecond line") == (
        "mt: error: batch_size: too small\nmt: error: second line\n"
    )
    assert report(1, "batch_size: too small\nsecond line") == ""
    assert report(1, "data: no such file") == "mt: error: data: no such file\n"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # a restarted job: rank 0 said nothing
    assert report(1, "batch_size: too small\nsecond line") != ""
