"""What ``mt --help`` and ``mt COMMAND --help`` print (``mt run --help`` adds the run-file keys)."""

from __future__ import annotations

USAGE = """\
usage: mt run RUN.toml [--key=value ...]
       torchrun --nproc-per-node N --no-python mt run RUN.toml   (N processes, one per GPU)
"""

OTHER_USAGE = """\
       mt check RUN.toml [--nproc_per_node=N] [--nnodes=K] [--gpu=H100] [--key=value ...]
       mt data prepare IN.jsonl --tokenizer=PATH --out=OUT.jsonl [--max_len=N] [--truncate]
       mt data inspect DATA.jsonl [--max_tokens_per_gpu=N] [--png=FILE]
       mt plot RUN_DIR... [--out=plot.png]
       mt export CHECKPOINT --out=DIR [--dtype=bfloat16]
"""

COMMANDS_HELP = """\
commands:
  run      train as the TOML run file says; --key=value overrides a key of the file
  check    before a run, on any machine: validate the run file and data, estimate memory per
           GPU, steps and time; exit 0 when it fits, 1 when it does not (mt check --help)
  data     prepare: chat or text JSONL -> mt's token format; inspect: lengths and limits
  plot     loss, learning rate, grad norm, tokens/s and MFU of one or more runs, as a PNG
  export   a training-state checkpoint (checkpoints/step_N) -> a Hugging Face model folder
Each command has its own --help.
"""

CHECK_HELP = """\
usage: mt check RUN.toml [--nproc_per_node=N] [--nnodes=K] [--gpu=H100] [--mfu=0.4]
                [--batches=20] [--key=value ...]

Before a run, on any machine (no GPU, no weights: the model's config.json is enough): reads the
run file and validates the data exactly as `mt run` does (errors name path:line), then prints
  - the model's parameters (all, and trainable under OSFT),
  - memory per GPU: weights, gradients and optimizer state (sharded over the GPUs), bf16
    compute copies, activations at max_tokens_per_gpu with and without activation
    checkpointing, the loss, and the peak against the GPU's memory,
  - tokens and minibatches per optimizer step (the run's sampler and packer on the real
    lengths), samples dropped for length, steps per epoch and in all,
  - the step time and run time at the stated MFU,
and, when the run does not fit, what to change (max_tokens_per_gpu, activation_checkpointing,
activation_offload, cpu_offload, more GPUs), each with its own estimate.

options:
  --nproc_per_node=N   GPUs per node (default 1)
  --nnodes=K           nodes (default 1); the world size is N x K
  --gpu=NAME           H100 (80 GB), H200 (141 GB), A100 (80 GB), A100-40; default: this
                       machine's GPU when it has one, else H100
  --mfu=F              model FLOPs utilisation assumed for the time estimate (default 0.4)
  --batches=B          global batches drawn to measure tokens and minibatches (default 20)
  --key=value          overrides a run-file key, as with `mt run`

exit status: 0 the run fits, 1 it does not fit, 2 a mistake in the run file, data or options.
The validated data is cached in data_cache_dir (by default output_dir/data_cache), where
`mt run` finds it.
How the memory is estimated: docs/commands.md.
"""

DATA_HELP = """\
usage: mt data prepare IN.jsonl --tokenizer=PATH --out=OUT.jsonl [--max_len=N] [--truncate]
       mt data inspect DATA.jsonl [--max_tokens_per_gpu=N] [--png=FILE]

  prepare   turn chat ({"messages": [...]}) or text ({"text": ...}) lines into mt's token
            format; see mt data prepare --help
  inspect   samples, tokens, loss-counted share, length percentiles, samples over a token
            limit and a length histogram; see mt data inspect --help
"""

PREPARE_HELP = """\
usage: mt data prepare IN.jsonl --tokenizer=PATH --out=OUT.jsonl [--max_len=N]
                       [--truncate | --drop] [--chat_template=FILE] [--add_eos=true]
                       [--skip_bad_lines]

Each line of IN.jsonl is one of
  {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
      rendered with the tokenizer's chat template; written as
      {"input_ids": [...], "labels": [...], "len": N} with labels only on the assistant turns
      (their text and the end-of-turn tokens the template puts after them; -100 elsewhere)
  {"text": "..."}
      a pretraining document; written as {"input_ids": [...], "len": N} (the tokenizer's
      special tokens, e.g. BOS, and with --add_eos the EOS token after each document)
All lines of a file must be of one kind. Lines may carry other keys; they are ignored.

options:
  --tokenizer=PATH     a Hugging Face tokenizer folder (or a model folder that has one)
  --out=OUT.jsonl      written atomically: a temporary file renamed when complete
  --max_len=N          samples longer than N tokens are dropped (default), or cut to N with
                       --truncate (a cut chat sample left without assistant tokens is dropped)
  --chat_template=FILE a Jinja chat template to use instead of the tokenizer's own
  --add_eos=false      do not append EOS to text documents
  --skip_bad_lines     write the good lines and report the bad ones, instead of stopping

Bad lines are reported as path:line: what is wrong; without --skip_bad_lines nothing is written
and the exit status is 2.
"""

INSPECT_HELP = """\
usage: mt data inspect DATA.jsonl [--max_tokens_per_gpu=N] [--png=FILE]

DATA.jsonl in mt's token format (input_ids, with or without labels), validated as `mt run`
does. Prints samples, tokens, the loss-counted share, length percentiles and, with
--max_tokens_per_gpu, how many samples (and what share of the tokens) are longer than that limit
and would be dropped. --png writes a histogram of the lengths (needs the plot extra:
pip install 'mt[plot]').
"""

PLOT_HELP = """\
usage: mt plot RUN_DIR... [--out=plot.png]

Reads each RUN_DIR/metrics.jsonl and draws, against the optimizer step, the loss (validation
loss dashed), learning rate, gradient norm, tokens/s per GPU and MFU, one colour per run, into
one PNG (default plot.png). Needs matplotlib: pip install 'mt[plot]'.
"""

EXPORT_HELP = """\
usage: mt export CHECKPOINT --out=DIR [--dtype=bfloat16] [--model=PATH]

CHECKPOINT is a training-state checkpoint, OUTPUT_DIR/checkpoints/step_<N>, written by any
number of GPUs. mt export rebuilds the model from the run's resolved run file (OUTPUT_DIR/run.toml)
and its model's config.json, loads the checkpoint's weights into it on the CPU (one process, no
GPU, any original world size) and writes a Hugging Face folder at DIR: safetensors, config.json,
generation_config.json and the tokenizer files of the model. DIR appears complete or not at all.

options:
  --out=DIR            the folder to write (must not exist yet)
  --dtype=NAME         dtype of the saved weights: float32, bfloat16 or float16 (default: the
                       run's save_dtype, else the model's own dtype)
  --model=PATH         where the config and tokenizer are, if not at the run's
                       model_name_or_path (e.g. on another machine)
"""

COMMAND_HELP = {
    "check": CHECK_HELP,
    "data": DATA_HELP,
    "data prepare": PREPARE_HELP,
    "data inspect": INSPECT_HELP,
    "plot": PLOT_HELP,
    "export": EXPORT_HELP,
}


def usage_of(command: str) -> str:
    """The usage lines of ``command`` (the start of its help, up to the first blank line)."""
    if command == "run":
        return USAGE
    return COMMAND_HELP[command].split("\n\n")[0] + "\n"
