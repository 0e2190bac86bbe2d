"""OSFT under FSDP2: 2 gloo ranks (sharded weights, sharded OSFT state, SVDs spread over the ranks)
give the same weights as one process, and keep the invariant."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

from mt_osft import residual_bound

WORKER = Path(__file__).with_name("fsdp_worker.py")


def _worker_module():
    spec = importlib.util.spec_from_file_location("mt_osft_fsdp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_ranks_match_one_process(tmp_path):
    out, store = tmp_path / "rank0.pt", tmp_path / "store"
    ranks = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(rank), "2", str(store), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    for rank in ranks:
        _, stderr = rank.communicate(timeout=300)
        assert rank.returncode == 0, stderr[-3000:]
    got = torch.load(out, weights_only=True)
    assert got["sharded"] and got["same"]
    # the compiled projection on 2 ranks: the eager one's bits, and within float32 rounding of
    # one process. Both results are W0 + Π(d) rounded once, |W0| < 8 (standard normal entries)
    # and Π(d) of |d| ~ 0.01 differing only in the order of sums of <= 37 terms (~1e-7 at
    # most): at most 2 ulps of 8 apart
    ulps = 2 * torch.finfo(torch.float32).eps * 8
    assert set(got["compiled"]) == {"37x24", "24x37", "36x36"}
    for name, (same, gap) in got["compiled"].items():
        assert same and gap <= ulps, (name, gap)
    assert set(got["residuals"]) == {"0.up.weight", "0.down.weight", "1.up.weight"}

    worker = _worker_module()
    model = worker.build()
    w0 = {name: p.detach().clone() for name, p in model.named_parameters()}
    frozen_before = model[1].down.weight.detach().clone()
    state = worker.apply_osft(model, worker.CONFIG, ratios=worker.RATIOS)
    worker.train(model, state, *worker.data())
    expected = state.dense_state_dict(model)
    for name, pair in got["residuals"].items():  # own bases: the float64 rounding of W only
        n_frozen = state.targets[name].plan.n_frozen
        assert max(pair) < residual_bound(w0[name], got["dense"][name], n_frozen, None), name
    assert list(got["dense"]) == list(expected)
    # float64 sums in another order differ by γ_37 ≈ 4e-15 of the gradients (< 3 here); AdamW turns
    # a gradient difference δ into an update difference of at most lr δ / eps, every step.
    atol = worker.STEPS * worker.LR / worker.EPS * 37 * torch.finfo(torch.float64).eps / 2 * 3
    for name, value in expected.items():
        torch.testing.assert_close(got["dense"][name], value, atol=atol, rtol=0, msg=name)
    assert torch.equal(got["dense"]["1.down.weight"], frozen_before)  # ratio 0: bitwise frozen
    assert not torch.equal(expected["0.up.weight"], worker.build()[0].up.weight)  # it trained
