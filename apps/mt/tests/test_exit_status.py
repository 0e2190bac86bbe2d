"""``mt run`` and ``python -m mt_core run`` (what torchrun starts on each rank) end alike: exit
status 2 for a mistake a user can fix before the run, 1 for a run that started and stopped for a
stated reason (RunError: a NaN loss, a full disk), each with one ``mt: error:`` line."""

from __future__ import annotations

import pytest

import mt_core.__main__ as mt_core_main
import mt_core.trainer.loop as loop
from mt import cli
from mt_core import NonFiniteError
from mt_core.config import ConfigError


@pytest.mark.parametrize(
    ("raised", "status"),
    [(NonFiniteError("step 3: the loss is nan"), 1), (ConfigError(["seed: no good"]), 2)],
)
def test_both_entry_points_give_one_status_per_kind_of_error(
    raised, status, tmp_path, tiny_model, kit, monkeypatch, capsys
):
    data = kit.write_jsonl(tmp_path / "data.jsonl", kit.token_rows(8))
    run = kit.run_toml(tmp_path, tiny_model, data)

    def fails(args):
        raise raised

    monkeypatch.setattr(loop, "train", fails)
    assert mt_core_main.main(["run", str(run)]) == status
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", str(run)])
    assert exit_.value.code == status
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mt: error:")]
    assert len(lines) == 2 and lines[0] == lines[1], lines
