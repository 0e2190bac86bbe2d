"""mt data inspect: counts, percentiles and the limit, as a run would see the file; the
histogram is a real PNG."""

import importlib.util
import struct

import pytest

from mt import cli


def test_samples_lengths_and_the_limit(tmp_path, kit, capsys):
    rows = kit.token_rows(50, low=5, high=30, seed=3)
    rows.append({"input_ids": [1] * 100, "labels": [1] * 100})
    data = kit.write_jsonl(tmp_path / "data.jsonl", rows)
    cli.main(["data", "inspect", str(data), "--max_tokens_per_gpu=64"])
    out = capsys.readouterr().out
    lengths = sorted(len(r["input_ids"]) for r in rows)
    loss = sum(sum(1 for x in r["labels"][1:] if x != -100) for r in rows)
    assert out.startswith(f"{data}: 51 samples, {sum(lengths):,} tokens\n")
    assert f"  loss-counted tokens {loss:,} ({loss / sum(lengths):.1%})\n" in out
    assert f"min {lengths[0]}, " in out and f", max {lengths[-1]}\n" in out
    assert "over max_tokens_per_gpu = 64: 1 samples (1.96%), 100 tokens" in out
    assert "a run drops them" in out


def test_documents_without_labels(tmp_path, kit, capsys):
    rows = [{"input_ids": [1] * n} for n in (3, 50, 200)]
    data = kit.write_jsonl(tmp_path / "docs.jsonl", rows)
    cli.main(["data", "inspect", str(data), "--max_tokens_per_gpu=64"])
    out = capsys.readouterr().out
    assert out.startswith(f"{data}: 3 documents (no labels), 253 tokens\n")
    assert "pretraining cuts documents into blocks: nothing is dropped" in out


def test_bad_lines_name_path_and_line(tmp_path, kit, capsys):
    data = kit.write_jsonl(tmp_path / "data.jsonl", [{"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(SystemExit) as exit_:
        cli.main(["data", "inspect", str(data)])
    assert exit_.value.code == 2
    assert (
        f"mt: error: {data}:1: 'labels' has 1 entries but 'input_ids' has 2"
        in capsys.readouterr().err
    )


@pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None,
    reason="matplotlib is the plot extra; the workspace's dev environment should install it",
)
def test_the_histogram_is_a_png(tmp_path, kit):
    data = kit.write_jsonl(tmp_path / "data.jsonl", kit.token_rows(30))
    png = tmp_path / "lengths.png"
    cli.main(["data", "inspect", str(data), "--max_tokens_per_gpu=10", f"--png={png}"])
    raw = png.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    assert struct.unpack(">II", raw[16:24]) == (800, 450)
