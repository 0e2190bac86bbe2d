"""tools/bench/float8_speed.py, the one command behind issue #29's FP8 speed figures: the two
contestants it asks throughput.py for differ only by the key float8, and its verdict follows
the ratio of their tokens/s (the GPU run itself is a benchmark, recorded in RESULTS.md)."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def tool(load_tool):
    return load_tool("tools/bench/float8_speed.py")


def test_the_contestants_differ_only_by_fp8(tool, tmp_path):
    fast = {"float8_config": {"gemm_config_grad_input": {"use_fast_accum": True}}}
    call = tool.command("llama-3.1-8b", tmp_path, {"fast grad_input": fast})
    assert call[call.index("--batch-size") + 1] == "32" and call[call.index("--steps") + 1] == "10"
    extra = json.loads(call[call.index("--extra") + 1])
    bf16, fp8 = extra.pop("mt bfloat16"), extra.pop("mt fp8 tensorwise")
    assert bf16["train_dtype"] == "bfloat16" and bf16["optimizer_state_dtype"] == "bfloat16"
    assert fp8 == {**bf16, "float8": "tensorwise"}
    assert extra == {"mt fp8 tensorwise fast grad_input": {**fp8, **fast}}


def _rows(bf16: float, fp8: float, **more: float) -> list[dict]:
    rows = [{"name": "mt bfloat16", "tokens_per_s": bf16},
            {"name": "mt fp8 tensorwise", "tokens_per_s": fp8}]  # fmt: skip
    return rows + [{"name": f"mt fp8 tensorwise {k}", "tokens_per_s": v} for k, v in more.items()]


def test_the_verdict_follows_each_shapes_target(tool):
    status, lines = tool.verdict("llama-3.1-8b", _rows(10_000, 12_010, fast=12_500))
    assert status == 0 and "1.201x" in lines[0] and "met" in lines[0]
    assert "1.250x" in lines[1] and "target" not in lines[1]  # a variant is shown, not judged
    status, lines = tool.verdict("llama-3.1-8b", _rows(10_000, 11_990, fast=12_500))
    assert status == 1 and "MISSED" in lines[0]  # the variant's 1.25x does not count
    assert tool.verdict("llama-3.2-3b", _rows(10_000, 11_500))[0] == 0
    assert tool.verdict("llama-3.2-1b", _rows(10_000, 10_000))[0] == 0  # equal is not slower
    assert tool.verdict("llama-3.2-1b", _rows(10_000, 9_999))[0] == 1
    failed = [
        {"name": "mt bfloat16", "tokens_per_s": 1.0},
        {"name": "mt fp8 tensorwise", "error": "CUDA out of memory"},
    ]
    assert tool.verdict("llama-3.1-8b", failed) == (
        2,
        ["llama-3.1-8b: no verdict: mt fp8 tensorwise did not finish"],
    )
    assert tool.verdict("llama-3.1-8b", [])[0] == 2  # the bench never wrote its rows
