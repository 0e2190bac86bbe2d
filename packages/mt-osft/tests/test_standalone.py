"""mt-osft needs torch only: no transformers import anywhere in its sources."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SOURCES = Path(__file__).resolve().parents[1] / "src" / "mt_osft"

BLOCKED = """
import sys
sys.modules["transformers"] = None  # any `import transformers` now raises ImportError
import torch
from torch import nn
import mt_osft, mt_osft.adaptive, mt_osft.apply, mt_osft.config, mt_osft.patterns, mt_osft.state
import mt_osft.subspace
net = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))
w0 = net[0].weight.detach().clone()
state = mt_osft.apply_osft(net, mt_osft.OSFTConfig(0.5, ["0", "2"]))
opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
net(torch.randn(3, 8)).sum().backward()
opt.step()
state.project_()
# against its own bases: what float32 storage of W allows (mt_osft.residual_bound says how)
k = state.targets["0.weight"].plan.n_frozen
bound = mt_osft.residual_bound(w0, net[0].weight, k, None)
assert max(state.residuals({"0.weight": w0})["0.weight"]) < bound
assert "transformers" not in {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}
print("ok")
"""


def test_imports_and_runs_with_transformers_blocked():
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_no_transformers_import_in_sources():
    for path in SOURCES.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] == "transformers" for n in names), path
