"""Text corpora for training and evaluation at small scale.

:func:`default_corpus` needs no download: it is English prose from the Python standard
library's ``pydoc_data.topics`` (the language reference topics behind ``help()``). Text files
such as those under ``../shared/data`` are read with :func:`read_text_lines`, split with
:func:`split_train_validation` (the last tenth of the lines for validation) and grouped into
paragraphs with :func:`group_paragraphs`. WikiText's markup is undone by :func:`detokenize_wikitext`;
:func:`text_paragraphs` reads a file's paragraphs, detokenised when it holds that markup.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence

_UNDERLINE = re.compile(r"^([*=\-~^\"'#+`])\1{2,}\s*$")
_TABLE_RULE = re.compile(r"^[+=\-| ]{4,}$")
_WHITESPACE = re.compile(r"[ \t]+")
_STRONG = re.compile(r"\*\*([^*\n]+?)\*\*")
_EMPHASIS = re.compile(r"(?<![\w*])\*([^\s*](?:[^*\n]*?[^\s*])?)\*(?![\w*])")
_ITEM_MARK = re.compile(r"^(?:\[\d+\]|[*\-•]|\d{1,2}\.)\s+")
_MIN_CHARS = 80
_MIN_WORDS = 12


def _prose_paragraphs(text: str) -> list[str]:
    """Unwrapped prose paragraphs of one pydoc topic: headings, indented blocks (code, grammar,
    notes), tables and short fragments are dropped; hard-wrapped lines are joined by spaces."""
    paragraphs = []
    for block in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")):
        lines = [line for line in block.split("\n") if line.strip()]
        # Drop section headings: a line followed by an underline of one repeated character.
        kept = []
        for i, line in enumerate(lines):
            if _UNDERLINE.match(line.strip()):
                continue
            if i + 1 < len(lines) and _UNDERLINE.match(lines[i + 1].strip()):
                continue
            kept.append(line)
        if not kept or kept[0][:1].isspace():
            continue  # empty, or an indented block: code, grammar, a note, a nested paragraph
        if any(_TABLE_RULE.match(line.strip()) for line in kept):
            continue
        joined = ""
        for line in kept:
            line = line.strip()
            # A word hyphenated over a line break ("pre-" / "computed") is joined back.
            glue = "" if joined.endswith("-") and joined[-2:-1].isalpha() and line[:1].isalpha() else " "
            joined = f"{joined}{glue}{line}" if joined else line
        paragraph = _WHITESPACE.sub(" ", _EMPHASIS.sub(r"\1", _STRONG.sub(r"\1", joined))).strip()
        paragraph = _ITEM_MARK.sub("", paragraph)
        if paragraph.endswith("::"):
            paragraph = paragraph[:-1]
        if len(paragraph) < _MIN_CHARS or len(paragraph.split()) < _MIN_WORDS:
            continue
        paragraphs.append(paragraph)
    return paragraphs


def default_corpus() -> list[str]:
    """The built-in default corpus, available on every machine with Python, no download.

    English prose paragraphs from the standard library's ``pydoc_data.topics``, in topic-name
    order. reST emphasis markers, footnote numbers and list bullets are removed; section
    headings, indented code and grammar blocks, notes, tables and paragraphs of fewer than 80
    characters or 12 words are dropped; each paragraph's hard-wrapped lines are joined into one
    line (a newline would end a sentence). The result is deterministic for a given Python
    version (some 850 paragraphs, 220 KB with Python 3.11).

    Returns:
        A list of paragraphs (strings without newlines).
    """
    from pydoc_data.topics import topics

    corpus = []
    for name in sorted(topics):
        corpus.extend(_prose_paragraphs(topics[name]))
    return corpus


def read_text_lines(path: str | os.PathLike) -> list[str]:
    """Read a UTF-8 text file (a byte-order mark is skipped) as a list of lines.

    Lines are split on ``\\n``, ``\\r\\n`` and ``\\r`` and returned without their line ends; a
    final line end does not add an empty line. Blank lines are kept (see
    :func:`group_paragraphs`).

    Args:
        path: the file to read.

    Returns:
        The file's lines.
    """
    with open(path, encoding="utf-8-sig", newline=None) as handle:
        text = handle.read()
    if not text:
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def split_train_validation(
    lines: Sequence[str], validation_fraction: float = 0.1
) -> tuple[list[str], list[str]]:
    """Split ``lines`` into training and validation parts, in order, without shuffling.

    The validation part is the *last* ``floor(len(lines) * validation_fraction)`` lines (the
    split suggested by the data README: the last tenth of the lines); the training part is
    everything before it.

    Args:
        lines: the lines (or any sequence of texts) to split.
        validation_fraction: the fraction for validation, between 0 and 1.

    Returns:
        ``(train, validation)`` as two lists.
    """
    if isinstance(validation_fraction, bool) or not 0.0 <= float(validation_fraction) <= 1.0:
        raise ValueError(f"validation_fraction must be between 0 and 1, got {validation_fraction!r}.")
    lines = list(lines)
    # Round away float noise first (0.1 * 30 is 3.0000000000000004, 0.7 * 10 is 6.999999999999999).
    count = math.floor(round(len(lines) * float(validation_fraction), 9))
    cut = len(lines) - count
    return lines[:cut], lines[cut:]


def group_paragraphs(lines: Sequence[str]) -> list[str]:
    """Join consecutive non-blank lines into paragraphs; blank lines separate paragraphs.

    A line is blank when it holds only whitespace. The lines of a paragraph are joined with
    ``\\n`` and kept as they are (a trailing ``\\r`` or ``\\n`` is removed), so verse keeps its
    line breaks. Runs of blank lines, and blank lines at the start or end, give no empty
    paragraphs.

    Args:
        lines: lines as returned by :func:`read_text_lines`.

    Returns:
        The paragraphs, in order.
    """
    paragraphs = []
    current: list[str] = []
    for line in lines:
        line = line.rstrip("\r\n")
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    if current:
        paragraphs.append("\n".join(current))
    return paragraphs


_WIKITEXT_MARKUP = (" @-@ ", " @,@ ", " @.@ ")


def detokenize_wikitext(line: str) -> str:
    """One line of WikiText (tokenised or "raw", both space out punctuation) as ordinary text.

    `` @-@ `` -> ``-``, `` @,@ `` -> ``,``, `` @.@ `` -> ``.``; no space before ``, . ; : ! ? ) ]``
    nor after ``( [``; contractions and possessives joined (``'s 're 've 'll 'd 'm n't``, and
    ``s '`` of plurals); a pair of double quotes hugs its text; a heading `` = = Section = = `` becomes
    ``== Section ==``; leading and trailing spaces removed. ``<unk>`` stays. Other single quotes
    keep their spaces (they open quotations as often as they close them).
    """
    text = line.strip()
    heading = re.fullmatch(r"((?:= )+)(.*?)((?: =)+)", text)
    if heading:  # "= = Section = =" -> "== Section =="
        marks = "=" * heading.group(1).count("=")
        return f"{marks} {detokenize_wikitext(heading.group(2))} {marks}"
    for markup, plain in zip(_WIKITEXT_MARKUP, ("-", ",", ".")):
        text = text.replace(markup, plain)
    text = re.sub(r" ([,.;:!?)\]])", r"\1", text)
    text = re.sub(r"([(\[]) ", r"\1", text)
    text = re.sub(r" ('s|'re|'ve|'ll|'d|'m|n't)\b", r"\1", text, flags=re.IGNORECASE)
    text = re.sub(r"(\w)s ' ", r"\1s' ", text)
    text = re.sub(r'" ([^"]*?) "', r'"\1"', text)
    return text


def has_wikitext_markup(text: str) -> bool:
    """Whether ``text`` holds WikiText's markup (`` @-@ ``, `` @,@ ``, `` @.@ ``)."""
    return any(m in text for m in _WIKITEXT_MARKUP)


def wants_detokenizing(text: str, detokenize: str = "auto") -> bool:
    """Whether a file's ``text`` is to be read through :func:`detokenize_wikitext`: ``detokenize``
    is ``"yes"``, or ``"auto"`` and its first 200,000 characters hold WikiText markup (``"no"``:
    never)."""
    if detokenize not in ("auto", "yes", "no"):
        raise ValueError(f"detokenize must be 'auto', 'yes' or 'no', got {detokenize!r}.")
    return detokenize == "yes" or (detokenize == "auto" and has_wikitext_markup(text[:200_000]))


def text_paragraphs(path: str | os.PathLike, detokenize: str = "auto") -> list[str]:
    """A UTF-8 file's paragraphs (separated by blank lines, stripped, empty ones dropped), each
    line detokenised first when :func:`wants_detokenizing` says so."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if wants_detokenizing(text, detokenize):
        text = "\n".join(detokenize_wikitext(line) for line in text.splitlines())
    return [p.strip() for p in text.split("\n\n") if p.strip()]
