"""The memory model behind ``mt check``: what one GPU holds at its peak (the time model:
:mod:`mt_core.plan.step_time`).

Everything here is arithmetic on a :class:`ModelShape` (read from a model's config.json, the model
built on the meta device: exact parameter counts, no weights) and the run's settings. The formulas
are those of docs/commands.md, "How mt check estimates memory"; the figures are what PyTorch's
caching allocator reports as allocated (``torch.cuda.max_memory_allocated``, the trainer's
``peak_mem_gib``), so the CUDA context, NCCL buffers and allocator fragmentation come on top and
are covered by the GPU's headroom (:data:`RESERVED_GIB`, :data:`FIT_FRACTION`).

Per GPU, with P parameters (P_g of them with gradients), world size W, master bytes m (train_dtype:
4 for float32) and compute bytes c = 2 (bf16):

* weights m·P/W, gradients m·P_g/W, AdamW state 2·s·P_g/W (FSDP2 shards all three), s the
  bytes of one moment value (optimizer_state_dtype; m when not set): 4 for float32, 2 for
  bfloat16, 1 + 4/256 for 8-bit moments (a byte a value and a float32 scale per block of 256,
  :func:`mt_core.optim.quant_blocks.quant_block`; the few tensors left unquantized, such as norms and biases, and the
  smaller blocks of rows that are not a multiple of 256 values are counted as if quantized in
  blocks of 256: well under 0.1% of a model worth quantizing); with the
  gradient sync deferred to a step's last minibatch on several GPUs (or on one, with master
  weights narrower than float32), 4·P_g more: the unsharded float32 gradients accumulated until
  then (in the last backward pass they give way to the reduced shards, block by block);
* compute copies: the bf16 root group (embeddings, final norm, LM head) gathered for the whole step,
  two gathered decoder blocks (the running one and the prefetched one; all of them when they
  stay gathered from forward to backward), the LM head's bf16
  gradient (it exists from the start of the backward pass) and one block's gradient in transit
  (bf16, and its copy in FSDP2's reduction dtype for the reduce-scatter: float32, but m bytes
  on one GPU that reduces every minibatch, :func:`reduce_bytes`);
* activations of T = max_tokens_per_gpu tokens, per token and decoder layer (bytes, a Llama-like
  block: hidden h, attention width q = heads·head_dim, key/value width k, MLP width i):
  with Liger's kernels ``a = c·(4h + 2q + 2k + 3i) + 4·heads + 8``; without them HF's RMSNorm
  keeps a float32 copy (+4h per norm, two norms) and SwiGLU one more tensor (+c·i). With
  activation checkpointing each layer keeps only its input (c·h) and one layer is recomputed at
  a time. Compiled blocks (never with Liger's in-block kernels) keep what Liger's would, ``a``,
  at activation memory budget 1; below 1, what torch's partitioner returns
  (:func:`compiled_bytes_per_token_layer`): ``min(c·h + b·(a - c·h), a - c·(2h + i))``, the
  second its more aggressive min-cut, which recomputes the norms' outputs and SwiGLU's product
  (exact to the byte for Llama blocks against torch 2.11 and 2.15's partitioner,
  tools/compiled_activations.py). Where FP8 computes the large linear layers (key float8), the
  blocks keep h + 2i bytes less at budget 1 (:func:`float8_kept_saving`) and, below 1, no more
  than bfloat16 blocks do, which the estimate counts.
  With activation offload what each layer keeps waits in host memory between its forward and
  backward passes (mt_core.model.activation_offload): the GPU holds that of min(L, 2) layers (the
  running one and the one in flight to or from the host; the last layer is never sent, the
  backward pass needs it first), the host that of the L - 1 others (counted in ``host``);
* the loss: Liger's fused linear cross-entropy never holds the logits (about 4·c·T·h of chunks and
  gradients); without it the float32 logits, their log-softmax and its gradient, 12·T·V bytes.

The peak is the larger of two moments: the start of the backward pass (all activations and the
loss alive; gradients too when a step has more than one minibatch: those of the earlier ones) and
its end (every gradient made, one layer's activations left). The optimizer step itself (fused
AdamW) needs nothing beyond weights, gradients and state; torchao's compiled step (other moment
precisions, stochastic rounding) goes one parameter at a time, with float32 temporaries of at
most one shard (a few copies of it; not yet measured on a GPU), after the activations are freed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from mt_core.optim.quant_blocks import QUANT_BLOCK

GIB = 2**30
COMPUTE_BYTES = 2  # bf16 forward/backward on a GPU (FSDP2 mixed precision)
MASTER_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# bytes of one moment value by optimizer_state_dtype (not set: MASTER_BYTES of train_dtype)
STATE_BYTES = {"float32": 4, "bfloat16": 2, "8bit": 1 + 4 / QUANT_BLOCK}


RESERVED_GIB = 1.5  # CUDA context, NCCL and cuBLAS workspaces: outside torch's allocator
FIT_FRACTION = 0.92  # of the rest: the allocator's fragmentation needs some room

# What torch.cuda reports as total memory (GiB), and the dense bf16 datasheet peak (FLOP/s).
GPUS = {
    "H100": (79.2, 989e12, "H100 80 GB"),
    "H200": (139.7, 989e12, "H200 141 GB"),
    "A100": (79.2, 312e12, "A100 80 GB"),
    "A100-40": (39.4, 312e12, "A100 40 GB"),
}
GPU_ALIASES = {"H100-80": "H100", "A100-80": "A100", "H200-141": "H200"}


@dataclass(frozen=True)
class Gpu:
    name: str
    label: str
    memory_gib: float
    peak_flops: float

    @property
    def usable_gib(self) -> float:
        """What a run may allocate and still be called fitting."""
        return usable_bytes(self.memory_gib * GIB) / GIB


def usable_bytes(total_bytes: float) -> float:
    """Of a GPU's memory, what torch may allocate and still leave room for what is outside its
    allocator and for fragmentation."""
    return (total_bytes - RESERVED_GIB * GIB) * FIT_FRACTION


def gpu(name: str) -> Gpu:
    """The GPU of ``--gpu`` (H100, H200, A100, A100-40; case and a trailing 'GB' ignored)."""
    key = str(name).upper().removesuffix("GB").replace("_", "-").rstrip("-")
    key = GPU_ALIASES.get(key, key)
    if key not in GPUS:
        known = ", ".join(GPUS)
        raise ValueError(f"--gpu: unknown GPU {name!r}; choose one of {known}")
    memory, peak, label = GPUS[key]
    return Gpu(key, label, memory, peak)


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model (from its config, built on meta)."""

    architecture: str
    params: int  # every parameter, a tied one once
    grad_params: int  # parameters with gradients (and optimizer state)
    trainable: int  # dimension of what training can change (OSFT: the trainable subspaces)
    matmul_params: int  # N of the 6N FLOPs rule
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    block_params: int  # the largest decoder block
    root_params: int  # outside the blocks: embeddings, final norm, LM head
    head_params: int  # the LM head's weight (the tied embedding when tied)
    # OSFT's state, whole model (sharded over the ranks): the frozen copies W0 (in the master
    # dtype) and the bases (bfloat16 for bfloat16 masters, else osft_upcast_dtype's bytes)
    osft_reference_values: int = 0
    osft_basis_values: int = 0
    osft_upcast_bytes: int = 4
    osft_projection_flops: int = 0  # one projection of every projected target (mt_osft)
    moe: bool = False  # mixture of experts: the activation formula is only a guide
    qk_norms: bool = False  # each head's queries and keys normalised (Qwen3, Gemma3)
    sandwich_norms: bool = False  # each sub-layer's output normalised too (Gemma2, Gemma3)
    sinks: bool = False  # attention sinks (GPT-OSS): only some attention backends compute them
    float8_params: int = 0  # weights of the linear layers the key float8 converts


@dataclass(frozen=True)
class Settings:
    """The run's choices that move memory."""

    max_tokens: int
    world_size: int
    master: str = "float32"  # train_dtype
    state: str | None = None  # optimizer_state_dtype (None: the master's)
    liger: bool = True
    compiled: bool = False  # compiled decoder blocks: what they keep is the partitioner's choice
    checkpointing: bool = False
    cpu_offload: bool = False
    deferred_sync: bool = False  # gradients reduced once per step (sync_gradients_every_minibatch)
    minibatches: int = 1  # the most minibatches one GPU runs in a step
    activation_budget: float = 1.0  # compiled blocks: torch's activation_memory_budget
    gathered: bool = False  # blocks stay gathered (bf16) from their forward to their backward
    activation_offload: bool = False  # what the blocks keep for backward waits in host memory
    osft_reference_on_host: bool = False  # OSFT's frozen copies W0 wait in host memory
    float8: str | None = None  # the FP8 recipe of the blocks' large linear layers (key float8)


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU, each part at its own largest; ``peak`` is the sum at the worst moment."""

    weights: float
    gradients: float
    optimizer: float
    osft: float
    copies: float
    activations: float  # all layers, at the start of the backward pass
    activations_end: float  # left at the end of the backward pass
    loss: float
    peak: float
    peak_at: str  # "start of backward" or "end of backward"
    host: float  # bytes per GPU process kept in host memory (cpu_offload, activation_offload)


def moment_bytes(run: Settings) -> float:
    """Bytes of one AdamW moment value (two per parameter with a gradient)."""
    return MASTER_BYTES[run.master] if run.state is None else STATE_BYTES[run.state]


def osft_reference_bytes(shape: ModelShape, master: str) -> int:
    """OSFT's frozen copies W0, whole model: one per projected target, in the master dtype."""
    return MASTER_BYTES[master] * shape.osft_reference_values


def osft_state_bytes(shape: ModelShape, master: str, reference_on_host: bool = False) -> int:
    """OSFT's state on the GPU, whole model: W0 (unless it waits in host memory) and the bases,
    in bfloat16 for bfloat16 weights, else in the upcast dtype (mt_osft.subspace.basis_dtype)."""
    basis = 2 if master == "bfloat16" else shape.osft_upcast_bytes
    on_gpu = 0 if reference_on_host else osft_reference_bytes(shape, master)
    return on_gpu + basis * shape.osft_basis_values


def activation_bytes_per_token_layer(shape: ModelShape, liger: bool) -> float:
    """Bytes one token keeps for the backward pass in one decoder layer (no checkpointing)."""
    c = COMPUTE_BYTES
    h, i = shape.hidden, shape.intermediate
    q, k = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    # norm input, normed x (q/k/v input), q, k, v, attention output, norm input, normed x,
    # gate, up, SwiGLU output; plus the attention's float32 log-sum-exp per head and each
    # norm's float32 reciprocal RMS
    per = c * (4 * h + 2 * q + 2 * k + 3 * i) + 4 * shape.heads + 2 * 4
    if shape.qk_norms:  # q and k before their norms, and a reciprocal RMS per head
        per += c * (q + k) + 4 * (shape.heads + shape.kv_heads)
    if shape.sandwich_norms:  # one more hidden-wide tensor and two more reciprocal RMS
        per += c * h + 2 * 4
    if not liger:
        per += 2 * 4 * h + c * i  # HF RMSNorm's float32 copies; SwiGLU's activation output
    return per


def compiled_bytes_per_token_layer(
    shape: ModelShape, budget: float, float8: str | None = None
) -> float:
    """Bytes one token keeps for the backward pass in one compiled decoder layer at torch's
    ``activation_memory_budget``. At 1 the compiler keeps what Liger's fused kernels keep (the
    norms and SwiGLU fused into their neighbours), less :func:`float8_kept_saving` where the
    ``float8`` recipe computes the large linear layers. Below 1 torch's partitioner
    (torch/_functorch/partitioners.py, choose_saved_values_set) first tries a more aggressive
    min-cut, which recomputes the two norms' outputs and SwiGLU's product from what is kept
    anyway, and returns it wherever its share is under the budget: ``a - c·(2h + i)`` for every
    budget from about 0.66 to 0.99 (not 0.99 of ``a``). Below that share a knapsack keeps at most
    the budget's share of what lies beyond the block's input. Exact to the byte (and the knapsack
    within its bound) for Llama blocks of 1B to 8B widths, torch 2.11 and 2.15
    (tools/compiled_activations.py, tools/bench/RESULTS.md); other blocks: a guide.

    FP8 blocks below budget 1 are counted as bfloat16 ones: they kept no more at any budget
    measured (0.03 to 0.99, three widths), by amounts that follow no one rule yet (none at the
    aggressive cut's plateau, up to 8 B per hidden unit elsewhere), so this is an upper bound
    there."""
    per = activation_bytes_per_token_layer(shape, liger=True)
    if budget >= 1:
        return per - float8_kept_saving(shape, float8)
    held = COMPUTE_BYTES * shape.hidden
    aggressive_cut = per - COMPUTE_BYTES * (2 * shape.hidden + shape.intermediate)
    return min(held + budget * (per - held), aggressive_cut)


def float8_kept_saving(shape: ModelShape, recipe: str | None) -> int:
    """Bytes per token and layer that compiled blocks keep less at activation budget 1 when
    ``recipe`` computes their q, o and MLP projections in FP8: h + 2i for tensorwise, measured
    exactly on the 1B, 3B and 8B Llama shapes (tools/compiled_activations.py --float8; the 1B run
    on an H100 peaked 4.1 GiB lower, as this says). 0 where not measured (rowwise, another set
    of converted layers, experts, extra norms) or where nothing converts."""
    if recipe != "tensorwise" or shape.moe or shape.qk_norms or shape.sandwich_norms:
        return 0
    attention = 2 * shape.hidden * shape.heads * shape.head_dim  # q and o
    converted = shape.layers * (attention + 3 * shape.hidden * shape.intermediate)
    return shape.hidden + 2 * shape.intermediate if shape.float8_params == converted else 0


def loss_bytes(shape: ModelShape, tokens: int, liger: bool) -> float:
    """The loss head's memory at its peak (plus the final norm's saved input)."""
    if liger:  # chunked logits (about T·h elements), the input gradient, the norm's input
        return 4 * COMPUTE_BYTES * tokens * shape.hidden
    # float32 logits' log-softmax, its gradient and the gradient of its input: 12 bytes each,
    # and the final norm as HF computes it (float32 copy and the bf16 result)
    return 12 * tokens * shape.vocab + (4 + 2 * COMPUTE_BYTES) * tokens * shape.hidden


def reduce_bytes(run: Settings) -> int:
    """Bytes of a gradient value in FSDP2's reduction dtype, as :func:`mt_fsdp.shard_model`
    chooses it: the master weights' own on one GPU where every minibatch is reduced (the
    "reduction" only copies there), else float32 (several ranks sum in it, and a deferred sync
    adds minibatches up in it)."""
    return MASTER_BYTES[run.master] if run.world_size == 1 and not run.deferred_sync else 4


def estimate(shape: ModelShape, run: Settings) -> Memory:
    """Peak memory per GPU of one training step of ``run`` (see the module docstring)."""
    w = run.world_size
    m = MASTER_BYTES[run.master]
    c = COMPUTE_BYTES
    weights = m * shape.params / w
    gradients = m * shape.grad_params / w
    optimizer = 2 * moment_bytes(run) * shape.grad_params / w
    osft = osft_state_bytes(shape, run.master, run.osft_reference_on_host) / w
    gathered = shape.layers if run.gathered else 2  # else the running and the prefetched one
    copies = c * (shape.root_params + gathered * shape.block_params + shape.head_params)
    copies += (c + reduce_bytes(run)) * shape.block_params  # a block's gradient to the shards

    # a layer that runs whole (the one recomputed under checkpointing, each one without):
    # compiled blocks fuse what Liger's kernels fuse
    per_layer = activation_bytes_per_token_layer(shape, run.liger or run.compiled)
    t = run.max_tokens
    # the layers whose kept activations are on the GPU at the start of the backward pass
    on_gpu = min(shape.layers, 2) if run.activation_offload else shape.layers
    if run.checkpointing:  # each layer keeps its input; one layer is recomputed at a time
        kept = c * shape.hidden
        activations = t * (on_gpu * kept + per_layer)
        activations_end = t * (kept + per_layer)
    else:
        kept = per_layer
        if run.compiled:  # what the partitioner keeps at the run's budget
            kept = compiled_bytes_per_token_layer(shape, run.activation_budget, run.float8)
        activations = t * on_gpu * kept
        activations_end = t * kept
    loss = loss_bytes(shape, t, run.liger)

    resident = weights + optimizer + osft  # on the GPU unless offloaded
    host = t * (shape.layers - 1) * kept if run.activation_offload else 0.0
    if run.osft_reference_on_host:  # (up to three come back during the weight projection)
        host += osft_reference_bytes(shape, run.master) / w
    if run.cpu_offload:
        host += resident + gradients
        resident, grads_on_gpu = 0.0, 0.0
    else:
        grads_on_gpu = gradients
    # a deferred sync: FSDP2 accumulates whole float32 gradients from the first minibatch's
    # backward to the step's last, alive at both moments of every later minibatch (on the GPU
    # also under cpu_offload; on one GPU with float32 weights they are the gradients counted
    # above, with narrower ones twice their bytes)
    deferred = run.deferred_sync and (w > 1 or run.cpu_offload or m < 4)
    accumulated = 4 * shape.grad_params if deferred else 0.0
    # after a step's first minibatch its gradients (sharded, or the deferred whole ones) are alive
    earlier = 0.0 if run.minibatches == 1 or accumulated else grads_on_gpu
    start = resident + accumulated + earlier + copies + activations + loss
    # in the last backward pass each block's accumulated gradient is freed as its reduced shard
    # is made: never more than the larger of the two at once
    end = resident + max(accumulated, grads_on_gpu) + copies + activations_end
    peak, peak_at = (start, "start of backward") if start >= end else (end, "end of backward")
    return Memory(
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        osft=osft,
        copies=copies,
        activations=activations,
        activations_end=activations_end,
        loss=loss,
        peak=peak,
        peak_at=peak_at,
        host=host,
    )


def worst_minibatch(shape: ModelShape, run: Settings, first: int, later: int) -> Settings:
    """``run`` as the minibatch of a run's steps that peaks highest: its largest first minibatch
    of a step (``first`` tokens on one GPU) or its largest later one (``later``, 0 where no step
    has two), whose backward pass starts with the step's earlier gradients alive. At least one
    of the two must be positive."""
    runs = [
        replace(run, max_tokens=tokens, minibatches=minibatches)
        for tokens, minibatches in ((first, 1), (later, 2))
        if tokens > 0
    ]
    return max(runs, key=lambda candidate: estimate(shape, candidate).peak)


def _share(shape: ModelShape, kept: float) -> float:
    """The share s with ``kept = c·h + s·(a - c·h)`` bytes per token and compiled layer."""
    held = COMPUTE_BYTES * shape.hidden
    return (kept - held) / (activation_bytes_per_token_layer(shape, liger=True) - held)


def compiled_share(shape: ModelShape, budget: float) -> float:
    """The share s of ``c·h + s·(a - c·h)`` that compiled blocks keep at ``budget``
    (:func:`compiled_bytes_per_token_layer`): the budget itself below the aggressive cut's share,
    that share above it, 1 at 1."""
    return _share(shape, compiled_bytes_per_token_layer(shape, budget))


def kept_activation_share(shape: ModelShape, run: Settings, measured_bytes: float) -> float | None:
    """The share s of ``c·h + s·(a - c·h)`` (what each compiled layer keeps per token) that a
    measured peak implies, every other term of :func:`estimate` taken as it is: for a peak equal
    to the estimate, :func:`compiled_share` of the run's budget. None where the blocks are not
    compiled or are checkpointed (each keeps only its input: nothing to infer)."""
    if run.checkpointing or not run.compiled:
        return None
    memory = estimate(shape, run)
    start = memory.peak_at == "start of backward"
    others = memory.peak - (memory.activations if start else memory.activations_end)
    layers = (min(shape.layers, 2) if run.activation_offload else shape.layers) if start else 1
    return _share(shape, (measured_bytes - others) / (run.max_tokens * layers))


def largest_fitting_tokens(shape: ModelShape, run: Settings, budget_bytes: float) -> int:
    """The largest max_tokens_per_gpu whose peak stays within ``budget_bytes`` (0 if none)."""
    if estimate(shape, replace(run, max_tokens=1)).peak > budget_bytes:
        return 0
    low, high = 1, max(run.max_tokens, 2)
    while estimate(shape, replace(run, max_tokens=high)).peak <= budget_bytes:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        if estimate(shape, replace(run, max_tokens=middle)).peak <= budget_bytes:
            low = middle
        else:
            high = middle
    return low


def fitting_activation_budget(
    shape: ModelShape, run: Settings, budget_bytes: float, host_bytes: float = math.inf
) -> float | None:
    """The largest activation memory budget (a multiple of 0.01 in [0, 1]) whose peak stays
    within ``budget_bytes`` (and what it keeps in host memory within ``host_bytes``): 1 when the
    run fits as it is, None when it does not fit even with every activation recomputed but the
    blocks' inputs."""
    if run.checkpointing:  # nothing for the compiler to choose: every block is recomputed
        return 1.0

    def fits(budget: float) -> bool:
        memory = estimate(shape, replace(run, activation_budget=budget))
        return memory.peak <= budget_bytes and memory.host <= host_bytes

    fitting = [b / 100 for b in range(101) if fits(b / 100)]
    return max(fitting) if fitting else None
