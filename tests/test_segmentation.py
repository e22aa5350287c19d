"""Sentence segmentation on token ids: properties over random text, and the boundary rules. The
properties hold for a byte-level BPE (``Ġ`` for a space) and for SentencePiece-style tokenizers
(``▁`` for a space, byte fallback) alike."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_tokenizer_sentencepiece import llama_style_tokenizer, spelled_text, unigram_style_tokenizer
from tokenizers import decoders

from sentence_lm.corpus import group_paragraphs, read_text_lines
from sentence_lm.segmentation import (
    BLANK,
    CLOSING_CHARS,
    ENDS,
    SENTENCE_END_CHARS,
    SPACE_END,
    TRAILS,
    pack_sentences,
    segment_sentences,
)
from sentence_lm.tokenization_sentence_lm import SentenceTokenizer, train_sentence_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GRIMM = SHARED_DATA / "grimm" / "tales.txt"

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Random text: anything `st.text()` draws (control characters, surrogate-free unicode), plus
# text built from pieces that exercise the rules: punctuation runs, quotes, whitespace,
# newlines, emoji, CJK and right-to-left scripts.
PIECES = st.sampled_from(
    [
        "Hello", " world", ".", ",", "!", "?", ";", ":", "...", "…", '"', "'", ")", "(", " \"", "”", "’",
        " ", "  ", "\n", "\r\n", "\n\n", "\t", "。", "！", "？", "，", "你好", "世界", "」", "😀", "👩‍💻",
        "مرحبا", "שלום", "Привет", " Mr.", "3.14", "\x00", "\x1b", "\u200b", "a" * 40, "</s>", "<pad>",
    ]
)
TEXT = st.one_of(st.text(max_size=120), st.lists(PIECES, max_size=40).map("".join))


@pytest.fixture(scope="module", params=["byte_level", "llama_style", "unigram_style"])
def any_tokenizer(request, tokenizer):
    """The session's byte-level tokenizer, and the SentencePiece-style ones of
    test_tokenizer_sentencepiece.py (Llama-2-like BPE, Metaspace Unigram) wrapped with the same
    ``max_sentence_len``."""
    if request.param == "byte_level":
        return tokenizer
    build = llama_style_tokenizer if request.param == "llama_style" else unigram_style_tokenizer
    return SentenceTokenizer.from_tokenizer(build(), max_sentence_len=tokenizer.max_sentence_len)


# ----------------------------------------------------------------------------- helpers


def token_flags(text: str) -> tuple[bool, bool, bool, bool]:
    """(ends, trails, blank, space_end) of one decoded token, from the rules as documented."""
    stripped = text.rstrip()
    core = stripped
    while core and (core[-1] in CLOSING_CHARS or core[-1].isspace()):
        core = core[:-1]
    ends = "\n" in text or (bool(core) and core[-1] in SENTENCE_END_CHARS)
    trails = all(c in SENTENCE_END_CHARS | CLOSING_CHARS or c.isspace() for c in text) and not (
        text[:1].isspace() and bool(stripped)
    )
    return ends, trails, not stripped, text[-1:].isspace()


def token_text(tokenizer, token_id: int) -> str:
    """One token's text inside a text: decoded alone for a byte-level tokenizer, read from the
    spelling for a SentencePiece-style one (whose decoder drops the space of a leading ``▁``)."""
    if isinstance(tokenizer.backend_tokenizer.decoder, decoders.ByteLevel):
        return tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
    return spelled_text(tokenizer, token_id)


def reference_segment(tokenizer, ids: list[int], max_len: int) -> list[int]:
    """A plain Python loop over the decoded tokens implementing the documented rules: the
    vectorised implementation must agree with it. A leading BOS gets -1; an EOS after a token
    other than an EOS ends a turn: it takes its sentence's index and the next token starts a new
    sentence; every other special token is a token without boundary flags."""
    special = tokenizer.special_token_ids
    out, sentence, length, pending, prev_space_end, turn_ended, previous = [], -1, 0, False, False, False, None
    for index, token_id in enumerate(ids):
        if index == 0 and token_id == tokenizer.bos_token_id:
            out.append(-1)
            continue
        if token_id == tokenizer.eos_token_id and previous is not None and previous != tokenizer.eos_token_id:
            out.append(sentence)
            turn_ended, previous = True, token_id
            continue
        previous = token_id
        text = token_text(tokenizer, token_id) if token_id not in special else ""
        ends, trails, blank, space_end = token_flags(text) if text else (False, False, False, False)
        trail = trails and (blank or not prev_space_end) and not turn_ended
        if sentence < 0 or turn_ended or (pending and not trail) or length == max_len:
            if sentence < 0 or turn_ended or (pending and not trail):
                pending = False
            sentence, length, turn_ended = sentence + 1, 0, False
        out.append(sentence)
        length += 1
        if ends:
            pending = True
        elif not trail:
            pending = False
        prev_space_end = space_end
    return out


def check_sentences(ids: list[int], sentence_ids: list[int], max_len: int, bos: int, eos: int) -> None:
    """Lossless (every token but a leading BOS in a sentence), numbered 0, 1, 2, ... by steps of
    one, no sentence longer than ``max_len`` (an EOS that closes one comes on top)."""
    assert len(ids) == len(sentence_ids)
    kept = [(i, s) for i, s in zip(ids, sentence_ids) if s >= 0]
    assert [i for i, _ in kept] == (ids[1:] if ids[:1] == [bos] else ids)
    numbers = [s for _, s in kept]
    if numbers:
        assert numbers[0] == 0
        assert all(b - a in (0, 1) for a, b in zip(numbers, numbers[1:]))
    count = (max(numbers) + 1) if numbers else 0
    sentences = [[i for i, s in kept if s == k] for k in range(count)]
    assert all(1 <= len(sentence) - (sentence[-1] == eos and len(sentence) > 1) <= max_len for sentence in sentences)
    assert [i for sentence in sentences for i in sentence] == [i for i, _ in kept]


def decodes_back(tokenizer, text: str) -> bool:
    """Whether the tokenizer's own encoding and decoding give ``text`` back. A byte-level BPE
    always does. The `tokenizers` Metaspace pre-tokenizer (SentencePiece-style) does not for a
    text that starts with a space (it prepends no ``▁`` there, yet the decoder drops one), that
    spells a special token (after which it prepends a ``▁``) or that holds ``▁`` itself."""
    if isinstance(tokenizer.backend_tokenizer.decoder, decoders.ByteLevel):
        return True
    return not (text.startswith(" ") or "▁" in text or any(t in text for t in tokenizer.all_special_tokens))


def decode_text(tokenizer, ids: list[int], add_special_tokens: bool) -> str:
    """The text back from its ids; with special tokens, the first one is the prepended BOS (the
    text itself may spell special tokens such as "</s>", which are kept)."""
    if add_special_tokens:
        assert ids[0] == tokenizer.bos_token_id
        ids = ids[1:]
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False)


def decoded_sentences(tokenizer, text: str) -> list[str]:
    encoding = tokenizer(text, add_special_tokens=False)
    ids, sentence_ids = encoding["input_ids"], encoding["sentence_ids"]
    count = max(sentence_ids, default=-1) + 1
    return [
        tokenizer.decode([i for i, s in zip(ids, sentence_ids) if s == k], clean_up_tokenization_spaces=False)
        for k in range(count)
    ]


# ----------------------------------------------------------------------------- properties


def check_text_is_lossless(tokenizer, text):
    """Tokenize ``text`` with and without special tokens; its sentences must be well numbered,
    match the reference segmentation and give back the ids (and the text, where the tokenizer's
    own decoding does: see :func:`decodes_back`)."""
    for add_special_tokens in (False, True):
        encoding = tokenizer(text, add_special_tokens=add_special_tokens)
        check_sentences(
            encoding["input_ids"], encoding["sentence_ids"], tokenizer.max_sentence_len, tokenizer.bos_token_id,
            tokenizer.eos_token_id,
        )
        assert encoding["sentence_ids"] == reference_segment(
            tokenizer, encoding["input_ids"], tokenizer.max_sentence_len
        )
        if decodes_back(tokenizer, text):
            assert decode_text(tokenizer, encoding["input_ids"], add_special_tokens) == text


@FAST
@given(text=TEXT)
def test_single_text_is_lossless_and_numbered(any_tokenizer, text):
    check_text_is_lossless(any_tokenizer, text)


@FAST
@given(texts=st.lists(TEXT, min_size=1, max_size=4), side=st.sampled_from(["left", "right"]))
def test_batch_with_padding_matches_single_texts(any_tokenizer, texts, side):
    single = [any_tokenizer(text) for text in texts]
    batch = any_tokenizer(texts, padding=True, padding_side=side, return_tensors="pt")
    width = batch["input_ids"].shape[1]
    for row, encoding in enumerate(single):
        n = len(encoding["input_ids"])
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        pad_cols = slice(0, width - n) if side == "left" else slice(n, width)
        assert batch["input_ids"][row, cols].tolist() == encoding["input_ids"]
        assert batch["sentence_ids"][row, cols].tolist() == encoding["sentence_ids"]
        assert (batch["sentence_ids"][row, pad_cols] == -1).all()
        check_sentences(
            encoding["input_ids"],
            batch["sentence_ids"][row, cols].tolist(),
            any_tokenizer.max_sentence_len,
            any_tokenizer.bos_token_id,
            any_tokenizer.eos_token_id,
        )


@FAST
@given(text=TEXT, max_len=st.integers(1, 8))
def test_segment_sentences_with_any_cap_and_padding_in_between(any_tokenizer, text, max_len):
    # The raw function knows no special tokens: leave out any the text spells ("</s>").
    special = any_tokenizer.special_token_ids
    ids = [i for i in any_tokenizer(text, add_special_tokens=False)["input_ids"] if i not in special]
    expected = reference_segment(any_tokenizer, ids, max_len)
    table = any_tokenizer.boundary_table
    assert segment_sentences(torch.tensor(ids, dtype=torch.long), table, max_len).tolist() == expected
    # Padding interleaved anywhere (masked out) neither splits nor joins sentences.
    padded = [x for i in ids for x in (1, i)] + [1]
    mask = [x for _ in ids for x in (0, 1)] + [0]
    got = segment_sentences(torch.tensor([padded]), table, max_len, torch.tensor([mask]))[0].tolist()
    assert [s for s, m in zip(got, mask) if m] == expected
    assert all(s == -1 for s, m in zip(got, mask) if not m)


@FAST
@given(texts=st.lists(TEXT, min_size=1, max_size=3))
def test_pack_sentences_gives_back_every_text(any_tokenizer, texts):
    batch = any_tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
    packed = pack_sentences(batch["input_ids"], batch["sentence_ids"], any_tokenizer.pad_token_id)
    for row in range(len(texts)):
        pieces = [
            packed.input_ids[k, : packed.lengths[k]].tolist()
            for k in range(packed.input_ids.shape[0])
            if int(packed.batch_index[k]) == row
        ]
        ids = [i for i, s in zip(batch["input_ids"][row].tolist(), batch["sentence_ids"][row].tolist()) if s >= 0]
        text_ids = [i for i, m in zip(batch["input_ids"][row].tolist(), batch["attention_mask"][row].tolist()) if m]
        assert ids == text_ids[1:]  # every token but the prepended BOS
        assert [i for piece in pieces for i in piece] == ids
        eos = any_tokenizer.eos_token_id
        assert all(1 <= len(p) - (p[-1] == eos and len(p) > 1) <= any_tokenizer.max_sentence_len for p in pieces)


def test_boundary_table_follows_the_rules(any_tokenizer):
    # Every id, read as it stands inside a text (`Ġ.` and `▁.` are " ."), against the rules.
    special = any_tokenizer.special_token_ids
    for token_id, got in enumerate(any_tokenizer.boundary_table.tolist()):
        text = token_text(any_tokenizer, token_id)
        flags = token_flags(text) if text and token_id not in special else (False,) * 4
        expected = sum(flag for flag, on in zip((ENDS, TRAILS, BLANK, SPACE_END), flags) if on)
        assert got == expected, (token_id, any_tokenizer.convert_ids_to_tokens(token_id), text)


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize(
    "text",
    [
        "",
        "no punctuation at all in this text just words and more words and yet more words",
        "?!?!...,,,",
        "   \t  ",
        "\n\n\n",
        "Pneumonoultramicroscopicsilicovolcanoconiosis" * 5 + ". Supercalifragilisticexpialidocious",
        "line one\r\nline two\r\n\r\nline three",
        "他说：“你好。”然后他走了！你呢？好。",
        "😀😀😀. 👩‍💻👩‍💻! ok",
        "\x00\x01\x02. \x7f\x1b[0m",
    ],
)
def test_edge_cases_are_lossless(any_tokenizer, text):
    check_text_is_lossless(any_tokenizer, text)


def test_empty_text(any_tokenizer):
    assert any_tokenizer("", add_special_tokens=False)["sentence_ids"] == []
    encoding = any_tokenizer("")
    assert encoding["input_ids"] == [any_tokenizer.bos_token_id]
    assert encoding["sentence_ids"] == [-1]


def test_no_punctuation_is_cut_by_length_only(any_tokenizer):
    text = " ".join(["word"] * 30)
    encoding = any_tokenizer(text, add_special_tokens=False)
    n, cap = len(encoding["input_ids"]), any_tokenizer.max_sentence_len
    assert encoding["sentence_ids"] == [i // cap for i in range(n)]


def test_only_punctuation_is_one_sentence(tokenizer):
    assert decoded_sentences(tokenizer, "?!?!...,,,") == ["?!?!...,,,"]


def test_only_whitespace_is_one_sentence(tokenizer):
    assert decoded_sentences(tokenizer, "   \t  ") == ["   \t  "]


def test_long_text_without_punctuation(any_tokenizer):
    text = ("abcdefghij klmnopqrst uvwxyz " * 700)[:20_000]
    encoding = any_tokenizer(text, add_special_tokens=False, return_tensors="pt")
    ids, sentence_ids = encoding["input_ids"][0], encoding["sentence_ids"][0]
    cap = any_tokenizer.max_sentence_len
    assert torch.equal(sentence_ids, torch.arange(ids.numel()) // cap)


def test_quoted_sentence_keeps_its_closing_quote(tokenizer):
    assert decoded_sentences(tokenizer, 'He said, "Hello there." Then') == ["He said,", ' "Hello there."', " Then"]


def test_ellipsis_stays_in_one_sentence(tokenizer):
    assert decoded_sentences(tokenizer, "Wait... what?! No…") == ["Wait...", " what?!", " No…"]


def test_trailing_whitespace_and_newlines_stay_with_the_sentence(tokenizer):
    assert decoded_sentences(tokenizer, "It ended.  \n\nNext one.\n") == ["It ended.  \n\n", "Next one.\n"]
    assert decoded_sentences(tokenizer, "First line\nsecond line") == ["First line\n", "second line"]


def test_opening_quote_after_space_starts_the_next_sentence(tokenizer):
    assert decoded_sentences(tokenizer, 'Stop. "Why?" (Yes.) Fine') == ["Stop.", ' "Why?"', " (Yes.)", " Fine"]


def test_crlf_line_ends(tokenizer):
    assert decoded_sentences(tokenizer, "one\r\ntwo\r\n\r\nthree") == ["one\r\n", "two\r\n\r\n", "three"]


@pytest.fixture(scope="module")
def cjk_tokenizer():
    """A tiny tokenizer that has learnt the CJK punctuation marks as single tokens."""
    texts = ["你好。我很好！你呢？他说：“走吧。”好，走；", "好。好！好？好：好，好；好", "Hello. World!"] * 30
    return train_sentence_tokenizer(texts, vocab_size=320, max_sentence_len=16)


def test_cjk_punctuation(cjk_tokenizer):
    for mark in "。！？，；：":
        assert len(cjk_tokenizer(mark, add_special_tokens=False)["input_ids"]) == 1, mark
    assert decoded_sentences(cjk_tokenizer, "你好。我很好！你呢？他说：走吧，好；走") == [
        "你好。",
        "我很好！",
        "你呢？",
        "他说：",
        "走吧，",
        "好；",
        "走",
    ]
    # The closing quote stays with its sentence, also when merged with the mark ("。”").
    assert decoded_sentences(cjk_tokenizer, "“走吧。”好") == ["“走吧。”", "好"]


def test_multibyte_mark_split_over_byte_tokens_is_not_a_boundary(tokenizer):
    # The session tokenizer never saw "。": it is three byte tokens, none of which ends a sentence.
    assert len(tokenizer("。", add_special_tokens=False)["input_ids"]) > 1
    assert decoded_sentences(tokenizer, "abc。def") == ["abc。def"]


def test_ids_outside_the_vocabulary_raise(tokenizer):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.segment(torch.tensor([[5, len(tokenizer)]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.segment(torch.tensor([-1, 5]))


@pytest.mark.skipif(not GRIMM.is_file(), reason="../shared/data/grimm/tales.txt is not present")
def test_real_text_grimm(any_tokenizer):
    paragraphs = group_paragraphs(read_text_lines(GRIMM))
    sample = [p for p in paragraphs if len(p) > 200][100:160]
    batch = any_tokenizer(sample, padding=True, padding_side="left", return_tensors="pt")
    cap = any_tokenizer.max_sentence_len
    natural_ends = 0
    for row, text in enumerate(sample):
        ids, sentence_ids = batch["input_ids"][row].tolist(), batch["sentence_ids"][row].tolist()
        real = [i for i, m in zip(ids, batch["attention_mask"][row].tolist()) if m]
        check_sentences(real, sentence_ids[-len(real):], cap, any_tokenizer.bos_token_id, any_tokenizer.eos_token_id)
        assert sentence_ids[-len(real):] == reference_segment(any_tokenizer, real, cap)
        count = max(sentence_ids) + 1
        for k in range(count - 1):
            piece = [i for i, s in zip(ids, sentence_ids) if s == k]
            if len(piece) == cap:
                continue
            # A sentence cut before the cap ends with a mark (possibly closed by quotes) or a
            # newline, or is only what trails a sentence that reached the cap (a space, a quote).
            sentence = any_tokenizer.decode(piece, clean_up_tokenization_spaces=False)
            last = sentence.rstrip()[-1:]
            assert "\n" in sentence or last in SENTENCE_END_CHARS | CLOSING_CHARS | {""}, sentence
            natural_ends += 1
    assert natural_ends > 100


def test_mark_merged_with_closing_quote_ends_the_sentence():
    # GPT-2/OPT vocabularies hold merged tokens such as `."`, `?"` and `.)`; they end a sentence
    # exactly like the split pair `.` + `"` does.
    texts = ['He said, "Hello there." Then (Yes.) Fine? "No?" Ok'] * 40
    merged = train_sentence_tokenizer(texts, vocab_size=300, max_sentence_len=64)
    tokens = [merged.decode([i]) for i in merged(texts[0], add_special_tokens=False)["input_ids"]]
    assert '."' in tokens and ".)" in tokens
    assert decoded_sentences(merged, texts[0]) == [
        "He said,",
        ' "Hello there."',
        " Then (Yes.)",
        " Fine?",
        ' "No?"',
        " Ok",
    ]
