"""Issue #9 on one 2-GPU machine: parity, scaling, the 8B shape and a profiled step, all through
``mt run`` under torchrun.

On a 2-GPU machine (see shared/GPU.md), from the repository root (~8 minutes on 2 H100s, estimated):

    python3 tools/gpu/multi_gpu.py --out $OUT [--work /tmp/mt_multi_gpu] [--parts parity,scaling,large]
    python3 tools/gpu/multi_gpu.py --device cpu --shape tiny --out /tmp/mg    # CPU dry run, gloo

Every run is ``python -m torch.distributed.run --standalone --nproc-per-node N -m mt run RUN.toml``:
the command of the README with the app run as a module (the GPU machine has no ``mt`` script),
on a run file written here (kept beside the logs). Models are random-init at the real shapes and
data synthetic (tools/random_model.py), both under ``--work`` (tens of GB: not under ``--out``).

* parity: the 1B shape, the same global batch (64 samples of the SFT mix) on 1 and on 2 GPUs,
  20 steps: loss per step and step 1's gradient norm from each run's metrics.jsonl;
* scaling: tokens/s per GPU on 2 GPUs against 1 GPU at the same global batch (mt's batch_size is
  global: adding GPUs is meant to speed up the same training), 1B (the parity runs) and 3B;
* large: examples/llama-3.1-8b-2gpu.toml on 2 GPUs, on documents of 8,192 tokens that fill every
  row (max_tokens_per_gpu 16,384, then 8,192 if that does not fit): tokens/s per GPU, MFU, peak
  GPU memory, and each rank's peak host memory up to the end of the sharded load;
* long (issue #17): sequence parallelism. The 1B shape on samples of 32,768 tokens, whole on 1
  GPU and split over 2 (sequence_parallel_size 2, 16,384 tokens per GPU), the same batches: loss
  parity; then the 8B shape on samples of 131,072 tokens over 2 GPUs (65,536 each): tokens/s per
  GPU, MFU and peak memory, next to torchtitan's 8B with context parallelism (1,071 tokens/s per
  GPU on 8 H100s);
* every 2-GPU run profiles its optimizer step 3 on rank 0: GPU time in compute kernels and in
  NCCL kernels, and how much of the NCCL time runs under compute.

Two callbacks named in the run files (``multi_gpu:RankProbe``, ``multi_gpu:StepProfile``; this
folder is put on the runs' PYTHONPATH) measure inside the runs without touching the train loop.
The last thing printed is one table; results.json holds every figure, logs/ every run's output.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mt_core import TrainerCallback, TrainingArgs, args_from_dict, load_run_file, write_run_file

TOOLS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TOOLS), str(TOOLS / "bench")]  # the shared model maker, /proc reader
from random_model import SHAPES, make_sft_data  # noqa: E402
from sharded_load import proc_status  # noqa: E402

EXAMPLE = TOOLS.parent / "examples" / "llama-3.1-8b-2gpu.toml"
GIB = 2**30
PROFILE_STEP = 3  # profiled on 2 GPUs; step 2 is the profiler's warm-up
FIRST_TIMED_STEP = PROFILE_STEP + 1  # throughput: median of the steps after the profiled one
# Tolerances of the parity check, bf16 compute (8-bit mantissa: one rounding is ~4e-3). The loss
# is a float32 sum over ~38k tokens and the gradient norm over 1.2 B float32 gradients, so
# packing and reduction order on 2 GPUs may move them far less than one bf16 rounding.
LOSS_RTOL = 1e-3
GRAD_NORM_RTOL = 5e-3
EFFICIENCY_GOAL = 0.90
MFU_GOAL = 0.40
H100_MEASURED_PEAK = 795e12  # bf16 8192^3 matmul on the GPU machine (shared/GPU.md)
DATASHEET_PEAK = 989e12
# torchtitan's Llama 3.1 8B, context parallelism, compile and Float8 on 8 H100s, 131,072 tokens
TORCHTITAN_CP_TOKENS_PER_GPU = 1071


# ---------------------------------------------------------------------------------------------
# Callbacks, built by mt in every rank of a run (they read their folder from the environment)


class RankProbe(TrainerCallback):
    """Each rank's memory: host memory once the model is loaded, peak GPU memory at the end.

    At on_train_begin the sharded load is done and no step has run, so VmHWM (the kernel's exact
    high-water mark of the resident set) is the rank's peak host memory of start-up and load."""

    def __init__(self) -> None:
        self.folder = Path(os.environ["MT_PROBE_DIR"])
        self.host: dict[str, int] = {}

    def on_train_begin(self, **info: Any) -> None:
        self.host = proc_status()

    def on_train_end(self, rank: int, **info: Any) -> None:
        gpu_peak = None
        if torch.cuda.is_available():  # this thread's current device is 0: name the rank's
            device = int(os.environ.get("LOCAL_RANK", 0))
            gpu_peak = torch.cuda.max_memory_allocated(device) / GIB
        record = {key: value / GIB for key, value in self.host.items()}
        record["gpu_peak_gib"] = gpu_peak
        (self.folder / f"rank{rank}.json").write_text(json.dumps(record))


class StepProfile(TrainerCallback):
    """Rank 0 of a multi-GPU run: a torch.profiler trace of optimizer step PROFILE_STEP.

    Hooks reach a callback on a thread of its own, a little after the loop passes them. So the
    profiler is set up here, on the main thread as Kineto wants it (the slow CUPTI start included),
    warms up through the first steps, switches recording on at the end of the step before the
    profiled one (where the trainer has just synchronised the GPU) and off at the end of the
    profiled one; kernels later than the profiled step's measured time are left out."""

    def __init__(self) -> None:
        self.folder = Path(os.environ["MT_PROBE_DIR"])
        self.step_time_s = 0.0
        self.profiler: torch.profiler.profile | None = None
        if os.environ.get("RANK") != "0" or int(os.environ.get("WORLD_SIZE", 1)) < 2:
            return
        if torch.cuda.is_available():  # CUPTI records every kernel of the process
            options: dict[str, Any] = {"activities": [torch.profiler.ProfilerActivity.CUDA]}
        else:  # CPU ops are recorded on the starting thread only, unless asked for all
            options = {
                "activities": [torch.profiler.ProfilerActivity.CPU],
                "experimental_config": torch.profiler._ExperimentalConfig(profile_all_threads=True),
            }
        self.profiler = torch.profiler.profile(
            schedule=torch.profiler.schedule(wait=0, warmup=PROFILE_STEP - 1, active=1, repeat=1),
            on_trace_ready=self._save,
            **options,
        )
        self.profiler.start()

    def on_log(self, step: int, record: dict, **info: Any) -> None:
        if step == PROFILE_STEP:
            self.step_time_s = record["step_time_s"]

    def on_step_end(self, step: int, **info: Any) -> None:
        if self.profiler is None or step > PROFILE_STEP:
            return
        self.profiler.step()  # after step PROFILE_STEP - 1: record; after PROFILE_STEP: save
        if step == PROFILE_STEP:
            self.profiler.stop()
            self.profiler = None

    def _save(self, profiler: torch.profiler.profile) -> None:
        trace = self.folder / f"trace_step{PROFILE_STEP}.json"
        profiler.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
        summary = summarize_trace(events, self.step_time_s)
        (self.folder / "profile.json").write_text(json.dumps(summary))
        with trace.open("rb") as raw, gzip.open(f"{trace}.gz", "wb") as packed:
            shutil.copyfileobj(raw, packed)
        trace.unlink()


# ---------------------------------------------------------------------------------------------
# The trace summary: compute vs communication on the GPU's timeline

# On CPU (the dry run) there are no kernels: matmul ops stand for compute, c10d ops for the
# collectives; the figures then only show that the code path works.
_CPU_COMPUTE = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def _is_comm(name: str) -> bool:
    lowered = name.lower()
    return "nccl" in lowered or "c10d" in lowered or "gloo" in lowered


def _merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of intervals as sorted, disjoint intervals."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in intervals)


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Length of the intersection of two merged interval lists."""
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def summarize_trace(events: list[dict], step_time_s: float) -> dict:
    """Busy time of compute and of communication kernels (any stream: the union of their
    intervals), their overlap, and the exposed communication, in seconds, over one step."""
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") == "kernel"]
    if kernels:
        comm = [e for e in kernels if _is_comm(e["name"])]
        compute = [e for e in kernels if not _is_comm(e["name"])]
    else:
        ops = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"]
        comm = [e for e in ops if _is_comm(e["name"])]
        compute = [e for e in ops if e["name"] in _CPU_COMPUTE]
    start = min((e["ts"] for e in comm + compute), default=0.0)
    end = start + step_time_s * 1e6  # trace times are in microseconds
    comm = [e for e in comm if start <= e["ts"] < end]
    compute = [e for e in compute if start <= e["ts"] < end]

    def busy(chosen: list[dict]) -> list[tuple[float, float]]:
        return _merged([(e["ts"], min(e["ts"] + e["dur"], end)) for e in chosen])

    compute_busy, comm_busy = busy(compute), busy(comm)
    overlap = _overlap(compute_busy, comm_busy)
    return {
        "step": PROFILE_STEP,
        "step_time_s": step_time_s,
        "compute_s": _length(compute_busy) / 1e6,
        "comm_s": _length(comm_busy) / 1e6,
        "overlap_s": overlap / 1e6,
        "exposed_comm_s": (_length(comm_busy) - overlap) / 1e6,
        "compute_events": len(compute),
        "comm_events": len(comm),
        "comm_names": sorted({e["name"].split("(")[0] for e in comm})[:8],
    }


# ---------------------------------------------------------------------------------------------
# Runs


@dataclass(frozen=True)
class Setting:
    """Shapes and sizes of one invocation (the real ones on GPU, small ones for a CPU dry run)."""

    parity_shape: str
    scaling_shape: str
    large_shape: str
    max_tokens: int  # per GPU, parity and scaling runs
    large_max_tokens: tuple[int, ...]  # tried in turn until one fits
    document: int  # tokens per sample of the large run's data
    long_parity_document: int  # sequence parallelism: tokens per sample of the parity runs
    long_document: int  # and of the large shape's long-sample run
    batch: int = 64  # samples per step, parity and scaling
    parity_steps: int = 20
    scaling_steps: int = 10
    large_steps: int = 8


def setting(device: str, shape: str | None) -> Setting:
    if device == "cpu":
        tiny = shape or "tiny"
        return Setting(tiny, tiny, tiny, 1024, (1024, 512), 512, 512, 1024)
    return Setting(
        shape or "llama-3.2-1b", shape or "llama-3.2-3b", shape or "llama-3.1-8b",
        16384, (16384, 8192), 8192, 32768, 131072,
    )  # fmt: skip


class Runner:
    """Writes run files, launches torchrun on them, and reads back what the runs measured."""

    def __init__(self, out: Path, work: Path, device: str) -> None:
        self.out, self.work, self.device = out, work, device
        (out / "logs").mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, MT_PLAIN_PROGRESS="1", TOKENIZERS_PARALLELISM="false")
        self.env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")])
        )
        if device == "cpu":  # gloo; two processes share this machine's cores
            self.env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")

    def model(self, shape: str) -> Path:
        """A random-init folder of ``shape``, made once per --work (~1 min at 8B) by
        tools/random_model.py in a process of its own: this one must not keep a CUDA context
        on GPU 0 while the runs need all of its memory."""
        folder = self.work / f"model-{shape}"
        if not folder.is_dir():
            partial = self.work / f".model-{shape}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            command = [sys.executable, str(TOOLS / "random_model.py"), "--shape", shape,
                       "--out", str(partial), "--device", self.device]  # fmt: skip
            subprocess.run(command, check=True, env=self.env)
            partial.rename(folder)
        return folder

    def data(self, name: str, shape: str, samples: int, max_len: int, fixed_len: int | None = None) -> Path:  # fmt: skip
        path = self.work / f"{name}.jsonl"
        vocab = SHAPES[shape][1]["vocab_size"]
        # the mix's mean length, scaled down with rows shorter than 8k (CPU dry runs)
        make_sft_data(
            path, samples, vocab, max_len, mean=min(600, max_len // 4), fixed_len=fixed_len
        )
        return path

    def run(self, name: str, args: TrainingArgs, nproc: int) -> dict:
        """``mt run`` of ``args`` on ``nproc`` processes; its metrics and per-rank probes."""
        output_dir = Path(args.output_dir)
        probes = self.out / name
        for folder in (output_dir, probes):  # a fresh run: no old metrics, lock or checkpoint
            shutil.rmtree(folder, ignore_errors=True)
        probes.mkdir(parents=True)
        run_file = self.out / "logs" / f"{name}.toml"
        write_run_file(args, run_file)
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", "mt", "run", str(run_file),
        ]  # fmt: skip
        log = self.out / "logs" / f"{name}.log"
        print(f"== {name}: {' '.join(command[1:])}", flush=True)
        with log.open("w") as stream:
            code = subprocess.run(
                command, stdout=stream, stderr=subprocess.STDOUT,
                env=dict(self.env, MT_PROBE_DIR=str(probes)),
            ).returncode  # fmt: skip
        if code != 0:
            last = [line for line in log.read_text().splitlines() if line.strip()][-3:]
            raise RuntimeError(f"{name}: exit status {code} ({log}): {' | '.join(last)}")
        lines = [json.loads(x) for x in (output_dir / "metrics.jsonl").read_text().splitlines()]
        timed = lines[FIRST_TIMED_STEP - 1 :] or lines
        ranks = [json.loads((probes / f"rank{r}.json").read_text()) for r in range(nproc)]
        profile = probes / "profile.json"
        return {
            "name": name,
            "gpus": nproc,
            "max_tokens_per_gpu": args.max_tokens_per_gpu,
            "batch_size": args.batch_size,
            "losses": [x["loss"] for x in lines],
            "grad_norm_1": lines[0]["grad_norm"],
            "tokens_per_s_per_gpu": statistics.median(x["tokens_per_s_per_gpu"] for x in timed),
            "mfu": statistics.median(x["mfu"] for x in timed) if timed[0]["mfu"] else None,
            "minibatches": statistics.mean(x["num_minibatches"] for x in lines),
            "tokens_per_step": statistics.mean(x["tokens"] for x in lines),
            "ranks": ranks,
            "profile": json.loads(profile.read_text()) if profile.is_file() else None,
        }


def run_keys(runner: Runner, name: str, model: Path, data: Path, **keys: Any) -> dict:
    """What every run here shares: a fixed number of steps, constant LR, no exports."""
    return dict(
        model_name_or_path=str(model), data_path=str(data), output_dir=str(runner.work / name),
        training_mode="step", learning_rate=1e-5, lr_scheduler="constant", num_warmup_steps=0,
        seed=1, save_final_checkpoint=False, resume="off",
        callbacks=["multi_gpu:RankProbe", "multi_gpu:StepProfile"], **keys,
    )  # fmt: skip


def pair(runner: Runner, role: str, shape: str, s: Setting, steps: int, ac: bool) -> list[dict]:
    """The same run on 1 and on 2 GPUs (same data, batch, seed)."""
    model = runner.model(shape)
    data = runner.data(f"data-{shape}", shape, 1024, min(8192, s.max_tokens))
    results = []
    for gpus in (1, 2):
        name = f"{role}-{shape}-{gpus}gpu"
        keys = run_keys(runner, name, model, data, batch_size=s.batch, max_steps=steps,
                        max_tokens_per_gpu=s.max_tokens, activation_checkpointing=ac)  # fmt: skip
        results.append({**runner.run(name, args_from_dict(keys), gpus), "shape": shape})
    return results


def large(runner: Runner, s: Setting) -> dict:
    """The 8B example on 2 GPUs; the first of ``large_max_tokens`` that fits."""
    model = runner.model(s.large_shape)
    data = runner.data(f"data-{s.large_shape}-fixed{s.document}", s.large_shape,
                       4 * s.large_steps, s.document, fixed_len=s.document)  # fmt: skip
    failures = []
    for max_tokens in s.large_max_tokens:
        name = f"large-{s.large_shape}-2gpu-{max_tokens}"
        keys = run_keys(runner, name, model, data, max_steps=s.large_steps,
                        max_tokens_per_gpu=max_tokens, batch_size=2 * max_tokens // s.document)  # fmt: skip
        # the example's own settings (activation checkpointing, attention, ...) stay; it
        # trains by epochs, these runs by steps
        args = load_run_file(EXAMPLE, {**keys, "max_epochs": None})
        try:
            return {**runner.run(name, args, 2), "shape": s.large_shape, "failed_first": failures}
        except RuntimeError as error:  # most likely out of memory: try the smaller row
            print(error, flush=True)
            failures.append(str(error))
    raise RuntimeError("; ".join(failures))


# ---------------------------------------------------------------------------------------------
# The table


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def parity_rows(one: dict, two: dict) -> list[list[str]]:
    diffs = [abs(a - b) / abs(a) for a, b in zip(one["losses"], two["losses"], strict=True)]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    g1, g2 = one["grad_norm_1"], two["grad_norm_1"]
    g_diff = abs(g1 - g2) / abs(g1)
    return [
        [f"parity {one['shape']}: loss, {len(diffs)} steps",
         f"max rel. diff {diffs[worst]:.1e} at step {worst + 1} (1 GPU {one['losses'][worst]:.5f}, "
         f"2 GPUs {two['losses'][worst]:.5f}); step 1 {one['losses'][0]:.5f} / {two['losses'][0]:.5f}",
         f"<= {LOSS_RTOL:.0e}", "ok" if diffs[worst] <= LOSS_RTOL else "FAIL"],
        ["parity: step-1 grad_norm", f"1 GPU {g1:.6g}, 2 GPUs {g2:.6g}, rel. diff {g_diff:.1e}",
         f"<= {GRAD_NORM_RTOL:.0e}", "ok" if g_diff <= GRAD_NORM_RTOL else "FAIL"],
    ]  # fmt: skip


def scaling_row(one: dict, two: dict) -> list[str]:
    efficiency = two["tokens_per_s_per_gpu"] / one["tokens_per_s_per_gpu"]
    return [
        f"scaling {one['shape']}: tokens/s per GPU",
        f"1 GPU {one['tokens_per_s_per_gpu']:,.0f} (MFU {_pct(one['mfu'])}, "
        f"{one['minibatches']:.1f} minibatches/step), 2 GPUs {two['tokens_per_s_per_gpu']:,.0f} "
        f"(MFU {_pct(two['mfu'])}, {two['minibatches']:.1f}): efficiency {efficiency:.1%}",
        f">= {EFFICIENCY_GOAL:.0%}", "ok" if efficiency >= EFFICIENCY_GOAL else "below",
    ]  # fmt: skip


def large_rows(result: dict, model_bytes: int) -> list[list[str]]:
    mfu = result["mfu"]
    gpu_peaks = ", ".join(f"{r['gpu_peak_gib']:.1f}" for r in result["ranks"] if r["gpu_peak_gib"])
    host = ", ".join(f"rank {i} {r['VmHWM']:.1f} GiB" for i, r in enumerate(result["ranks"]))
    anon = ", ".join(f"{r['RssAnon']:.1f}" for r in result["ranks"])
    largest_host = max(r["VmHWM"] for r in result["ranks"]) * GIB
    verdict = "ok" if largest_host < model_bytes else "FAIL"
    if model_bytes < 4 * GIB:  # start-up alone (imports, CUDA context) takes ~1-2 GiB
        verdict = "-"
    failed = len(result["failed_first"])
    tried = f" ({failed} larger row(s) failed first)" if failed else ""
    return [
        [f"{result['name']}: max_tokens_per_gpu {result['max_tokens_per_gpu']:,}{tried}",
         f"{result['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU, MFU {_pct(mfu)} of 989 "
         f"({_pct(mfu and mfu * DATASHEET_PEAK / H100_MEASURED_PEAK)} of 795); "
         f"peak GPU GiB per rank {gpu_peaks or '-'}", f"MFU >= {MFU_GOAL:.0%}",
         "-" if mfu is None else ("ok" if mfu >= MFU_GOAL else "below")],
        ["peak host memory per rank, start-up and sharded load",
         f"peak RSS (VmHWM) {host}; anonymous then {anon} GiB; checkpoint "
         f"{model_bytes / GIB:.1f} GiB", "< the checkpoint", verdict],
    ]  # fmt: skip


def profile_row(result: dict) -> list[str]:
    p = result["profile"]
    if p is None:
        return [f"profile {result['name']}", "no trace written (see its log)", "", "FAIL"]
    share = p["overlap_s"] / p["comm_s"] if p["comm_s"] else 0.0
    return [
        f"profile {result['name']}, step {p['step']}",
        f"step {p['step_time_s']:.3f} s: compute {p['compute_s']:.3f} s, communication "
        f"{p['comm_s']:.3f} s ({p['comm_events']} events), {share:.0%} of it under compute, "
        f"exposed {p['exposed_comm_s']:.3f} s = {p['exposed_comm_s'] / p['step_time_s']:.1%} "
        "of the step", "", "",
    ]  # fmt: skip


def parity_part(runner: Runner, s: Setting) -> tuple[list[dict], list[list[str]]]:
    results = pair(runner, "parity", s.parity_shape, s, s.parity_steps, ac=False)
    return results, [*parity_rows(*results), scaling_row(*results), profile_row(results[1])]


def scaling_part(runner: Runner, s: Setting) -> tuple[list[dict], list[list[str]]]:
    results = pair(runner, "scaling", s.scaling_shape, s, s.scaling_steps, ac=True)
    return results, [scaling_row(*results), profile_row(results[1])]


def large_part(runner: Runner, s: Setting) -> tuple[dict, list[list[str]]]:
    result = large(runner, s)
    files = runner.model(s.large_shape).glob("*.safetensors")
    size = sum(f.stat().st_size for f in files)
    return result, [*large_rows(result, size), profile_row(result)]


def long_part(runner: Runner, s: Setting) -> tuple[list[dict], list[list[str]]]:
    """Sequence parallelism (issue #17): samples twice as long as one GPU's row. Parity: the
    parity shape on samples of ``long_parity_document`` tokens, whole on 1 GPU and split over 2
    GPUs (sequence_parallel_size 2, half the row each), the same batches. Then the large shape
    on samples of ``long_document`` tokens over 2 GPUs: tokens/s per GPU, MFU, peak memory."""
    results = []
    length = s.long_parity_document
    model = runner.model(s.parity_shape)
    data = runner.data(f"data-{s.parity_shape}-fixed{length}", s.parity_shape, 64, length,
                       fixed_len=length)  # fmt: skip
    for gpus in (1, 2):
        name = f"long-{s.parity_shape}-{gpus}gpu-{length}"
        keys = run_keys(runner, name, model, data, batch_size=2, max_steps=s.parity_steps,
                        max_tokens_per_gpu=length // gpus, sequence_parallel_size=gpus)  # fmt: skip
        results.append({**runner.run(name, args_from_dict(keys), gpus), "shape": s.parity_shape})
    rows = [*parity_rows(*results), profile_row(results[1])]
    length = s.long_document
    model = runner.model(s.large_shape)
    data = runner.data(f"data-{s.large_shape}-fixed{length}", s.large_shape, 4 * s.large_steps,
                       length, fixed_len=length)  # fmt: skip
    name = f"long-{s.large_shape}-2gpu-{length}"
    keys = run_keys(runner, name, model, data, batch_size=2, max_steps=s.large_steps,
                    max_tokens_per_gpu=length // 2, sequence_parallel_size=2)  # fmt: skip
    result = {**runner.run(name, args_from_dict(keys), 2), "shape": s.large_shape}
    results.append(result)
    peaks = ", ".join(f"{r['gpu_peak_gib']:.1f}" for r in result["ranks"] if r["gpu_peak_gib"])
    rows += [
        [f"{name}: sequence_parallel_size 2",
         f"{result['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU, MFU {_pct(result['mfu'])} of "
         f"989; peak GPU GiB per rank {peaks or '-'}",
         f"torchtitan 8B CP: {TORCHTITAN_CP_TOKENS_PER_GPU:,} tokens/s per GPU", ""],
        profile_row(result),
    ]  # fmt: skip
    return results, rows


PARTS = {"parity": parity_part, "scaling": scaling_part, "large": large_part, "long": long_part}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="logs, run files, results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/mt_multi_gpu"),
                        help="model folders, data and run outputs (large)")  # fmt: skip
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--shape", choices=sorted(SHAPES), help="one shape for every part")
    parser.add_argument("--parts", default=",".join(PARTS), help="a comma-separated subset")
    options = parser.parse_args()
    s = setting(options.device, options.shape)
    runner = Runner(options.out, options.work, options.device)
    if options.device == "cuda":
        # nvidia-smi, not torch: this process must not open a CUDA context on GPU 0
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv"],
                              capture_output=True, text=True).stdout  # fmt: skip
        print(gpus, flush=True)
        if len(gpus.strip().splitlines()) < 3:
            print("needs 2 GPUs (or --device cpu for a dry run)", file=sys.stderr)
            return 2

    rows: list[list[str]] = []
    results: dict[str, Any] = {"setting": s.__dict__}
    for part in options.parts.split(","):
        try:
            results[part], part_rows = PARTS[part](runner, s)
        except Exception as error:  # report it and go on with the other parts
            print(f"{part} failed: {error!r}", flush=True)
            results[part] = {"error": repr(error)}
            part_rows = [[part, f"FAILED: {str(error)[:300]}", "", "FAIL"]]
        rows += part_rows
    (options.out / "results.json").write_text(json.dumps(results, indent=1))

    print(f"\n{options.device}, torch {torch.__version__}; throughput = median of steps "
          f"{FIRST_TIMED_STEP}.. of mt's metrics.jsonl; MFU of the 989 TFLOP/s bf16 datasheet peak")  # fmt: skip
    print("what | measured | goal | verdict")
    print("--- | --- | --- | ---")
    for row in rows:
        print(" | ".join(row))
    return 1 if any(row[3] == "FAIL" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
