"""README.md as a new user reads it: every Python snippet runs the way the README says it does
(on its own, or continuing the snippet it names), and every training command it shows is accepted
by the real argument parsers."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# "Continuing the [Tokenizer](#tokenizer) snippet" / "continues the Models snippet": the name is
# a heading of the README under which there is exactly one Python snippet.
CONTINUES = re.compile(r"\b[Cc]ontinu(?:ing|es) the \[?(?P<name>[^\]\n]+?)\]?(?:\(#[^)\s]*\))? snippet")
ONLINE = re.compile(r"\bonline\b", re.I)


@dataclass
class Snippet:
    heading: str  # the heading the snippet sits under
    lead_in: str  # the paragraph right before it
    code: str
    line: int  # 1-based line of the ```python fence

    @property
    def continues(self) -> str | None:
        match = CONTINUES.search(self.lead_in)
        return match["name"].strip() if match else None

    @property
    def online(self) -> bool:
        return ONLINE.search(self.lead_in) is not None


def code_blocks(text: str, language: str) -> list[tuple[str, str, str, int]]:
    """``(heading, lead_in, code, line)`` of each fenced block of ``language``."""
    blocks, heading, prose, lines = [], "", [], text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            lang, start, body = line[3:].strip(), i, []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            if lang == language:
                paragraphs = "\n".join(prose).strip().split("\n\n")
                blocks.append((heading, paragraphs[-1] if paragraphs else "", "\n".join(body) + "\n", start + 1))
            prose = []
        elif line.startswith("#"):
            heading, prose = line.lstrip("#").strip(), []
        else:
            prose.append(line)
        i += 1
    return blocks


def python_snippets() -> list[Snippet]:
    return [Snippet(*block) for block in code_blocks(README.read_text(), "python")]


def test_every_continuation_names_an_earlier_snippet():
    snippets = python_snippets()
    assert len(snippets) >= 5
    for index, snippet in enumerate(snippets):
        if snippet.continues is None:
            continue
        named = [s for s in snippets if s.heading == snippet.continues]
        assert len(named) == 1, (
            f"README line {snippet.line}: it continues the {snippet.continues!r} snippet, but the README has "
            f"{len(named)} Python snippets under a heading of that name (it needs exactly one)"
        )
        assert snippets.index(named[0]) < index, f"README line {snippet.line}: it continues a later snippet"


def test_readme_python_snippets_run_as_the_readme_says():
    """Each offline snippet runs in a fresh namespace, or in a copy of the namespace left by the
    snippet it says it continues (which ran the same way); a snippet that needs what another one
    defines without saying so fails here with a NameError."""
    namespaces: dict[str, dict] = {}
    ran = []
    for snippet in python_snippets():
        if snippet.online:
            continue  # needs the Hub; its continuation is checked above
        namespace = dict(namespaces[snippet.continues]) if snippet.continues else {}
        try:
            exec(compile(snippet.code, f"{README}:{snippet.line}", "exec"), namespace)  # noqa: S102 - our own docs
        except Exception as err:
            how = f"continuing the {snippet.continues} snippet" if snippet.continues else "on its own"
            raise AssertionError(f"README snippet at line {snippet.line} ({how}) fails: {err!r}") from err
        namespaces[snippet.heading] = namespace
        ran.append(snippet.heading)
    assert {"Tokenizer", "Models", "Generation"} <= set(ran)
    assert namespaces["Models"]["generated"].shape[0] == 2


def _parsers():
    try:  # after the split of sentence_lm/training.py
        from sentence_lm.training_sentence_vae import parse_sentence_vae_args
    except ImportError:
        from sentence_lm.training import parse_sentence_vae_args
    from sentence_lm.training_sentence_opt import parse_sentence_opt_args

    return {"train_sentence_vae.py": parse_sentence_vae_args, "train_sentence_opt.py": parse_sentence_opt_args}


def shell_commands() -> list[tuple[int, list[str]]]:
    """``(line, argv)`` of each command in the README's ``bash`` blocks (comments dropped,
    backslash continuations joined)."""
    commands = []
    for _, _, code, line in code_blocks(README.read_text(), "bash"):
        for command in code.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|;", command):
                argv = shlex.split(part, comments=True)
                if argv:
                    commands.append((line, argv))
    return commands


def test_readme_commands_name_existing_scripts():
    scripts = [argv[1] for _, argv in shell_commands() if argv[0] == "python" and argv[1].endswith(".py")]
    assert "examples/quickstart.py" in scripts
    for script in scripts:
        assert (ROOT / script).is_file(), f"README runs {script}, which does not exist"


def test_readme_training_commands_use_real_arguments(tmp_path, monkeypatch):
    """Every `python examples/train_*.py ...` command of the README parses with the script's own
    parser (an unknown or misspelt flag exits with an error). Nothing is trained or downloaded."""
    monkeypatch.chdir(tmp_path)
    parsers = _parsers()
    checked = []
    for line, argv in shell_commands():
        if argv[0] != "python" or Path(argv[1]).name not in parsers:
            continue
        assert "..." not in argv, f"README line {line}: a runnable command with a '...' placeholder"
        try:
            parsers[Path(argv[1]).name](argv[2:])
        except (SystemExit, ValueError) as err:  # argparse exits; HfArgumentParser raises on unused flags
            pytest.fail(f"README bash block at line {line}: {shlex.join(argv)} is refused by its parser ({err})")
        checked.append(argv)
    assert any("--train_file" in argv for argv in checked)
    assert any("--dataset_name" in argv for argv in checked)
    assert all("shared/" not in arg for argv in checked for arg in argv), (
        "README's commands must use data every user has: the built-in corpus, your own file, or a `datasets` name"
    )


def test_readme_code_fences_are_closed():
    """README.md parsed as Markdown (markdown-it-py, CommonMark): every fenced block ends at a
    closing fence of its own. A closing fence with text after it (```` ``` For OPT...````) is no
    closing fence, and the rest of the file would render as code."""
    from markdown_it import MarkdownIt

    lines = README.read_text(encoding="utf-8").splitlines()
    fences = [t for t in MarkdownIt("commonmark").parse("\n".join(lines)) if t.type == "fence"]
    assert fences, "README.md has no code blocks"
    for token in fences:
        start, end = token.map
        closing = lines[end - 1].strip() if end - 1 > start else ""
        swallowed = [line for line in token.content.splitlines() if line.lstrip().startswith(token.markup)]
        assert set(closing) == {token.markup[0]} and len(closing) >= len(token.markup) and not swallowed, (
            f"The code block opened at line {start + 1} of README.md is not closed where it should be (it runs "
            f"to line {end}{', over ' + repr(swallowed[0]) if swallowed else ''}): close it with a fence on a "
            "line of its own."
        )
