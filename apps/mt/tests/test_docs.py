"""The reference pages stay true to the code: the run-file key table is generated from the
config classes (this test fails when it drifts), and every link between the pages resolves."""

import re
from pathlib import Path

import attrs

from mt.reference_md import BEGIN, END, page, render_markdown, with_reference
from mt_core.config import TrainingArgs

DOCS = Path(__file__).resolve().parents[3] / "docs"


def test_run_file_page_is_generated_from_the_config():
    assert (DOCS / "run-file.md").read_text() == page(), (
        "docs/run-file.md is out of date: uv run python -m mt.reference_md docs/run-file.md"
    )


def test_every_key_has_a_row():
    table = render_markdown()
    for field in attrs.fields(TrainingArgs):
        if field.name != "pretraining":
            assert f"| `{field.name}` |" in table, field.name
    assert "| `pretraining.block_size` | integer | **required** |" in table


def test_a_marked_block_of_another_file_is_replaced():
    text = f"# README\n\nbefore\n{BEGIN}\nold table\n{END}\nafter\n"
    assert with_reference(text) == f"# README\n\nbefore\n{BEGIN}\n{render_markdown()}{END}\nafter\n"


def test_links_between_pages_resolve():
    for page_file in DOCS.glob("*.md"):
        for target in re.findall(r"\]\(([^)#]+\.md)(?:#[^)]*)?\)", page_file.read_text()):
            assert (page_file.parent / target).is_file(), f"{page_file.name} links to {target}"


def test_the_readme_table_is_generated_from_the_config():
    text = (DOCS.parent / "README.md").read_text()
    assert BEGIN in text and END in text, "README.md lost its run-file key table's markers"
    assert text == with_reference(text), (
        "README.md's run-file table is out of date: uv run python -m mt.reference_md README.md"
    )
