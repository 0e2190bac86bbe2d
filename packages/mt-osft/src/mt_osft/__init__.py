"""Orthogonal Subspace Fine-Tuning (Nayak et al., "Sculpting Subspaces", arXiv 2504.07097) for any
torch module.

Each target weight W = U S V^T keeps its top singular directions frozen: after any number of
optimizer steps the total change ΔW satisfies U_hi^T ΔW = 0 and ΔW V_hi = 0. Typical use::

    state = apply_osft(model, OSFTConfig(unfreeze_rank_ratio=0.25), model_type="llama")
    optimizer = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)
    for batch in batches:
        loss(model, batch).backward()
        state.project_gradients_()   # optional (OSFTConfig.project_gradients)
        optimizer.step()
        state.project_()             # the step that keeps the invariant
        optimizer.zero_grad()
    save(state.dense_state_dict(model))

No transformers import anywhere: targets are chosen by module-name patterns.
"""

from mt_osft.adaptive import AdaptiveRatios, adaptive_ratios, interpolate_ratios, layer_importance
from mt_osft.apply import apply_osft
from mt_osft.config import OSFTConfig, parse_dtype
from mt_osft.patterns import (
    DEFAULT_TARGET_PATTERNS,
    default_target_patterns,
    match_targets,
    name_matches,
)
from mt_osft.state import OSFTState, OSFTTarget
from mt_osft.subspace import (
    SubspacePlan,
    decompose,
    plan_subspace,
    project,
    residual_bound,
    trainable_rank,
)

__all__ = [
    "DEFAULT_TARGET_PATTERNS",
    "AdaptiveRatios",
    "OSFTConfig",
    "OSFTState",
    "OSFTTarget",
    "SubspacePlan",
    "adaptive_ratios",
    "apply_osft",
    "decompose",
    "default_target_patterns",
    "interpolate_ratios",
    "layer_importance",
    "match_targets",
    "name_matches",
    "parse_dtype",
    "plan_subspace",
    "project",
    "residual_bound",
    "trainable_rank",
]
