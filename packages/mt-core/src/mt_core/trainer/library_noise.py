"""Console noise of the libraries a run calls that its user can do nothing about, kept quiet for
the span of the run (:func:`quiet_libraries`) and not a line more.

Each filter matches one message, from the module that gives it, and says where it comes from
and the versions it was seen with. mt's own warnings, and every other one of the libraries',
still show.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

__all__ = ["quiet_libraries"]

# (message regex, category, module regex) of each warning silenced
SILENCED_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # flash-attn-4 compiles its kernels with an ``aux_data`` argument of a type that the CuTe
    # DSL warns it cannot turn into a JIT argument; seen twice per run on an H200 with
    # flash-attn-4 4.0.0b36 and nvidia-cutlass-dsl 4.8.1 (issue #30). The warning names the
    # DSL's own module (cutlass.base_dsl.dsl in its sources from 4.6 on)
    (
        r"Argument aux_data \(position \d+\) cannot be converted to a JitArgument",
        UserWarning,
        r"cutlass\.",
    ),
    # liger-kernel 0.8.5's patched forward (the fused loss) passes past_key_values to the
    # model, which transformers (5.2x: deprecate_kwarg) renamed to cache; the warning names
    # torch's Module._call_impl, which called the model's forward (transformers 5.24)
    (
        r"`past_key_values` is deprecated and will be removed in version [\d.]+ for "
        r"`\w+\.forward`\. Use `cache` instead\.",
        FutureWarning,
        r"torch\.nn\.modules\.module",
    ),
)
# (logger, message) of each log record silenced: liger-kernel 0.8.5 also reads the output's
# past_key_values, which transformers (5.2x) logs once from transformers.utils.generic
SILENCED_LOG_RECORDS: tuple[tuple[str, str], ...] = (
    (
        "transformers.utils.generic",
        "`past_key_values`/`cache_params` are deprecated. Use `cache` instead.",
    ),
)


class _DropMessage(logging.Filter):
    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != self.message


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Inside the block: the warnings and log records above are dropped, and transformers'
    progress bars are off (its "Writing model shards" bar at each export, transformers 5.x's
    save_pretrained, has no argument of its own to turn it off); all put back on leaving."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    filters = [(logging.getLogger(name), _DropMessage(text)) for name, text in SILENCED_LOG_RECORDS]
    with warnings.catch_warnings():
        for message, category, module in SILENCED_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        for logger, drop in filters:
            logger.addFilter(drop)
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            for logger, drop in filters:
                logger.removeFilter(drop)
            if bars:
                hf_logging.enable_progress_bar()
