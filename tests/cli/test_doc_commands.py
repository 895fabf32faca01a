"""Every ``ptq4vm`` command the docs show a reader parses as written: a command a newcomer copies
must not stop at a missing or renamed flag."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from ptq4vm_jax.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "ARCHITECTURE.md", "pallas_kernels/README.md", "experiments/README.md", "docs/method.md")


def doc_commands(text: str) -> list[str]:
    """The ``ptq4vm`` commands of a markdown text: each line of a fenced block (continuations
    joined, ``&&`` chains split, comments dropped) and each inline code span that gives one with
    an option (a bare ``ptq4vm convert`` names a command, it does not run one)."""
    found = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("#")[0].split("&&"):
                if part.strip().startswith("ptq4vm "):
                    found.append(part.strip())
    for span in re.findall(r"`(ptq4vm [^`]+)`", text):
        if " --" in span:
            found.append(" ".join(span.split()))
    return found


def test_doc_commands_finds_blocks_chains_and_inline_spans():
    text = ("```bash\npip install x && ptq4vm demo   # a comment\nptq4vm eval --a \\\n  --b 1\n```\n"
            "Run `ptq4vm quantize --out\nd` or see `ptq4vm convert`.")
    assert doc_commands(text) == ["ptq4vm demo", "ptq4vm eval --a    --b 1", "ptq4vm quantize --out d"]


@pytest.mark.parametrize("doc", DOCS)
def test_every_ptq4vm_command_in_the_docs_parses(doc):
    commands = doc_commands((ROOT / doc).read_text())
    if doc == "README.md":  # the quick start, convert -> quantize -> eval, and the report
        assert {c.split()[1] for c in commands} >= {"demo", "convert", "quantize", "eval", "report"}, commands
    parser = build_parser()
    for command in commands:
        try:
            parser.parse_args(shlex.split(command)[1:])
        except SystemExit:
            pytest.fail(f"{doc}: `{command}` does not parse (argparse's message above)")
