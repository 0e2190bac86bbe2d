"""Which matrices OSFT targets: module-name patterns, with a default per architecture family.

Patterns match the *module* names of ``model.named_modules()`` (``model.layers.0.self_attn.q_proj``),
and the target is that module's ``weight``. A pattern is a shell-style glob matched case-sensitively
against the whole name (``fnmatch.fnmatchcase``; ``*`` also crosses dots, so ``*.self_attn.q_proj``
matches at any depth and under any wrapper prefix), or, prefixed with ``re:``, a Python regular
expression that must match the whole name (``re:.*\\.layers\\.[0-3]\\..*_proj``).

The defaults are keyed by the ``model_type`` string of a HF config (``config.model_type``); nothing
here imports transformers.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from torch import nn

__all__ = ["DEFAULT_TARGET_PATTERNS", "default_target_patterns", "match_targets", "name_matches"]

# Separate q/k/v/o projections and a gated MLP (gate/up/down): the Llama layout.
_LLAMA_LAYOUT = (
    "*.self_attn.q_proj",
    "*.self_attn.k_proj",
    "*.self_attn.v_proj",
    "*.self_attn.o_proj",
    "*.mlp.gate_proj",
    "*.mlp.up_proj",
    "*.mlp.down_proj",
)
# Phi-3 (and Phi-4, which ships as model_type "phi3") fuses q/k/v and gate/up into one matrix each.
_PHI3_LAYOUT = (
    "*.self_attn.qkv_proj",
    "*.self_attn.o_proj",
    "*.mlp.gate_up_proj",
    "*.mlp.down_proj",
)

DEFAULT_TARGET_PATTERNS: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_LAYOUT,
    "mistral": _LLAMA_LAYOUT,
    "qwen2": _LLAMA_LAYOUT,
    "qwen3": _LLAMA_LAYOUT,
    "granite": _LLAMA_LAYOUT,
    "gemma": _LLAMA_LAYOUT,
    "gemma2": _LLAMA_LAYOUT,
    "phi3": _PHI3_LAYOUT,
}


def default_target_patterns(model_type: str) -> list[str]:
    """The attention (q, k, v, o) and MLP (gate, up, down) matrices of ``model_type``."""
    try:
        return list(DEFAULT_TARGET_PATTERNS[model_type])
    except KeyError:
        raise ValueError(
            f"osft_target_patterns: no default patterns for model_type {model_type!r} "
            f"(known: {', '.join(sorted(DEFAULT_TARGET_PATTERNS))}); set osft_target_patterns"
        ) from None


def name_matches(name: str, pattern: str) -> bool:
    """Whether the module name ``name`` matches one pattern (glob, or ``re:`` regex)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def match_targets(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of the modules matched by any pattern, in ``named_modules`` order.

    Every pattern must match at least one module, and every matched module must own a 2-D
    ``weight`` parameter; either failure is a ValueError naming ``osft_target_patterns``.
    """
    names: list[str] = []
    used = dict.fromkeys(patterns, False)
    for name, module in model.named_modules():
        hits = [pattern for pattern in patterns if name_matches(name, pattern)]
        if not hits:
            continue
        for pattern in hits:
            used[pattern] = True
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter):
            raise ValueError(
                f"osft_target_patterns: {hits[0]!r} matches {name!r} ({type(module).__name__}), "
                f"which has no weight parameter"
            )
        if weight.ndim != 2:
            raise ValueError(
                f"osft_target_patterns: {hits[0]!r} matches {name!r}, whose weight is "
                f"{weight.ndim}-D {tuple(weight.shape)}; OSFT targets 2-D matrices only"
            )
        names.append(name)
    unused = [pattern for pattern, hit in used.items() if not hit]
    if unused:
        raise ValueError(
            f"osft_target_patterns: {', '.join(map(repr, unused))} match no module of "
            f"{type(model).__name__}"
        )
    return names
