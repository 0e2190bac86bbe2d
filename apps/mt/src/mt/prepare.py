"""``mt data prepare``: chat or text JSONL -> mt's token format, with labels on assistant turns.

Which tokens are the assistant's (labels = token ids there, -100 elsewhere):

* A chat template that marks them with ``{% generation %}`` says so itself: transformers'
  ``apply_chat_template(return_assistant_tokens_mask=True)`` gives the mask, and it is used.
* Otherwise (most templates) the spans are found by rendering prefixes of the conversation: the
  text of ``messages[:i]`` with the generation prompt ends where assistant turn ``i`` starts, and
  the text of ``messages[:i + 1]`` ends where it ends (its end-of-turn tokens included: the model
  must learn to stop). Spans are character offsets into the text of the whole conversation,
  which is tokenized once; a token is labelled when it starts inside a span. Working on text
  rather than on separately tokenized prefixes is what makes this exact: a BPE merge across a
  boundary cannot shift a count. Each prefix must be a prefix of the whole text; a template that
  rewrites earlier turns depending on later ones (some drop past reasoning) fails that check,
  and the line is reported rather than labelled wrongly.

Text lines (``{"text": ...}``) become documents (``input_ids``) for continued pretraining, with the
tokenizer's own special tokens (e.g. BOS) and, by default, EOS after each.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mt.errors import CommandError
from mt_data import DataError

__all__ = ["prepare"]

IGNORE_INDEX = -100
BATCH_LINES = 256  # lines rendered, then tokenized in one call of the fast tokenizer
MAX_PROBLEMS = 1000
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


class _Refused(ValueError):
    """One line's problem (the message, without path:line)."""


@dataclass
class _Counts:
    written: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    too_long: int = 0
    truncated: int = 0
    no_assistant: int = 0
    bad: int = 0
    problems: list[str] = field(default_factory=list)

    def problem(self, message: str) -> None:
        self.bad += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(message)


def prepare(
    input_path: str,
    tokenizer: str | None = None,
    out: str | None = None,
    max_len: int | None = None,
    truncate: bool = False,
    drop: bool = False,
    chat_template: str | None = None,
    add_eos: bool = True,
    skip_bad_lines: bool = False,
    **unknown: Any,
) -> None:
    """Tokenize INPUT_PATH's chat or text lines into OUT (see ``mt data prepare --help``)."""
    _reject_unknown(unknown)
    source = Path(str(input_path))
    if tokenizer is None or out is None:
        raise CommandError("data prepare needs --tokenizer=PATH and --out=FILE")
    target = Path(str(out))
    if not source.is_file():
        raise CommandError(f"{source}: no such file")
    if target.resolve() == source.resolve():
        raise CommandError("--out: must not be the input file")
    if max_len is not None and (
        isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1
    ):
        raise CommandError(f"--max_len: expected a positive integer, got {max_len!r}")
    if truncate and drop:
        raise CommandError("--truncate and --drop exclude each other")
    if truncate and max_len is None:
        raise CommandError("--truncate needs --max_len")
    tok = _load_tokenizer(str(tokenizer))
    template = Path(str(chat_template)).read_text() if chat_template else None
    counts = _Counts()
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "w", encoding="utf-8") as sink:
            kind = _convert(source, tok, template, sink, counts, max_len, truncate, add_eos)
            sink.flush()
            os.fsync(sink.fileno())
        if counts.problems and not skip_bad_lines:
            raise DataError(
                counts.problems,
                header=f"{source}: {counts.bad} bad line(s); nothing was written "
                "(--skip_bad_lines writes the others)",
            )
        if counts.written == 0:
            raise DataError([f"{source}: no line gave a sample; nothing was written"])
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    _summary(source, target, kind, counts, max_len, truncate)


def _reject_unknown(unknown: dict[str, Any]) -> None:
    import difflib

    known = ["tokenizer", "out", "max_len", "truncate", "drop", "chat_template", "add_eos",
             "skip_bad_lines"]  # fmt: skip
    for key in unknown:
        near = difflib.get_close_matches(key.replace("-", "_"), known, n=1)
        hint = f"; did you mean --{near[0]}?" if near else ""
        raise CommandError(f"data prepare: unknown option --{key}{hint}")


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    local = Path(path)
    if not local.is_dir() and (
        local.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1
    ):
        raise CommandError(f"--tokenizer: {path} is not a folder")
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as error:  # a wrong path, no tokenizer files, offline hub name
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CommandError(
            f"--tokenizer: cannot load a tokenizer from {path} ({type(error).__name__}: {first})"
        ) from error


def _convert(source, tok, template, sink, counts, max_len, truncate, add_eos) -> str | None:
    """Every line of ``source`` into ``sink``; returns the file's kind ('chat' or 'text')."""
    from tqdm import tqdm

    kind: str | None = None
    size = source.stat().st_size
    pending: list[tuple[int, Any]] = []
    with (
        open(source, "rb") as lines,
        tqdm(total=size, unit="B", unit_scale=True, desc="prepare", disable=None, file=sys.stderr) as bar,
    ):  # fmt: skip
        for number, raw in enumerate(lines, start=1):
            bar.update(len(raw))
            if not raw.strip():
                continue
            where = f"{source}:{number}"
            try:
                record = _parse(raw)
                line_kind = "chat" if "messages" in record else "text"
                if kind is None:
                    kind = line_kind
                if line_kind != kind:
                    raise _Refused(
                        f"a {line_kind} line in a file of {kind} lines; use one kind per file"
                    )
                pending.append((number, record))
            except _Refused as problem:
                counts.problem(f"{where}: {problem}")
            if len(pending) >= BATCH_LINES:
                _flush(
                    pending, kind, source, tok, template, sink, counts, max_len, truncate, add_eos
                )
                pending = []
        if pending:
            _flush(pending, kind, source, tok, template, sink, counts, max_len, truncate, add_eos)
    return kind


def _parse(raw: bytes) -> dict:
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError) as error:
        raise _Refused(f"invalid JSON: {error}") from None
    if not isinstance(record, dict):
        raise _Refused("expected a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise _Refused("'messages' must be a non-empty list")
        for index, message in enumerate(messages):
            if not isinstance(message, dict):
                raise _Refused(f"message {index} is not an object")
            if not isinstance(message.get("role"), str):
                raise _Refused(f"message {index} has no 'role' string")
            if not isinstance(message.get("content"), str):
                raise _Refused(f"message {index} ({message['role']}) has no 'content' string")
        return record
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            raise _Refused("'text' must be a non-empty string")
        return record
    raise _Refused("expected a 'messages' list (chat) or a 'text' string (a document)")


def _flush(pending, kind, source, tok, template, sink, counts, max_len, truncate, add_eos) -> None:
    if kind == "chat":
        samples = _chat_samples(pending, source, tok, template, counts)
    else:
        samples = _text_samples(pending, tok, add_eos)
    for input_ids, labels in samples:
        if max_len is not None and len(input_ids) > max_len:
            if not truncate:
                counts.too_long += 1
                continue
            counts.truncated += 1
            input_ids = input_ids[:max_len]
            labels = None if labels is None else labels[:max_len]
        record: dict[str, Any] = {"input_ids": input_ids}
        if labels is not None:
            learnt = sum(1 for label in labels[1:] if label != IGNORE_INDEX)
            if learnt == 0:  # nothing the model would learn from (after the one-token shift)
                counts.no_assistant += 1
                continue
            record["labels"] = labels
            counts.loss_tokens += learnt
        else:
            counts.loss_tokens += len(input_ids) - 1
        record["len"] = len(input_ids)
        sink.write(json.dumps(record) + "\n")
        counts.written += 1
        counts.tokens += len(input_ids)


def _text_samples(pending, tok, add_eos: bool) -> list[tuple[list[int], None]]:
    encoded = tok([record["text"] for _, record in pending], add_special_tokens=True)["input_ids"]
    eos = tok.eos_token_id
    samples = []
    for ids in encoded:
        ids = list(ids)
        if add_eos and eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        samples.append((ids, None))
    return samples


def _chat_samples(pending, source, tok, template, counts) -> list[tuple[list[int], list[int]]]:
    chat_template = template or tok.chat_template
    if not chat_template:
        raise CommandError("the tokenizer has no chat template; give one with --chat_template=FILE")
    if _GENERATION.search(chat_template):
        return _marked_samples(pending, source, tok, chat_template, counts)
    if not tok.is_fast:
        raise CommandError(
            "chat data needs a fast tokenizer (tokenizer.json) to map assistant text to tokens"
        )
    texts, spans, kept = [], [], []
    for number, record in pending:
        try:
            text, turns = _assistant_spans(record["messages"], tok, chat_template)
        except _Refused as problem:
            counts.problem(f"{source}:{number}: {problem}")
            continue
        texts.append(text)
        spans.append(turns)
        kept.append(number)
    if not texts:
        return []
    encoded = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    samples = []
    for ids, offsets, turns in zip(
        encoded["input_ids"], encoded["offset_mapping"], spans, strict=True
    ):
        labels = [
            token if any(start <= begin < end for start, end in turns) else IGNORE_INDEX
            for token, (begin, _) in zip(ids, offsets, strict=True)
        ]
        samples.append((list(ids), labels))
    return samples


def _render(tok, messages, template, generation_prompt: bool) -> str:
    try:
        return tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt,
            chat_template=template,
        )  # fmt: skip
    except Exception as error:  # the template's raise_exception, a missing key, ...
        raise _Refused(f"the chat template refused the conversation: {error}") from None


def _assistant_spans(messages, tok, template) -> tuple[str, list[tuple[int, int]]]:
    """The whole conversation's text and the character spans of its assistant turns."""
    whole = _render(tok, messages, template, False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            before = _render(tok, messages[:index], template, True) if index else ""
        except _Refused:
            before = ""  # a template that cannot render an empty conversation
        through = _render(tok, messages[: index + 1], template, False)
        if not (whole.startswith(through) and through.startswith(before)):
            raise _Refused(
                f"the chat template renders turn {index} differently once later turns follow, "
                "so the assistant text cannot be located; use a template with "
                "{% generation %} markers (--chat_template)"
            )
        spans.append((len(before), len(through)))
    return whole, spans


def _marked_samples(pending, source, tok, template, counts):
    samples = []
    for number, record in pending:
        try:
            out = tok.apply_chat_template(
                record["messages"], tokenize=True, return_dict=True,
                return_assistant_tokens_mask=True, chat_template=template,
            )  # fmt: skip
        except Exception as error:
            counts.problem(
                f"{source}:{number}: the chat template refused the conversation: {error}"
            )
            continue
        ids = list(out["input_ids"])
        mask = list(out["assistant_masks"])
        samples.append((ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]))
    return samples


def _summary(source, target, kind, counts: _Counts, max_len, truncate) -> None:
    what = "samples" if kind == "chat" else "documents"
    share = f" ({counts.loss_tokens / counts.tokens:.0%} loss-counted)" if kind == "chat" else ""
    print(f"wrote {counts.written:,} {what}, {counts.tokens:,} tokens{share}, to {target}")
    if max_len is not None:
        if truncate:
            print(f"  {counts.truncated:,} longer than --max_len={max_len} were cut to it")
        else:
            print(f"  {counts.too_long:,} longer than --max_len={max_len} were dropped")
    if counts.no_assistant:
        print(f"  {counts.no_assistant:,} without an assistant token to learn were dropped")
    if counts.bad:
        print(f"  {counts.bad:,} bad line(s) of {source} were skipped:", file=sys.stderr)
        for problem in counts.problems[:10]:
            print(f"    {problem}", file=sys.stderr)
