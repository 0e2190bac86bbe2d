"""Padding-free (varlen) attention for unmodified Hugging Face models.

A packed minibatch is one row of concatenated documents, described by ``cu_seqlens``. Each backend
below is registered in transformers' ``AttentionInterface`` under an ``mt_varlen_*`` name and
selected with ``model.set_attn_implementation(name)``; no modeling file is patched. The caller
passes ``cu_seq_lens_q/k`` and ``max_length_q/k`` to the model call and transformers forwards them,
untouched, to the attention function of every layer.

No ``AttentionMaskInterface`` entry is registered on purpose: for an implementation missing there,
``masking_utils`` returns ``None`` straight away (transformers 5.17 to 5.24), so no mask is built
and the position ids are not scanned for packed sequences (a GPU->CPU sync per forward). Each
function then insists on ``cu_seq_lens_q``, so a call without them (a padded batch, generation)
fails loudly instead of letting documents see each other.

Backends, all matching the model run on each document alone (the varlen kernels' adapters are in
:mod:`mt_core.model.attention_kernels`):

* ``flash_attn_4``: flash-attn-4's varlen kernels (CuTe DSL, Hopper and Blackwell: compute
  capability 9.0 or higher; ``pip install "mt-core[flash-attn-4]"``) as two torch ops, so that a
  compiled block keeps them in its graph;
* ``flash_attn``: flash-attn 2's ``flash_attn.flash_attn_varlen_func`` (installed separately);
* ``torch_varlen``: PyTorch's built-in ``torch.nn.attention.varlen.varlen_attn`` (CUDA);
* ``sdpa``: ``scaled_dot_product_attention`` once per document; runs anywhere (CPU tests), as
  one torch op inside compiled blocks (:mod:`mt_core.model.attention_sdpa`).

Attention sinks (GPT-OSS's ``s_aux``: one more logit per head in each softmax, attending to
nothing) and logit softcapping (Gemma 2's) are computed by ``flash_attn_4`` in its kernel and by
``sdpa`` per document in plain tensor ops; the other two refuse them. ``auto`` sends a model with
sinks to ``flash_attn_4`` where it can run, else to ``sdpa``.

Deterministic runs (:mod:`mt_core.model.determinism`): every backend has a deterministic
backward pass under torch's deterministic algorithms (``sdpa`` and ``torch_varlen`` through
torch's own kernels, ``flash_attn`` and ``flash_attn_4`` through their ``deterministic``
argument), except flash-attn-4 on compute capability 12.x (:func:`deterministic_backward_problem`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AttentionInterface, PreTrainedModel

from mt_core.model.attention_kernels import (
    AttentionOutput,
    flash_attn_4_varlen,
    flash_attn_varlen,
    torch_varlen_function,
)
from mt_core.model.attention_sdpa import sdpa_per_document
from mt_core.model.recurrent import run_recurrent_layers_per_document

__all__ = [
    "ATTN_BACKENDS",
    "auto_backend",
    "deterministic_backward_problem",
    "has_attention_sinks",
    "register_padding_free_attention",
    "resolve_attn_backend",
    "runnable_backends",
    "use_padding_free_attention",
]

# The order of listing, not of preference (that is resolve_attn_backend's): the newest last.
ATTN_BACKENDS = ("auto", "flash_attn", "torch_varlen", "sdpa", "flash_attn_4")

# transformers reads meaning into implementation names: one containing "flash" is sent to its
# flash-attention loader (and may fetch a kernel from the Hub), one containing "sdpa" may fall
# back to eager. These names contain neither.
_IMPLEMENTATION_NAMES = {
    "flash_attn_4": "mt_varlen_fa4",
    "flash_attn": "mt_varlen_fa",
    "torch_varlen": "mt_varlen_torch",
    "sdpa": "mt_varlen_perdoc",
}
# flash-attn-4's kernels are written for Hopper (SM 9.0) and later
_FLASH_ATTN_4_CAPABILITY = (9, 0)
_BACKENDS_WITH_SINKS = ("flash_attn_4", "sdpa")


def _flash_attn_problem() -> str | None:
    """Why flash-attn 2's ``flash_attn_varlen_func`` cannot be imported here, or None if it can.

    It is imported, as the forward will: a ``flash_attn`` package alone proves nothing, since
    flash-attn-4 installs ``flash_attn`` as a namespace holding only ``flash_attn.cute``, and
    flash-attn 2 loads its CUDA extension on import, which fails with ImportError or OSError
    when built for another torch or CUDA (or where there is none).
    """
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except (ImportError, OSError) as error:
        if isinstance(error, ModuleNotFoundError) and error.name == "flash_attn":
            return "it is not installed"
        if isinstance(error, ImportError) and _is_flash_attn_4_namespace():
            return "the flash_attn package found is flash-attn-4's namespace (only flash_attn.cute)"
        return f"it failed to import ({type(error).__name__}: {error})"
    return None


def _is_flash_attn_4_namespace() -> bool:
    """Whether ``flash_attn`` is a namespace package (no ``__init__.py``) with a ``cute`` folder:
    read from its spec, so a broken ``__init__`` is not run again."""
    spec = importlib.util.find_spec("flash_attn")
    if spec is None or spec.origin is not None:  # a namespace package has no origin
        return False
    return any(Path(folder, "cute").is_dir() for folder in spec.submodule_search_locations or ())


def _flash_attn_4_problem(device: torch.device) -> str | None:
    """Why flash-attn-4 cannot run on the CUDA ``device``, or None if it can. The GPU is asked
    for its compute capability only once the function imports, so CUDA is left alone where
    flash-attn-4 is absent."""
    return _flash_attn_4_import_problem() or _flash_attn_4_capability_problem(device)


def _flash_attn_4_import_problem() -> str | None:
    """Why the two halves of flash-attn-4's attention that mt calls (the forward and backward
    of its own autograd function) do not import, or None. They are imported, as the first step
    will; the CuTe DSL they load raises RuntimeError where no runtime suits the driver."""
    try:
        from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd  # noqa: F401
    except (ImportError, OSError, RuntimeError) as error:
        missing = error.name if isinstance(error, ModuleNotFoundError) else None
        if missing in ("flash_attn", "flash_attn.cute"):
            return "flash-attn-4 is not installed"
        return f"flash-attn-4 failed to import ({type(error).__name__}: {error})"
    return None


def _flash_attn_4_capability_problem(device: torch.device) -> str | None:
    capability = tuple(torch.cuda.get_device_capability(device))
    if capability < _FLASH_ATTN_4_CAPABILITY:
        return (
            f"this GPU has compute capability {capability[0]}.{capability[1]}, and flash-attn-4 "
            "needs 9.0 or higher (Hopper, Blackwell)"
        )
    return None


def _torch_varlen_present() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def has_attention_sinks(model: torch.nn.Module) -> bool:
    """Whether ``model``'s attention has sinks (a ``sinks`` parameter per layer, as GPT-OSS)."""
    return any(isinstance(getattr(m, "sinks", None), torch.nn.Parameter) for m in model.modules())


def runnable_backends(
    device: torch.device, capability: tuple[int, int] | None = None
) -> tuple[str, ...]:
    """The backends that can run on ``device``, in the order ``auto`` prefers them: on CUDA
    ``flash_attn_4`` (its function imports and the GPU is SM 9.0+), ``flash_attn`` (flash-attn
    2's function imports), ``torch_varlen`` (this torch's ``varlen_attn`` imports); ``sdpa``
    everywhere. ``capability``: the GPU's compute capability where it is known without asking
    CUDA (``mt check`` plans for a GPU that this machine may not have); CUDA is otherwise asked
    only where flash-attn-4 imports."""
    if torch.device(device).type != "cuda":
        return ("sdpa",)
    if capability is None:
        fa4 = _flash_attn_4_problem(device) is None
    else:
        fa4 = _flash_attn_4_import_problem() is None and capability >= _FLASH_ATTN_4_CAPABILITY
    runnable = ["flash_attn_4"] if fa4 else []
    if _flash_attn_problem() is None:
        runnable.append("flash_attn")
    if _torch_varlen_present():
        runnable.append("torch_varlen")
    return (*runnable, "sdpa")


def auto_backend(
    runnable: tuple[str, ...],
    *,
    sinks: bool = False,
    deterministic: bool = False,
    capability: tuple[int, int] | None = None,
) -> str:
    """What ``auto`` chooses among the ``runnable`` backends: the first, or for a model with
    attention sinks the first that computes them, and for a ``deterministic`` run the first
    with a deterministic backward pass on a GPU of this compute ``capability`` (``sdpa``
    always qualifies)."""
    return next(
        name
        for name in runnable
        if (not sinks or name in _BACKENDS_WITH_SINKS)
        and not (deterministic and deterministic_backward_problem(name, capability))
    )


def deterministic_backward_problem(backend: str, capability: tuple[int, int] | None) -> str | None:
    """Why ``backend``'s backward pass cannot be deterministic on a GPU of compute ``capability``
    (None: not known, or no GPU), or None where it can. flash-attn-4 (4.0.0b36) asserts that
    its deterministic backward does not run on compute capability 12.x (consumer Blackwell);
    the other backends have one everywhere they run."""
    if backend == "flash_attn_4" and capability is not None and capability[0] == 12:
        return (
            f"flash-attn-4 has no deterministic backward pass on compute capability "
            f"{capability[0]}.{capability[1]}"
        )
    return None


def resolve_attn_backend(name: str, device: torch.device, *, sinks: bool = False) -> str:
    """The concrete backend for ``name`` (one of :data:`ATTN_BACKENDS`) on ``device``.

    ``auto`` on CUDA picks the first that can run: ``flash_attn_4`` (its function imports and
    the GPU is SM 9.0+), ``flash_attn`` (flash-attn 2's function imports), ``torch_varlen``
    (this torch's ``varlen_attn`` imports); else, and on any other device, ``sdpa``. A model
    with attention ``sinks`` gets ``flash_attn_4`` or ``sdpa``, the two that compute them.
    An explicit choice that cannot run here raises ValueError saying what to install or choose,
    here rather than at the first forward. CUDA is touched only to read the compute capability,
    and only where flash-attn-4 imports and is asked for (``flash_attn_4`` or ``auto``).
    """
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    if name not in ATTN_BACKENDS:
        raise ValueError(f"unknown attn_backend {name!r}; choose one of {', '.join(ATTN_BACKENDS)}")
    if sinks and name not in (*_BACKENDS_WITH_SINKS, "auto"):
        raise ValueError(
            f"attn_backend={name!r} cannot compute this model's attention sinks (GPT-OSS); "
            "use attn_backend='flash_attn_4' (Hopper or Blackwell GPUs) or 'sdpa' (or 'auto'), "
            "which compute them exactly"
        )
    if name == "auto":
        return auto_backend(runnable_backends(device), sinks=sinks)
    if name != "sdpa" and not on_cuda:
        raise ValueError(
            f"attn_backend={name!r} needs a CUDA device, not {device}; "
            "use attn_backend='sdpa' (or 'auto')"
        )
    problem = _REFUSALS[name](device) if name in _REFUSALS else None
    if problem is not None:
        raise ValueError(problem)
    return name


def _flash_attn_4_refusal(device: torch.device) -> str | None:
    problem = _flash_attn_4_import_problem()
    if problem is not None:
        return (
            "attn_backend='flash_attn_4' needs flash-attn-4 (_flash_attn_fwd and _flash_attn_bwd "
            f'of flash_attn.cute.interface, as in 4.0.0b36), but {problem}: install it with pip install "mt-core[flash-attn-4]" (or pip '
            "install flash-attn-4), or use attn_backend='torch_varlen' or 'auto'"
        )
    problem = _flash_attn_4_capability_problem(device)
    if problem is not None:
        return (
            f"attn_backend='flash_attn_4' cannot run here: {problem}; use attn_backend="
            "'flash_attn' (flash-attn 2), 'torch_varlen' or 'auto'"
        )
    return None


def _flash_attn_refusal(device: torch.device) -> str | None:
    problem = _flash_attn_problem()
    if problem is None:
        return None
    return (
        "attn_backend='flash_attn' needs the flash-attn package (flash-attn 2's "
        f"flash_attn_varlen_func), but {problem}: install flash-attn 2 "
        "(pip install flash-attn), or use attn_backend='torch_varlen' or 'auto'"
    )


def _torch_varlen_refusal(device: torch.device) -> str | None:
    if _torch_varlen_present():
        return None
    return (
        f"attn_backend='torch_varlen' needs torch.nn.attention.varlen (torch >= 2.11), "
        f"this is torch {torch.__version__}; upgrade torch or use attn_backend='sdpa'"
    )


# why an explicit choice of a CUDA backend cannot run on a CUDA device (None: it can)
_REFUSALS: dict[str, Callable[[torch.device], str | None]] = {
    "flash_attn_4": _flash_attn_4_refusal,
    "flash_attn": _flash_attn_refusal,
    "torch_varlen": _torch_varlen_refusal,
}


def register_padding_free_attention(backend: str) -> str:
    """Registers the attention function of a concrete ``backend`` (not ``auto``) with transformers
    and returns its attn_implementation name. Registering again is harmless."""
    if backend not in _IMPLEMENTATION_NAMES:
        raise ValueError(
            f"cannot register attn_backend {backend!r}; choose one of "
            f"{', '.join(_IMPLEMENTATION_NAMES)} (resolve 'auto' with resolve_attn_backend first)"
        )
    name = _IMPLEMENTATION_NAMES[backend]
    AttentionInterface.register(name, _BACKEND_FUNCTIONS[backend]())
    return name


def use_padding_free_attention(model: PreTrainedModel, backend: str) -> str:
    """Switches ``model`` to the padding-free attention of a concrete ``backend``; returns the
    attn_implementation name now in ``model.config``. A hybrid model's state-space and
    convolution layers run once per document (:mod:`mt_core.model.recurrent`), or it is refused.

    From then on every forward call must pass ``cu_seq_lens_q``, ``cu_seq_lens_k``,
    ``max_length_q`` and ``max_length_k`` (see :func:`mt_core.trainer.loss.minibatch_loss`). Switch back
    with ``model.set_attn_implementation("sdpa")`` for padded batches or generation.
    """
    name = register_padding_free_attention(backend)
    model.set_attn_implementation(name)
    # transformers only logs a warning for models that do not dispatch through AttentionInterface
    # (it leaves their attention as it was); training those would silently mix documents.
    if model.config._attn_implementation != name:
        raise ValueError(
            f"{type(model).__name__} does not route its attention through transformers' "
            "AttentionInterface, so mt cannot make it padding-free"
        )
    run_recurrent_layers_per_document(model)
    return name


# the attention function of each backend, made when it is registered
_BACKEND_FUNCTIONS: dict[str, Callable[[], Callable[..., AttentionOutput]]] = {
    "flash_attn_4": lambda: flash_attn_4_varlen,
    "flash_attn": lambda: flash_attn_varlen,
    "torch_varlen": torch_varlen_function,
    "sdpa": lambda: sdpa_per_document,
}
