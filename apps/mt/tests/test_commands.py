"""Every command has its --help, and command-line mistakes are one `mt: error:` line, exit 2."""

import pytest

from mt import cli
from mt.help_text import COMMAND_HELP, usage_of


@pytest.mark.parametrize(
    ("argv", "start"),
    [
        (["check", "--help"], "usage: mt check RUN.toml"),
        (["check", "run.toml", "-h"], "usage: mt check RUN.toml"),
        (["data", "--help"], "usage: mt data prepare IN.jsonl"),
        (["data", "prepare", "--help"], "usage: mt data prepare IN.jsonl --tokenizer=PATH"),
        (["data", "inspect", "x.jsonl", "--help"], "usage: mt data inspect DATA.jsonl"),
        (["plot", "--help"], "usage: mt plot RUN_DIR..."),
        (["export", "--help"], "usage: mt export CHECKPOINT --out=DIR"),
    ],
)
def test_each_command_has_its_help(argv, start, capsys):
    cli.main(argv)
    out = capsys.readouterr().out
    assert out.startswith(start)
    assert out == COMMAND_HELP[" ".join(w for w in argv if not w.startswith("-") and "." not in w)]


def test_the_general_help_lists_every_command(capsys):
    cli.main(["--help"])
    out = capsys.readouterr().out
    for command in ("run", "check", "data", "plot", "export"):
        assert f"\n  {command}  " in out
    for command in ("check", "data prepare", "data inspect", "plot", "export"):
        assert f"       mt {command} " in out


@pytest.mark.parametrize(
    ("argv", "message", "usage"),
    [
        (["chek", "run.toml"], "unknown command 'chek'; did you mean 'check'?", None),
        (["check"], "check needs a run file", "check"),
        (["data"], "data needs a subcommand: prepare or inspect", "data"),
        (
            ["data", "prepair", "x.jsonl"],
            "unknown data subcommand 'prepair'; did you mean 'data prepare'?",
            "data",
        ),
        (["data", "prepare"], "data prepare needs an input JSONL file", "data prepare"),
        (["data", "inspect"], "data inspect needs a JSONL file", "data inspect"),
        (["export", "--out=x"], "export needs a checkpoint folder", "export"),
        (["export", "ckpt"], "export needs --out=DIR, the folder to write", None),
        (["data", "inspect", "missing.jsonl"], "missing.jsonl: no such file", None),
        (
            ["check", "run.toml", "extra"],
            "check: unexpected argument(s) extra; see mt check --help",
            None,
        ),
    ],
)
def test_mistakes_exit_2_with_one_line(argv, message, usage, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == f"mt: error: {message}"
    if usage:
        assert err.endswith(usage_of(usage))
