"""The run configuration's attrs classes: every key with its type, checks, default and help.

Field order is the order of ``mt run --help`` and of the resolved run file; each field's group
(metadata) is its section there. Checks of one key live on the field (:func:`field`); checks
across keys run after construction and name the key to point at.
"""

from __future__ import annotations

from typing import Any

import attrs

from mt_core.config.fields import (
    KeyedConfigError,
    at_least,
    at_most,
    below_one,
    field,
    finite,
    fixed,
    greater_than,
    import_paths,
    not_empty,
    shown,
    string_keys,
)
from mt_core.config.schedulers import SCHEDULERS, scheduler_problems, usable_scheduler

# The names of mt_core.model.build.TORCH_DTYPES and mt_core.model.attention.ATTN_BACKENDS, spelled out here
# because those modules import torch and reading a run file should not; a test keeps them equal.
DTYPES = ("float32", "bfloat16", "float16")
ATTN_BACKENDS = ("auto", "flash_attn", "torch_varlen", "sdpa", "flash_attn_4")
# mt_core.optim.build.STATE_DTYPES, spelled out for the same reason
OPTIMIZER_STATE_DTYPES = ("float32", "bfloat16", "8bit")
# mt_core.model.float8.RECIPES: torchao's float8 training recipes, spelled out for the same reason
FLOAT8_RECIPES = ("tensorwise", "rowwise")
TRAINING_MODES = ("epoch", "step", "token", "infinite")

# the [pretraining] table's section title in --help (its group)
PRETRAINING_GROUP = (
    "[pretraining] table: present = continued pretraining on documents cut into blocks"
)


@attrs.define(kw_only=True)
class PretrainingConfig:
    """Continued pretraining: the corpus is read as one token stream cut into blocks."""

    block_size: int = field(
        "Tokens per block (input positions per training item). Must fit in max_tokens_per_gpu.",
        PRETRAINING_GROUP,
        "integer",
        greater_than(1),
    )
    segment_documents: bool = field(
        "Attention stays inside each document of a block (position ids restart at every "
        "document). false = classic contiguous blocks that attend across document boundaries.",
        PRETRAINING_GROUP,
        "boolean",
        default=True,
    )


_MODEL = "Model and data"
_BATCH = "Batch"
_OPTIMIZER = "Optimizer"
_SCHEDULE = "Learning-rate schedule"
_LENGTH = "Length of training"
_CHECKPOINTS = "Checkpoints"
_RESUME = "Resume and preemption"
_VALIDATION = "Validation"
_OSFT = "Orthogonal Subspace Fine-Tuning (OSFT)"
_SPEED = "Precision, memory and speed"
_LOGGING = "Logging and callbacks"


@attrs.define(kw_only=True)
class TrainingArgs:
    """Everything one training run needs; a run file's keys, one to one."""

    model_name_or_path: str = field(
        "The model to train: a local Hugging Face model folder, or a hub name where the network "
        "allows.",
        _MODEL,
        "string",
        not_empty,
    )
    data_path: str = field(
        "Training data: a JSONL file of pre-tokenized samples (input_ids, labels), or of "
        "documents (input_ids) with [pretraining].",
        _MODEL,
        "string",
        not_empty,
    )
    output_dir: str = field(
        "Directory for the resolved run file, metrics.jsonl, checkpoints and HF exports.",
        _MODEL,
        "string",
        not_empty,
    )
    data_cache_dir: str | None = field(
        "Folder for the validated token store of each data file (built once per folder, then "
        "memory-mapped by every process that uses it). Not set = output_dir/data_cache, one copy "
        "shared by all nodes (mt check builds it ahead of the job). A node-local folder, e.g. "
        "'$TMPDIR/mt-data', gives each node its own copy, built once per node: $VARIABLES and ~ "
        "are expanded on each node.",
        _MODEL,
        "string",
        not_empty,
        default=None,
        optional=True,
    )
    trust_remote_code: bool = field(
        "Run custom modeling code shipped with the model (Hugging Face trust_remote_code). "
        "Only for models you trust.",
        _MODEL,
        "boolean",
        default=False,
    )
    too_long_samples: str = field(
        "Samples longer than a row (max_tokens_per_gpu x sequence_parallel_size) fit in no "
        "minibatch: 'drop' them with a "
        "warning that gives their count, or refuse the data with an 'error' naming each one.",
        _MODEL,
        "string",
        default="drop",
        choices=fixed("drop", "error"),
    )

    batch_size: int = field(
        "Samples per optimizer step, over all GPUs together (the global batch).",
        _BATCH,
        "integer",
        greater_than(0),
    )
    max_tokens_per_gpu: int = field(
        "Most tokens one GPU computes at once. Each step's batch is split into as many "
        "minibatches per GPU as needed (gradients are accumulated), balanced across GPUs.",
        _BATCH,
        "integer",
        greater_than(0),
    )
    sequence_parallel_size: int = field(
        "GPUs that compute each packed row together (sequence parallelism): a group of this "
        "many consecutive ranks holds rows of up to sequence_parallel_size x "
        "max_tokens_per_gpu tokens, each GPU a consecutive part, and exchanges attention heads "
        "for tokens around attention (all-to-all, DeepSpeed-Ulysses style), so a sample longer "
        "than one GPU's row trains whole and exactly. Must divide the number of processes and "
        "the model's attention and key/value head counts. 1 = off.",
        _BATCH,
        "integer",
        greater_than(0),
        default=1,
    )

    learning_rate: float = field(
        "Peak learning rate of AdamW.", _OPTIMIZER, "float", finite, greater_than(0)
    )
    beta1: float = field(
        "AdamW beta1 (decay of the gradient's running mean).",
        _OPTIMIZER,
        "float",
        at_least(0),
        below_one,
        default=0.9,
    )
    beta2: float = field(
        "AdamW beta2 (decay of the squared gradient's running mean).",
        _OPTIMIZER,
        "float",
        at_least(0),
        below_one,
        default=0.95,
    )
    eps: float = field(
        "AdamW epsilon (added to the denominator for numerical stability).",
        _OPTIMIZER,
        "float",
        finite,
        greater_than(0),
        default=1e-8,
    )
    weight_decay: float = field(
        "AdamW decoupled weight decay.", _OPTIMIZER, "float", finite, at_least(0), default=0.0
    )
    max_grad_norm: float = field(
        "Clip the global gradient norm (over all GPUs) to this value; 0 disables clipping.",
        _OPTIMIZER,
        "float",
        finite,
        at_least(0),
        default=1.0,
    )

    lr_scheduler: str = field(
        "A schedule of transformers.get_scheduler. With training_mode = 'infinite' only those "
        "that need no total step count: constant, constant_with_warmup, inverse_sqrt, or "
        "warmup_stable_decay with lr_scheduler_kwargs.num_stable_steps.",
        _SCHEDULE,
        "string",
        usable_scheduler,
        default="cosine",
        choices=fixed(*SCHEDULERS),
    )
    lr_scheduler_kwargs: dict = field(
        "Extra arguments of the schedule, e.g. num_cycles = 1 for cosine_with_restarts or "
        "min_lr_rate = 0.1 for cosine_with_min_lr, as an inline table: { min_lr_rate = 0.1 }.",
        _SCHEDULE,
        "table",
        string_keys,
        default=attrs.Factory(dict),
    )
    num_warmup_steps: int = field(
        "Optimizer steps of learning-rate warmup.", _SCHEDULE, "integer", at_least(0), default=0
    )

    training_mode: str = field(
        "When training stops: 'epoch' after max_epochs passes over the data, 'step' after "
        "max_steps optimizer steps, 'token' after max_tokens tokens, 'infinite' "
        "never (stop it yourself; checkpoints are written on SIGTERM).",
        _LENGTH,
        "string",
        default="epoch",
        choices=fixed(*TRAINING_MODES),
    )
    max_epochs: int = field(
        "Passes over the data (training_mode = 'epoch').",
        _LENGTH,
        "integer",
        greater_than(0),
        default=1,
    )
    max_steps: int = field(
        "Optimizer steps (training_mode = 'step'); 0 = not set.",
        _LENGTH,
        "integer",
        at_least(0),
        default=0,
    )
    max_tokens: int = field(
        "Tokens trained on, real tokens without padding (training_mode = 'token'); 0 = not set.",
        _LENGTH,
        "integer",
        at_least(0),
        default=0,
    )
    seed: int = field(
        "Seed of the data order and of every random number generator.",
        _LENGTH,
        "integer",
        at_least(0),
        default=42,
    )
    deterministic: bool = field(
        "Bit-reproducible GPU runs: the same run twice gives bit-identical losses, gradient "
        "norms and weights, and a run stopped (SIGTERM or SIGKILL) and resumed equals the run "
        "never stopped. Turns on PyTorch's deterministic algorithms (with the cuBLAS workspace "
        "they need), compiled kernels chosen without timing them, and attention kernels with "
        "deterministic backward passes: attn_backend = 'auto' picks one, and a backend without "
        "one is refused. Holds on the same GPUs, GPU count and software, with the same "
        "settings (the run's first line lists them). Costs tokens/s: 0.5% on one H200 (1B "
        "shape, flash-attn-4, compiled blocks, Liger; tools/bench/RESULTS.md). CPU runs are "
        "reproducible without it.",
        _LENGTH,
        "boolean",
        default=False,
    )

    min_samples_per_checkpoint: int | None = field(
        "Export the model to output_dir/hf_format/samples_<N>/ each time at least this many "
        "more samples have been trained on. Not set = no periodic exports.",
        _CHECKPOINTS,
        "integer",
        greater_than(0),
        default=None,
        optional=True,
    )
    checkpoint_at_epoch: bool = field(
        "Export the model at the end of every epoch.", _CHECKPOINTS, "boolean", default=False
    )
    save_final_checkpoint: bool = field(
        "Export the model when training ends.", _CHECKPOINTS, "boolean", default=True
    )
    save_dtype: str | None = field(
        "Dtype of exported weights. Not set = the model's own dtype (torch_dtype of its config).",
        _CHECKPOINTS,
        "string",
        default=None,
        optional=True,
        choices=fixed(*DTYPES),
    )

    checkpoint_every_steps: int | None = field(
        "Write a full training-state checkpoint (model, optimizer, schedule, data position, "
        "RNG) to output_dir/checkpoints/step_<N>/ every this many steps, for resume. Not set = "
        "only when stopped by SIGTERM/SIGINT.",
        _RESUME,
        "integer",
        greater_than(0),
        default=None,
        optional=True,
    )
    keep_last_checkpoints: int | None = field(
        "Keep only the newest this many training-state checkpoints (older ones are removed "
        "after a new one is complete). Not set = keep all.",
        _RESUME,
        "integer",
        greater_than(0),
        default=2,
        optional=True,
    )
    resume: str = field(
        "'auto' = continue from the newest complete checkpoint in output_dir/checkpoints if "
        "there is one; 'off' = start fresh; or the path of a checkpoint folder.",
        _RESUME,
        "string",
        not_empty,
        default="auto",
    )
    on_demand_checkpointing: bool = field(
        "mini_trainer's key: SIGUSR1 and SIGUSR2 (e.g. SLURM's --signal=USR1@120) also write a "
        "full training-state checkpoint at the next step boundary and stop, as SIGTERM and "
        "SIGINT always do.",
        _RESUME,
        "boolean",
        default=False,
    )
    collective_timeout: float = field(
        "Seconds a process waits in one collective (a step's all-reduce, a checkpoint's "
        "gather) for the others before it gives up and the run stops (on CPUs with mt's "
        "message naming the ranks lost; on GPUs NCCL's watchdog ends each process with its "
        "own). It bounds how long a node that went silent (powered off, cut off, hung) holds "
        "every GPU of the job: PyTorch's own default is 10 minutes with NCCL and 30 with gloo. "
        "A healthy run's processes meet within seconds of each other; the longest wait is for "
        "a node building its data store: raise it where that takes longer. Waits for one "
        "process's file work are not collectives and not bounded by it: under torchrun the "
        "others wait for rank 0 writing an export (a 70B model's 141 GB: minutes) or renaming "
        "a checkpoint in torchrun's store, for up to 2 hours while it lives (one that dies "
        "meanwhile is noticed within 10 s: its heartbeat there stops).",
        _RESUME,
        "float",
        finite,
        greater_than(0),
        default=180.0,
    )
    resume_from_full_state_checkpoint: str | None = field(
        "mini_trainer's key: resume from this checkpoint folder (the same as resume = PATH).",
        _RESUME,
        "string",
        not_empty,
        default=None,
        optional=True,
    )
    skip_nonfinite_steps: bool = field(
        "A step whose loss or gradient norm is NaN or infinite is skipped (no update; counted "
        "as skipped_steps in the metrics) instead of stopping the run.",
        _RESUME,
        "boolean",
        default=False,
    )

    validation_split: float = field(
        "Share of the data held out for validation (a seeded, deterministic choice); 0 = none. "
        "Not together with validation_data_path.",
        _VALIDATION,
        "float",
        at_least(0),
        below_one,
        default=0.0,
    )
    validation_data_path: str | None = field(
        "A separate validation file in the training data's format. Not together with "
        "validation_split.",
        _VALIDATION,
        "string",
        not_empty,
        default=None,
        optional=True,
    )
    validation_frequency: int | None = field(
        "Validate every this many optimizer steps. With validation data at least one trigger "
        "(this, validate_at_epoch, min_samples_per_validation, validate_at_final) is needed; "
        "triggers that fire on the same step validate once.",
        _VALIDATION,
        "integer",
        greater_than(0),
        default=None,
        optional=True,
    )
    validate_at_epoch: bool = field(
        "Validate at the end of every epoch.", _VALIDATION, "boolean", default=False
    )
    min_samples_per_validation: int | None = field(
        "Validate each time at least this many more samples have been trained on.",
        _VALIDATION,
        "integer",
        greater_than(0),
        default=None,
        optional=True,
    )
    validate_at_final: bool = field(
        "Validate when training ends.", _VALIDATION, "boolean", default=False
    )
    save_best_val_loss: bool = field(
        "Export the model to hf_format/ each time the validation loss improves on the best so "
        "far by more than val_loss_improvement_threshold.",
        _VALIDATION,
        "boolean",
        default=False,
    )
    val_loss_improvement_threshold: float = field(
        "How much lower than the best so far a validation loss must be to count as better.",
        _VALIDATION,
        "float",
        finite,
        at_least(0),
        default=0.0,
    )

    osft: bool = field(
        "Orthogonal Subspace Fine-Tuning: each target matrix keeps its top singular directions "
        "frozen (the total change stays orthogonal to them), so earlier knowledge is kept.",
        _OSFT,
        "boolean",
        default=False,
    )
    osft_unfreeze_rank_ratio: float = field(
        "Share of each target matrix's rank that trains, smallest singular values first: "
        "0.0 = all frozen, 1.0 = full fine-tuning.",
        _OSFT,
        "float",
        at_least(0),
        at_most(1),
        default=0.25,
    )
    osft_target_patterns: list | None = field(
        "Module-name patterns of the target matrices (globs, or 're:' + a regex). Not set = "
        "attention q/k/v/o and MLP gate/up/down of the model's architecture.",
        _OSFT,
        "array",
        default=None,
        optional=True,
    )
    osft_upcast_dtype: str = field(
        "Precision of the singular bases and projections of float32 weights (bfloat16 weights "
        "keep bfloat16 bases; the split itself is always computed in float64).",
        _OSFT,
        "string",
        default="float32",
        choices=fixed("float32", "float64"),
    )
    osft_reference_on_host: bool | None = field(
        "Keep OSFT's frozen copies W0 (one per target matrix, in the master dtype: 13 GiB at 8B "
        "in bfloat16) in pinned host memory and copy each to the GPU for its weight projection "
        "after the step, overlapped with the projection before it: the same weights bit for "
        "bit, for a host-to-GPU copy of them every step. Not set = on when the run sets "
        "activation_checkpointing = true (its lean plan) or fits the GPU only so by mt check's "
        "estimate (before activation_offload and cpu_offload).",
        _OSFT,
        "boolean",
        default=None,
        optional=True,
    )
    osft_output_dtype: str | None = field(
        "Dtype of exported OSFT weights when save_dtype is not set. Not set = the model's own.",
        _OSFT,
        "string",
        default=None,
        optional=True,
        choices=fixed(*DTYPES),
    )
    osft_adaptive_ratios: bool = field(
        "The paper's adaptive per-layer ratio: layer importance (how much each decoder block "
        "changes its input, measured on a few training batches) sets each block's ratio between "
        "osft_min_ratio (most important) and osft_max_ratio; the ratios are logged.",
        _OSFT,
        "boolean",
        default=False,
    )
    osft_min_ratio: float = field(
        "Adaptive ratios: the ratio of the most important block.",
        _OSFT,
        "float",
        at_least(0),
        at_most(1),
        default=0.1,
    )
    osft_max_ratio: float = field(
        "Adaptive ratios: the ratio of the least important block.",
        _OSFT,
        "float",
        at_least(0),
        at_most(1),
        default=0.5,
    )

    train_dtype: str = field(
        "Dtype of the trained (master) weights, their gradients and (unless "
        "optimizer_state_dtype is set) the optimizer state. "
        "On a GPU the forward and backward passes compute in bfloat16 (FSDP mixed precision); "
        "on a CPU in train_dtype itself, or in float32 where the CPU has no fast kernel for it "
        "(bfloat16 on x86 CPUs without AVX-512, float16 without AVX-512-FP16 or AMX: the run "
        "says so in a note).",
        _SPEED,
        "string",
        default="float32",
        choices=fixed(*DTYPES),
    )
    optimizer_state_dtype: str | None = field(
        "Precision of AdamW's two moments: 'float32' (8 bytes a parameter), 'bfloat16' (4), or "
        "'8bit' (about 2: blockwise-quantized as in 8-bit Adam, each block of 256 values of a "
        "matrix's rows with one float32 scale, fewer where a row is not a multiple of 256, the "
        "same blocks on any number of GPUs; 1-D tensors and tensors of fewer than 4096 values "
        "keep train_dtype's). Not set = train_dtype's, with "
        "PyTorch's (fused) AdamW; any other choice uses torchao's AdamW, which computes each "
        "step in float32 and stores the moments in this precision (the torchao extra: pip "
        "install 'mt-core[torchao]').",
        _SPEED,
        "string",
        default=None,
        optional=True,
        choices=fixed(*OPTIMIZER_STATE_DTYPES),
    )
    stochastic_rounding: bool = field(
        "With train_dtype = 'bfloat16': round each updated weight to bfloat16 up or down at "
        "random, with the odds that make its expected value the exact update, so updates "
        "smaller than half a bfloat16 step are not lost on average (plain rounding drops them: "
        "the weight does not move). Needs the torchao extra.",
        _SPEED,
        "boolean",
        default=False,
    )
    float8: str | None = field(
        "FP8 compute of the decoder blocks' large linear layers (torchao's float8 training; "
        "the torchao extra), on GPUs with FP8 tensor cores (compute capability 8.9 or more: "
        "Ada, Hopper, Blackwell). 'tensorwise' = one scale per tensor, the fastest (on several "
        "ranks FSDP2 gathers the weights in FP8); 'rowwise' = one scale per row, closer to "
        "bfloat16, slower than it on one H200 at 1B and 8B, so it converts only layers with "
        "both sides of 8192 or more. It pays where the matrix products are large (models of "
        "several billion parameters, thousands of tokens per minibatch); layers with a side "
        "under 2048 (tensorwise) or not a multiple of 16, the LM head, embeddings, routers and "
        "MoE experts compute in bfloat16 as without it, as do attention and the norms. Master "
        "weights, optimizer state, checkpoints and exports are unchanged. Not set = bfloat16 "
        "compute.",
        _SPEED,
        "string",
        default=None,
        optional=True,
        choices=fixed(*FLOAT8_RECIPES),
    )
    use_liger_kernels: bool | None = field(
        "Liger kernels: fused linear cross-entropy (logits are never materialised), RMSNorm, "
        "RoPE, SwiGLU where the architecture has them; with torch_compile only the fused loss "
        "(compilation fuses the rest). Not set = on when CUDA and liger-kernel are available.",
        _SPEED,
        "boolean",
        default=None,
        optional=True,
    )
    attn_backend: str = field(
        "Padding-free attention. 'auto' = on CUDA flash_attn_4 (flash-attn-4, on Hopper and "
        'Blackwell GPUs, when installed: pip install "mt-core[flash-attn-4]"), else flash_attn '
        "(flash-attn 2) when installed, else torch_varlen (PyTorch's varlen attention); sdpa "
        "(applied per document) elsewhere, and for models with attention sinks where "
        "flash_attn_4 cannot run.",
        _SPEED,
        "string",
        default="auto",
        choices=fixed(*ATTN_BACKENDS),
    )
    torch_compile: bool | None = field(
        "Compile each decoder block with torch.compile (regional compilation: one block's graph "
        "serves every layer, so compiling takes seconds, not minutes). Not set = on with CUDA.",
        _SPEED,
        "boolean",
        default=None,
        optional=True,
    )
    activation_checkpointing: bool = field(
        "Recompute each decoder block's activations during backward: much less memory, about "
        "a third more compute. It asks for the lean plan: no GPU memory is spent on speed "
        "(blocks are gathered again for their backward pass; OSFT's frozen copies wait in host "
        "memory unless osft_reference_on_host = false).",
        _SPEED,
        "boolean",
        default=False,
    )
    activation_memory_budget: float | None = field(
        "Compiled blocks: the share of their activations they may keep for the backward "
        "pass (torch's activation memory budget); below 1 the compiler recomputes the cheapest "
        "of the rest (between 1, nothing recomputed, and 0, about what "
        "activation_checkpointing keeps). From about 0.66 to 0.99 it keeps one set, about two "
        "thirds of what lies beyond each block's input (the norms' outputs and SwiGLU's "
        "product recomputed). Not set = on a GPU the largest budget with which "
        "max_tokens_per_gpu fits its memory by mt check's estimate (1 when it fits as it is).",
        _SPEED,
        "float",
        at_least(0),
        at_most(1),
        default=None,
        optional=True,
    )
    sync_gradients_every_minibatch: bool | None = field(
        "Reduce-scatter the gradients after every minibatch, so each GPU keeps only its shard "
        "of them; false = once per step, after the last minibatch: less communication, but "
        "every GPU holds the whole unsharded float32 gradient (4 bytes per parameter) between "
        "minibatches (on the GPU, also under cpu_offload). Not set = with cpu_offload, once a "
        "step where the GPU has room for that gradient by mt check's estimate (else FSDP2 adds "
        "each minibatch's gradients up in host memory, on the CPU: about 2.8x slower at 1B), "
        "else every minibatch; without it, every minibatch on more than one GPU or with "
        "train_dtype narrower than float32 (the float32 gradient would be twice its own), else "
        "once a step (one GPU, float32 weights: the two cost the same).",
        _SPEED,
        "boolean",
        default=None,
        optional=True,
    )
    cpu_offload: bool | None = field(
        "Keep the sharded weights, gradients and optimizer state in CPU memory (FSDP2 CPU "
        "offload), the optimizer step on the CPU: fits larger models, runs much slower. Not set "
        "= off, unless on a GPU the run fits only with it by mt check's estimate (after "
        "activation_memory_budget and activation_offload) and the node's available memory "
        "holds it; the run says so when it starts.",
        _SPEED,
        "boolean",
        default=None,
        optional=True,
    )
    activation_offload: bool | None = field(
        "Move the activations each decoder block saves for its backward pass to host memory "
        "while the other blocks run, copied on a side stream that overlaps the compute: the "
        "GPU holds those of about two blocks instead of all. Costs host memory and PCIe "
        "traffic (each block's saved activations go to the host and back every minibatch); "
        "slower where the copies outlast the compute. With activation_checkpointing only each "
        "block's input, all that checkpointing keeps, is moved. Not set = off, unless on a GPU "
        "max_tokens_per_gpu fits only with it by mt check's estimate.",
        _SPEED,
        "boolean",
        default=None,
        optional=True,
    )

    wandb_project: str | None = field(
        "Weights & Biases project. Set = log every step to wandb too (needs the wandb extra).",
        _LOGGING,
        "string",
        not_empty,
        default=None,
        optional=True,
    )
    wandb_run_name: str | None = field(
        "Weights & Biases run name.", _LOGGING, "string", default=None, optional=True
    )
    wandb_entity: str | None = field(
        "Weights & Biases entity (user or team).", _LOGGING, "string", default=None, optional=True
    )

    mlflow_tracking_uri: str | None = field(
        "MLflow tracking URI (a server, or a file-store folder such as file:///tmp/mlruns, "
        "which works offline). Set this or mlflow_experiment_name to log to MLflow (needs the "
        "mlflow extra).",
        _LOGGING,
        "string",
        not_empty,
        default=None,
        optional=True,
    )
    mlflow_experiment_name: str | None = field(
        "MLflow experiment.", _LOGGING, "string", not_empty, default=None, optional=True
    )
    mlflow_run_name: str | None = field(
        "MLflow run name.", _LOGGING, "string", default=None, optional=True
    )
    callbacks: list = field(
        'Trainer callbacks by import path, e.g. ["my_pkg.my_module:MyCallback"]: a '
        "mt_core.TrainerCallback subclass, built with no arguments in every process. A "
        "callback that raises is reported once per hook and never stops training.",
        _LOGGING,
        "array",
        import_paths,
        default=attrs.Factory(list),
    )

    pretraining: PretrainingConfig | None = attrs.field(
        default=None,
        validator=lambda instance, attribute, value: _check_pretraining(value),
        metadata={
            "help": "Continued pretraining; see [pretraining] below.",
            "group": PRETRAINING_GROUP,
        },
    )

    def __attrs_post_init__(self) -> None:
        problems = _CrossFieldProblems()
        _check_cross_fields(self, problems)
        if problems.keyed:
            raise KeyedConfigError(problems.keyed, problems.inapplicable)


def _check_pretraining(value: Any) -> None:
    if value is not None and not isinstance(value, PretrainingConfig):
        problem = f"expected a PretrainingConfig ([pretraining] table), got {shown(value)}"
        raise KeyedConfigError([("pretraining", problem)])


class _CrossFieldProblems:
    """Problems of key combinations, each with the key to point at (:class:`KeyedConfigError`)."""

    def __init__(self) -> None:
        self.keyed: list[tuple[str, str]] = []
        self.inapplicable: dict[str, tuple[str, ...]] = {}

    def add(self, key: str, message: str) -> None:
        self.keyed.append((key, message))

    def add_inapplicable(self, key: str, message: str, *causes: str) -> None:
        """``key`` is set, but ``causes`` (their values) make it not apply."""
        self.add(key, message)
        self.inapplicable[key] = causes


def _check_cross_fields(args: TrainingArgs, problems: _CrossFieldProblems) -> None:
    limits = {"step": "max_steps", "token": "max_tokens"}
    for mode, key in limits.items():
        if args.training_mode == mode and getattr(args, key) == 0:
            problems.add("training_mode", f"{mode!r} needs {key} > 0")
        if args.training_mode != mode and getattr(args, key) != 0:
            problems.add_inapplicable(
                key,
                f"applies only with training_mode = {mode!r} (it is {args.training_mode!r})",
                "training_mode",
            )
    if args.training_mode != "epoch" and args.max_epochs != 1:
        problems.add_inapplicable(
            "max_epochs",
            f"applies only with training_mode = 'epoch' (it is {args.training_mode!r})",
            "training_mode",
        )
    for key, message in scheduler_problems(args):
        problems.add(key, message)
    row = args.max_tokens_per_gpu * args.sequence_parallel_size
    if args.pretraining is not None and args.pretraining.block_size > row:
        parallel = f" x sequence_parallel_size = {args.sequence_parallel_size}"
        problems.add(
            "pretraining.block_size",
            f"{args.pretraining.block_size} is more than max_tokens_per_gpu = "
            f"{args.max_tokens_per_gpu}{parallel if args.sequence_parallel_size > 1 else ''}: "
            "a block would fit in no minibatch",
        )
    if args.resume_from_full_state_checkpoint is not None and args.resume not in ("auto",):
        problems.add(
            "resume_from_full_state_checkpoint", f"give either it or resume = {args.resume!r}"
        )
    if args.osft_min_ratio > args.osft_max_ratio:
        problems.add("osft_min_ratio", "must not be above osft_max_ratio")
    has_data = args.validation_split > 0 or args.validation_data_path is not None
    triggers = ("validation_frequency", "validate_at_epoch", "min_samples_per_validation",
                "validate_at_final")  # fmt: skip
    if args.validation_split > 0 and args.validation_data_path is not None:
        problems.add("validation_data_path", "give either it or validation_split, not both")
    if has_data and not any(getattr(args, key) for key in triggers):
        problems.add(
            "validation_frequency", "validation data needs a trigger: set validation_frequency "
            "(or validate_at_epoch, min_samples_per_validation, validate_at_final)",
        )  # fmt: skip
    if not has_data:
        for key in (*triggers, "save_best_val_loss"):
            if getattr(args, key):
                problems.add_inapplicable(
                    key,
                    "has no effect without validation_split or validation_data_path",
                    "validation_split",
                    "validation_data_path",
                )
    if args.mlflow_run_name is not None and not (
        args.mlflow_tracking_uri or args.mlflow_experiment_name
    ):
        problems.add_inapplicable(
            "mlflow_run_name",
            "has no effect without mlflow_tracking_uri",
            "mlflow_tracking_uri",
            "mlflow_experiment_name",
        )
    if args.stochastic_rounding and args.train_dtype != "bfloat16":
        problems.add_inapplicable(
            "stochastic_rounding",
            f"applies only with train_dtype = 'bfloat16' (it is {args.train_dtype!r}): it rounds "
            "the bfloat16 master weights",
            "train_dtype",
        )
    for key in ("wandb_run_name", "wandb_entity"):
        if getattr(args, key) is not None and args.wandb_project is None:
            problems.add_inapplicable(key, "has no effect without wandb_project", "wandb_project")
