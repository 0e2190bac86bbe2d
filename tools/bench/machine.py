"""What the GPU of this call measures, so that tables of different calls can be told apart: the
H100s the device tool lends differ by up to 4 points of MFU on the same run."""

from __future__ import annotations

from collections.abc import Callable

import torch

MATMUL = 8192  # bf16 n x n x n, the size shared/GPU.md measured (795 TFLOP/s on one H100)
COPY_BYTES = 2**31


def _seconds(work: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        work()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        work()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000 / repeats


def _matmul_flops(repeats: int) -> float:
    a, b = (torch.randn(MATMUL, MATMUL, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * MATMUL**3 / _seconds(lambda: a @ b, repeats)


def _copy_bytes(repeats: int) -> float:
    source = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    return 2 * COPY_BYTES / _seconds(lambda: target.copy_(source), repeats)  # read + written


def machine_speed(repeats: int = 20) -> dict:
    """The GPU's name, a large bf16 matmul in TFLOP/s and a device copy in GB/s."""
    speed = {"gpu": torch.cuda.get_device_name(), "matmul_tflops": _matmul_flops(repeats) / 1e12,
             "copy_gb_s": _copy_bytes(repeats) / 1e9}  # fmt: skip
    torch.cuda.empty_cache()
    return speed
