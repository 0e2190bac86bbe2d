"""Third-party console noise a user cannot act on is dropped for the span of a run, message by
message (issue #30): exactly the named warnings and log records, from the module that gives
each, not another warning of the same library nor one of mt's; and all is put back after."""

from __future__ import annotations

import logging
import warnings

import torch
from transformers import LlamaConfig, LlamaModel
from transformers.utils import logging as hf_logging

from mt_core.trainer.library_noise import quiet_libraries

# as nvidia-cutlass-dsl 4.8 words it (flash-attn-4 4.0.0b36 compiling its kernels)
CUTE = (
    "Argument aux_data (position 17) cannot be converted to a JitArgument for function "
    "'_flash_attn_fwd'. Its type `<class 'tuple'>` is not supported. If the value is known at "
    "compile time, annotate it: `aux_data: Constexpr`.",
    UserWarning,
    "cutlass.base_dsl.dsl",
)
# as transformers 5.24 words it when liger-kernel 0.8.5's fused loss calls the model
LIGER = (
    "`past_key_values` is deprecated and will be removed in version 5.40.0 for "
    "`FSDPLlamaModel.forward`. Use `cache` instead.",
    FutureWarning,
    "torch.nn.modules.module",
)
LIGER_LOG = ("transformers.utils.generic", "`past_key_values`/`cache_params` are deprecated. Use `cache` instead.")  # fmt: skip


def _shown(message: str, category: type[Warning], module: str) -> bool:
    """Whether the warning, given from ``module``, reaches the console (each time: no registry
    of warnings already shown)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", append=True)  # after the filters under test
        warnings.warn_explicit(message, category, "source.py", 1, module=module, registry={})
    return bool(caught)


def _logged(logger_name: str, message: str) -> bool:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        logger.warning(message)
    finally:
        logger.removeHandler(handler)
    return bool(records)


def test_exactly_the_named_messages_are_dropped_and_only_during_the_run():
    near_misses = [
        (CUTE[0], CUTE[1], "mt_core.model.attention"),  # the same words from another module
        ("Argument q (position 1) has an unsupported layout", UserWarning, CUTE[2]),
        ("`past_key_values` is deprecated for `MyModel.forward`.", FutureWarning, LIGER[2]),
        (LIGER[0], UserWarning, LIGER[2]),  # another category
        ("2 samples longer than max_tokens_per_gpu were dropped", UserWarning, "mt_data.sources"),
    ]
    bars = hf_logging.is_progress_bar_enabled()
    with quiet_libraries():
        assert not _shown(*CUTE) and not _shown(*LIGER)
        assert not _logged(*LIGER_LOG)
        assert all(_shown(*warning) for warning in near_misses)
        assert _logged(LIGER_LOG[0], "another message of that logger")
        assert not hf_logging.is_progress_bar_enabled()  # "Writing model shards" at each export
    assert _shown(*CUTE) and _shown(*LIGER) and _logged(*LIGER_LOG)
    assert hf_logging.is_progress_bar_enabled() == bars


def test_the_deprecated_argument_warning_is_dropped_where_transformers_gives_it():
    """The model called with past_key_values, as liger-kernel's fused loss calls it: the warning
    transformers gives (wherever its wording or the module it names drift) is dropped."""
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=32)  # fmt: skip
    model = LlamaModel(config)  # what liger-kernel's forward calls
    with quiet_libraries(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", append=True)
        model(input_ids=torch.tensor([[1, 2, 3]]), past_key_values=None)
    assert [str(w.message) for w in caught] == []
