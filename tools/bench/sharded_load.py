"""Peak host memory per rank of mt's sharded load against the whole model (issue #4).

    uv run python tools/bench/sharded_load.py [--workdir DIR] [--worlds 1,2,4]
        [--file-dtypes float32,bfloat16]

Makes (once, cached in ``--workdir``) a random-init Llama of ~1 GB in float32 (246 M parameters),
saved with ``save_pretrained`` in several safetensors files, once per checkpoint dtype on disk
(float32, and bfloat16 as real HF checkpoints usually are). Then, for each world size N, launches
``torchrun --nproc-per-node N`` on this script's worker mode, which runs mt's real load path
(``mt_core.model.build.build_model`` on CPU/gloo into float32 master weights: meta-device construction,
FSDP2 sharding, ``to_empty``, the DCP ``HuggingFaceStorageReader``) and reports per rank how much
host memory the load added; afterwards it checks the loaded shards against the files. One more
process measures the mini_trainer-style reference: rank 0's ``from_pretrained`` of the whole model
in float32, then every tensor read, as its broadcast to the other ranks reads them.

Memory figures come from /proc/self/status, relative to a baseline taken just before the load
(after the imports, the process group and the config):

* VmHWM - VmRSS(baseline): exact peak of the whole resident set (anonymous + file-backed);
* RssAnon / RssFile: anonymous memory (allocations) and file-backed pages (the memory-mapped
  safetensors files) apart. The kernel keeps no high-water mark for them, so a thread samples
  them every ~2 ms during the load: a peak of the sampled figures, a lower bound of the truth.

The anonymous figure is the one that matters: file-backed pages of a mapped file are page cache,
shared between the ranks of a node and dropped by the kernel under pressure; they count toward a
process's RSS only while mapped and touched.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")
GB = 1e9


def proc_status() -> dict[str, int]:
    """The memory fields of /proc/self/status, in bytes."""
    values: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in _FIELDS:
                values[key] = int(rest.split()[0]) * 1024  # the kernel writes kB (KiB)
    return values


class Sampler:
    """Polls /proc/self/status in a thread and keeps the maximum of each field."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.peak = proc_status()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._update()
            time.sleep(self.interval_s)

    def _update(self) -> None:
        for key, value in proc_status().items():
            self.peak[key] = max(self.peak[key], value)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._update()


def measured(baseline: dict[str, int], sampler: Sampler, after: dict[str, int]) -> dict:
    """The increases over ``baseline`` (bytes): exact peak RSS, sampled peaks, state after."""
    if after["VmHWM"] > baseline["VmHWM"]:  # the high-water mark was set during the load
        peak_rss = after["VmHWM"] - baseline["VmRSS"]
    else:  # an earlier peak (the imports) still stands: fall back on the sampled maximum
        peak_rss = sampler.peak["VmRSS"] - baseline["VmRSS"]
    return {
        "peak_rss": peak_rss,
        "peak_anon": sampler.peak["RssAnon"] - baseline["RssAnon"],
        "peak_file": sampler.peak["RssFile"] - baseline["RssFile"],
        "resident_rss": after["VmRSS"] - baseline["VmRSS"],
        "resident_anon": after["RssAnon"] - baseline["RssAnon"],
        "resident_file": after["RssFile"] - baseline["RssFile"],
        "baseline_rss": baseline["VmRSS"],
    }


# ---------------------------------------------------------------------------------------------
# The model folder


def make_model(folder: Path, args: argparse.Namespace, dtype: str) -> None:
    """A random-init Llama saved as HF safetensors (in ``dtype``, several files), unless present.

    The same seed gives the same weights whatever the dtype (bfloat16 is float32 rounded)."""
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        intermediate_size=args.intermediate,
        vocab_size=args.vocab,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    temporary = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(temporary, safe_serialization=True, max_shard_size=args.max_shard_size)
    temporary.rename(folder)


def folder_facts(folder: Path) -> dict:
    """Bytes on disk, and the float32 size of the model and of its largest tensor (what mt's
    float32 master weights hold), from the safetensors headers."""
    from safetensors import safe_open

    on_disk = numel = largest = 0
    largest_name = ""
    files = sorted(folder.glob("*.safetensors"))
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                view = f.get_slice(name)
                count = 1
                for size in view.get_shape():
                    count *= size
                on_disk += count * _DTYPE_BYTES[view.get_dtype()]
                numel += count
                if count > largest:
                    largest, largest_name = count, name
    return {
        "on_disk": on_disk,
        "model": numel * 4,
        "largest": largest * 4,
        "largest_name": largest_name,
        "files": len(files),
    }


_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}


# ---------------------------------------------------------------------------------------------
# Worker modes (each in a fresh process)


def worker(folder: Path, out: Path) -> None:
    """One rank under torchrun: mt's load path, measured."""
    import torch
    import torch.distributed as dist
    import transformers.models.llama.modeling_llama  # noqa: F401  (imported before the baseline)
    from transformers import AutoConfig

    import mt_core.model.attention  # noqa: F401
    from mt_core.model.build import build_model
    from mt_fsdp import init_distributed, shutdown_distributed

    after_imports = proc_status()
    ctx = init_distributed("cpu")
    config = AutoConfig.from_pretrained(folder)
    dist.barrier()
    baseline = proc_status()
    start = time.perf_counter()
    with Sampler() as sampler:
        model, _ = build_model(
            folder,
            config,
            ctx,
            master_dtype=torch.float32,
            compute_dtype=torch.float32,
            attn_backend="sdpa",
        )
    seconds = time.perf_counter() - start
    after = proc_status()
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    result = measured(baseline, sampler, after)
    result.update(
        rank=ctx.rank,
        world=ctx.world_size,
        local_shard=sum(t.numel() * t.element_size() for t in local),
        load_s=seconds,
        imports_rss=after_imports["VmRSS"],
        process_group_rss=baseline["VmRSS"] - after_imports["VmRSS"],
        weights_ok=_weights_match(local, folder, ctx.rank),
    )
    out.write_text(json.dumps(result) + "\n")
    dist.barrier()
    shutdown_distributed()


def _weights_match(local: list, folder: Path, rank: int) -> bool:
    """After the measurement: the float64 sum of all local shards over all ranks equals the sum
    of every tensor in the files (a wrong or missing slice would change it)."""
    import torch
    import torch.distributed as dist
    from safetensors import safe_open

    with torch.no_grad():
        ours = torch.tensor([sum(float(t.double().sum()) for t in local)], dtype=torch.float64)
        dist.all_reduce(ours)
    expected = torch.zeros(1, dtype=torch.float64)
    if rank == 0:
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    expected += f.get_tensor(name).double().sum()
    dist.broadcast(expected, 0)
    return bool(torch.isclose(ours, expected, rtol=1e-9, atol=1e-6).item())


def reference(folder: Path, out: Path) -> None:
    """The whole model in one process, as mini_trainer's rank 0 loads it before broadcasting:
    ``AutoModelForCausalLM.from_pretrained`` in float32, then every tensor read (the broadcast
    reads them all). Two lines: after ``from_pretrained``, and after the read."""
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM

    baseline = proc_status()
    start = time.perf_counter()
    with Sampler() as sampler:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    loaded_s = time.perf_counter() - start
    first = measured(baseline, sampler, proc_status())
    params = list(model.parameters())
    size = sum(p.numel() * p.element_size() for p in params)
    first.update(stage="from_pretrained", local_shard=size, load_s=loaded_s)
    first["mapped_params"] = _mapped_fraction(params)
    with Sampler() as sampler, torch.no_grad():
        for p in params:
            p.sum()
    second = measured(baseline, sampler, proc_status())
    second.update(stage="+ every tensor read", local_shard=size)
    second["load_s"] = time.perf_counter() - start
    out.write_text(json.dumps([first, second]) + "\n")


def _mapped_fraction(params: list) -> float:
    """The share of parameters whose storage lies inside a mapping of a .safetensors file (that
    is, aliases the memory-mapped checkpoint instead of being a copy)."""
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(".safetensors"):
                low, high = line.split()[0].split("-")
                spans.append((int(low, 16), int(high, 16)))
    inside = sum(any(lo <= p.data_ptr() < hi for lo, hi in spans) for p in params)
    return inside / len(params)


# ---------------------------------------------------------------------------------------------
# Launcher


def run_world(world: int, folder: Path, workdir: Path, env: dict) -> list[dict]:
    prefix = workdir / f"result.{folder.name}.world{world}"
    for stale in workdir.glob(f"{prefix.name}.rank*.json"):
        stale.unlink()
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [
        str(torchrun),
        "--standalone",
        f"--nproc-per-node={world}",
        __file__,
        "--mode=worker",
        f"--folder={folder}",
        f"--out={prefix}",
    ]
    subprocess.run(command, env=env, check=True)
    rows = [json.loads(p.read_text()) for p in workdir.glob(f"{prefix.name}.rank*.json")]
    return sorted(rows, key=lambda row: row["rank"])


def run_reference(folder: Path, workdir: Path, env: dict) -> list[dict]:
    out = workdir / f"result.reference.{folder.name}.json"
    command = [sys.executable, __file__, "--mode=reference", f"--folder={folder}", f"--out={out}"]
    subprocess.run(command, env=env, check=True)
    return json.loads(out.read_text())


def table(rows: list[dict]) -> str:
    header = (
        "file dtype | world | rank | model GB | model/world + largest GB | local shard GB | "
        "peak RSS incr. GB | peak anon incr. GB | peak file GB | resident incr. GB | "
        "resident anon incr. GB | peak anon / target | peak RSS / target | load s"
    )
    lines = [header, " | ".join("---" for _ in header.split(" | "))]
    for row in rows:
        facts = row["facts"]
        reference = "stage" in row
        target = facts["model"] / row["world"] + facts["largest"]
        cells = [
            row["file_dtype"],
            f"ref: {row['stage']}" if reference else str(row["world"]),
            "-" if reference else str(row["rank"]),
            f"{facts['model'] / GB:.3f}",
            "-" if reference else f"{target / GB:.3f}",
            f"{row['local_shard'] / GB:.3f}",
            f"{row['peak_rss'] / GB:.3f}",
            f"{row['peak_anon'] / GB:.3f}",
            f"{row['peak_file'] / GB:.3f}",
            f"{row['resident_rss'] / GB:.3f}",
            f"{row['resident_anon'] / GB:.3f}",
            "-" if reference else f"{row['peak_anon'] / target:.2f}",
            "-" if reference else f"{row['peak_rss'] / target:.2f}",
            f"{row['load_s']:.1f}",
        ]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mt_bench_sharded_load"))
    parser.add_argument("--worlds", default="1,2,4", help="comma-separated world sizes")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--max-shard-size", default="400MB")
    parser.add_argument(
        "--file-dtypes",
        default="float32,bfloat16",
        help="dtypes of the checkpoint on disk (the model is always loaded into float32)",
    )
    parser.add_argument("--mode", choices=("bench", "worker", "reference"), default="bench")
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.mode == "worker":
        rank = int(os.environ.get("RANK", 0))
        worker(args.folder, args.out.with_name(f"{args.out.name}.rank{rank}.json"))
        return
    if args.mode == "reference":
        reference(args.folder, args.out)
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    shape = f"h{args.hidden}_l{args.layers}_a{args.heads}_kv{args.kv_heads}"
    shape += f"_i{args.intermediate}_v{args.vocab}_s{args.max_shard_size}"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    rows: list[dict] = []
    for dtype in args.file_dtypes.split(","):
        folder = args.workdir / f"llama_{shape}_{dtype}"
        start = time.perf_counter()
        make_model(folder, args, dtype)
        facts = folder_facts(folder)
        print(
            f"model folder {folder} ({time.perf_counter() - start:.1f} s): "
            f"{facts['on_disk'] / GB:.3f} GB of {dtype} in {facts['files']} safetensors files "
            f"({facts['model'] / GB:.3f} GB in float32), largest tensor "
            f"{facts['largest_name']} ({facts['largest'] / GB:.3f} GB in float32)",
            flush=True,
        )
        found = []
        for world in [int(w) for w in args.worlds.split(",")]:
            found += run_world(world, folder, args.workdir, env)
        found += run_reference(folder, args.workdir, env)
        for row in found:
            row.update(file_dtype=dtype, facts=facts, world=row.get("world", 1))
        rows += found

    import torch

    print(f"\ntorch {torch.__version__}, {os.cpu_count()} CPUs; GB = 1e9 bytes; target = "
          "model/world + largest tensor (float32 master weights)")  # fmt: skip
    print(table(rows))
    bad = [
        f"{r['file_dtype']} world {r['world']} rank {r['rank']}"
        for r in rows
        if r.get("weights_ok") is False
    ]
    print(
        "weights check (float64 sum of all ranks' shards = sum of the files):",
        "FAILED " + ", ".join(bad) if bad else "ok",
    )
    for row in rows:
        if "stage" in row:
            if "mapped_params" in row:
                print(
                    f"  reference, {row['file_dtype']} file: "
                    f"{row['mapped_params']:.0%} of the parameters alias the memory-mapped "
                    "safetensors files after from_pretrained"
                )
        elif row["rank"] == 0:
            print(
                f"  {row['file_dtype']} world {row['world']} rank 0: baseline RSS "
                f"{row['baseline_rss'] / GB:.3f} GB (process group "
                f"{row['process_group_rss'] / GB:.3f} GB of it), file pages still resident "
                f"after the load {row['resident_file'] / GB:.3f} GB"
            )


if __name__ == "__main__":
    main()
