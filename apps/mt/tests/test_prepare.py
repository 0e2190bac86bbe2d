"""mt data prepare: chat -> labels on assistant turns only, text -> documents, limits, bad lines."""

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from mt import cli
from mt.errors import CommandError
from mt.prepare import prepare
from mt_data import DataError, open_token_store

CHAT = [
    {"role": "user", "content": "hello how are you"},
    {"role": "assistant", "content": "i am fine thank you"},
    {"role": "user", "content": "what is two plus two"},
    {"role": "assistant", "content": "it is four"},
]


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def learnt_tokens(tokenizer, row):
    """The tokens with labels, as text, turn by turn (runs of labelled positions)."""
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"], strict=True):
        if label != -100:
            assert label == token  # a label is the token itself (the trainer shifts)
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


@pytest.mark.parametrize("template", ["prefix diff", "generation markers"])
def test_only_assistant_turns_and_their_end_of_turn_are_learnt(
    kit, tmp_path, tokenizer_dir, template
):
    folder = tokenizer_dir
    if template == "generation markers":
        folder = kit.make_tokenizer(tmp_path / "marked", kit.MARKED_TEMPLATE)
    source = kit.write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": CHAT[:2]}])
    out = tmp_path / "data.jsonl"
    prepare(str(source), tokenizer=str(folder), out=str(out))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = read(out)
    assert len(rows) == 2
    whole = tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    assert rows[0]["input_ids"] == list(whole)  # exactly the template's rendering
    assert learnt_tokens(tokenizer, rows[0]) == [
        "i am fine thank you <|im_end|>",
        "it is four <|im_end|>",
    ]
    assert learnt_tokens(tokenizer, rows[1]) == ["i am fine thank you <|im_end|>"]
    for row in rows:
        assert row["len"] == len(row["input_ids"]) == len(row["labels"])


def test_prepared_chat_is_read_by_mt_data_as_a_run_reads_it(kit, tmp_path, tokenizer_dir):
    source = kit.write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 3)
    out = tmp_path / "data.jsonl"
    prepare(str(source), tokenizer=str(tokenizer_dir), out=str(out))
    store = open_token_store(out, cache_dir=tmp_path / "cache", require_labels=True)
    assert len(store) == 3
    # learnt after the one-token shift: the two assistant turns, 6 + 4 tokens
    assert store.loss_counts.tolist() == [10, 10, 10]


def test_text_documents_get_special_tokens_and_eos(kit, tmp_path, tokenizer_dir):
    source = kit.write_jsonl(
        tmp_path / "docs.jsonl", [{"text": "the cat sat on the mat"}, {"text": "hello"}]
    )
    out = tmp_path / "docs.tok.jsonl"
    prepare(str(source), tokenizer=str(tokenizer_dir), out=str(out))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = read(out)
    assert rows[0]["input_ids"][0] == tokenizer.bos_token_id
    assert rows[0]["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(rows[0]["input_ids"][1:-1]) == "the cat sat on the mat"
    assert all("labels" not in row and row["len"] == len(row["input_ids"]) for row in rows)
    out2 = tmp_path / "no_eos.jsonl"
    prepare(str(source), tokenizer=str(tokenizer_dir), out=str(out2), add_eos=False)
    assert read(out2)[1]["input_ids"] == tokenizer("hello")["input_ids"]
    store = open_token_store(out, cache_dir=tmp_path / "cache", require_labels=False)
    assert store.num_tokens == sum(row["len"] for row in rows)


def test_max_len_drops_by_default_and_truncates_when_asked(kit, tmp_path, tokenizer_dir, capsys):
    short = [CHAT[0], {"role": "assistant", "content": "it is four"}]
    source = kit.write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": short}])
    lengths = []
    for name, options in [
        ("all", {}),
        ("drop", {"max_len": 20}),
        ("cut", {"max_len": 20, "truncate": True}),
    ]:
        out = tmp_path / f"{name}.jsonl"
        prepare(str(source), tokenizer=str(tokenizer_dir), out=str(out), **options)
        lengths.append([row["len"] for row in read(out)])
    full, dropped, cut = lengths
    assert full[0] > 20 >= full[1]
    assert dropped == [full[1]]
    assert cut == [20, full[1]]
    printed = capsys.readouterr().out
    assert "1 longer than --max_len=20 were dropped" in printed
    assert "1 longer than --max_len=20 were cut to it" in printed


def test_a_cut_that_leaves_nothing_to_learn_drops_the_sample(kit, tmp_path, tokenizer_dir, capsys):
    source = kit.write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    out = tmp_path / "out.jsonl"
    with pytest.raises(DataError, match="no line gave a sample"):
        prepare(str(source), tokenizer=str(tokenizer_dir), out=str(out), max_len=8, truncate=True)
    assert not out.exists()


def test_bad_lines_are_reported_with_path_and_line_and_nothing_is_written(
    kit, tmp_path, tokenizer_dir
):
    rows = [
        {"messages": CHAT},
        "{not json",
        {"messages": [{"role": "user"}]},
        {"text": "a document among chats"},
        {"prompt": "x"},
    ]
    source = kit.write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "out.jsonl"
    with pytest.raises(DataError) as error:
        prepare(str(source), tokenizer=str(tokenizer_dir), out=str(out))
    lines = str(error.value).splitlines()
    assert lines[0].startswith(f"{source}: 4 bad line(s); nothing was written")
    assert lines[1].startswith(f"{source}:2: invalid JSON")
    assert lines[2] == f"{source}:3: message 0 (user) has no 'content' string"
    assert lines[3] == f"{source}:4: a text line in a file of chat lines; use one kind per file"
    assert lines[4].startswith(f"{source}:5: expected a 'messages' list")
    assert not out.exists() and list(tmp_path.glob(".out.jsonl.tmp*")) == []


def test_skip_bad_lines_writes_the_good_ones(kit, tmp_path, tokenizer_dir, capsys):
    source = kit.write_jsonl(
        tmp_path / "chat.jsonl", [{"messages": CHAT}, "[1, 2]", {"messages": CHAT}]
    )
    out = tmp_path / "out.jsonl"
    prepare(str(source), tokenizer=str(tokenizer_dir), out=str(out), skip_bad_lines=True)
    assert len(read(out)) == 2
    assert f"{source}:2: expected a JSON object" in capsys.readouterr().err


def test_a_template_that_rewrites_earlier_turns_is_refused(kit, tmp_path, tokenizer_dir):
    # renders the assistant's turn differently when it is the last one: no prefix to diff
    template = (
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }}"
        "{% if loop.last %} <|im_end|>{% endif %}\n{% endfor %}"
    )
    template_file = tmp_path / "template.jinja"
    template_file.write_text(template)
    source = kit.write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    with pytest.raises(
        DataError, match=r"chat\.jsonl:1: the chat template renders turn 1 differently"
    ):
        prepare(str(source), tokenizer=str(tokenizer_dir), out=str(tmp_path / "o.jsonl"),
                chat_template=str(template_file))  # fmt: skip


def test_template_errors_name_the_line(kit, tmp_path, tokenizer_dir):
    template = tmp_path / "strict.jinja"
    template.write_text(
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}"
        "{% endif %}{{ m['content'] }}\n{% endfor %}"
    )
    chat = [*CHAT[:2], {"role": "tool", "content": "hello"}]
    source = kit.write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}])
    with pytest.raises(
        DataError, match=r"chat\.jsonl:1: the chat template refused the conversation: no tools"
    ):
        prepare(str(source), tokenizer=str(tokenizer_dir), out=str(tmp_path / "o.jsonl"),
                chat_template=str(template))  # fmt: skip


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "data prepare needs --tokenizer=PATH and --out=FILE"),
        (
            {"tokenizer": "/no/such/folder", "out": "o.jsonl"},
            "--tokenizer: /no/such/folder is not a folder",
        ),
        ({"tokenizer": "t", "out": "o", "truncate": True}, "--truncate needs --max_len"),
        ({"tokenizer": "t", "out": "o", "max_len": 0}, "--max_len: expected a positive integer"),
        (
            {"tokenizer": "t", "out": "o", "max_lenght": 3},
            "unknown option --max_lenght; did you mean --max_len?",
        ),
    ],
)
def test_option_mistakes(kit, tmp_path, options, message):
    source = kit.write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    with pytest.raises(CommandError, match=message.replace("?", r"\?")):
        prepare(str(source), **options)


def test_the_command_line_end_to_end(kit, tmp_path, tokenizer_dir, capsys):
    source = kit.write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 5)
    out = tmp_path / "sub" / "data.jsonl"
    options = [f"--tokenizer={tokenizer_dir}", f"--out={out}", "--max_len=100"]
    cli.main(["data", "prepare", str(source), *options])  # returns: exit status 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote 5 samples, 170 tokens (29% loss-counted), to {out}")
    assert np.all([row["len"] == 34 for row in read(out)])
    bad = kit.write_jsonl(tmp_path / "bad.jsonl", [{"messages": CHAT}, {"messages": []}])
    with pytest.raises(SystemExit) as exit_:
        cli.main(["data", "prepare", str(bad), f"--tokenizer={tokenizer_dir}", "--out=x.jsonl"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        f"mt: error: {bad}: 1 bad line(s); nothing was written "
        "(--skip_bad_lines writes the others)\n"
        f"mt: error: {bad}:2: 'messages' must be a non-empty list\n"
    )
