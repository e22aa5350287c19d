"""SentencePiece-style tokenizers (``▁`` for a space, byte-fallback tokens such as ``<0x0A>``:
Llama-2, Mistral, Gemma) wrapped by SentenceTokenizer: the boundary table, sentence cuts, special
tokens, saving and loading. The tokenizers are built here in about a second, with no download; the
builders are shared with the property tests of test_segmentation.py."""

from __future__ import annotations

import functools
import json
import re

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, GemmaTokenizerFast, LlamaTokenizerFast, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from sentence_lm.corpus import default_corpus
from sentence_lm.segmentation import BLANK, ENDS, SPACE_END, TRAILS, build_boundary_table
from sentence_lm.tokenization_sentence_lm import SentenceTokenizer

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
"""Llama-2's special tokens, ids 0, 1, 2; its 256 byte-fallback tokens follow (ids 3 to 258)."""

BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
BYTE_TOKEN = re.compile(r"<0x([0-9A-F]{2})>")

# Besides the built-in English prose: quotes, brackets, punctuation runs and CJK marks, so that
# the vocabularies learn tokens such as `."`, `▁"`, `?"` and `。`.
PUNCTUATED_TEXTS = [
    'He said, "Hello there." Then (yes.) she asked: "Why?" No; fine!',
    "Wait... what?! No… ok: a, b; c. 'Quoted.' [Done.] {Yes!}",
    "你好。我很好！你呢？他说：“走吧。”好，走；「是。」",
]


# SentencePiece keeps letters and punctuation in separate pieces (`split_by_unicode_script`): so
# do the pieces the builders learn from, a `▁` and letters or digits, or a `▁` and other marks.
TRAINING_SPLIT = pre_tokenizers.Sequence(
    [
        pre_tokenizers.Metaspace(prepend_scheme="first"),
        pre_tokenizers.Split(Regex(r"▁?[\p{L}\p{N}]+|▁?[^▁\p{L}\p{N}]+|▁"), behavior="isolated"),
    ]
)


def training_texts() -> list[str]:
    return default_corpus() + PUNCTUATED_TEXTS * 30


def _with_bytes(pieces: list, byte_pieces: list = BYTE_TOKENS) -> list:
    """``pieces`` (a vocabulary in id order, specials first) with ``byte_pieces`` after the specials."""
    return pieces[: len(SPECIAL_TOKENS)] + byte_pieces + pieces[len(SPECIAL_TOKENS) :]


@functools.cache
def llama_style_tokenizer(vocab_size: int = 1000) -> LlamaTokenizerFast:
    """A Llama-2-style tokenizer: BPE over ``▁``-spelled words with byte fallback, Llama's ids
    and decoder (``▁`` → space, bytes, fuse, strip the leading space), a ``<s>`` BOS prepended,
    no EOS appended, no padding token. Cached: copy it before changing it."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = TRAINING_SPLIT
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    backend.train_from_iterator(training_texts(), trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    pieces = _with_bytes(sorted(model["vocab"], key=model["vocab"].get))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return LlamaTokenizerFast(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, add_bos_token=True)


@functools.cache
def unigram_style_tokenizer(vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """A SentencePiece Unigram tokenizer with byte fallback and the Metaspace pre-tokenizer and
    decoder, as a generic ``PreTrainedTokenizerFast(tokenizer_object=...)``: Llama's special
    tokens, a ``<s>`` BOS prepended, no padding token. Cached: copy it before changing it."""
    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = TRAINING_SPLIT
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, unk_token="<unk>", show_progress=False
    )
    backend.train_from_iterator(training_texts(), trainer=trainer)
    learned = [tuple(piece) for piece in json.loads(backend.to_str())["model"]["vocab"]]
    # The byte tokens stand for bytes of unknown characters, never for the text "<0x0A>" itself.
    lowest = min(score for _, score in learned) - 10.0
    pieces = _with_bytes(learned, [(token, lowest) for token in BYTE_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=metaspace_unigram(pieces), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def metaspace_unigram(pieces: list[tuple[str, float]]) -> Tokenizer:
    """A `tokenizers` Unigram over ``pieces`` with byte fallback, Metaspace pre-tokenizer and
    decoder, and a ``<s>`` prepended to every text."""
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    bos = [token for token, _ in pieces].index("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return tokenizer


def spelled_text(tokenizer, token_id: int) -> str:
    """The text of a SentencePiece-style token read from its spelling: ``▁`` is a space and
    ``<0xNN>`` one byte (a byte that is not a whole UTF-8 character reads ``"�"``)."""
    token = tokenizer.convert_ids_to_tokens(token_id)
    match = BYTE_TOKEN.fullmatch(token)
    if match:
        return bytes([int(match[1], 16)]).decode("utf-8", errors="replace")
    return token.replace("▁", " ")


def sentence_texts(tokenizer, text: str) -> list[str]:
    """The sentences of ``text`` (no special tokens), each read from its tokens' spelling."""
    encoding = tokenizer(text, add_special_tokens=False)
    sentences: list[str] = []
    for token_id, sentence in zip(encoding["input_ids"], encoding["sentence_ids"]):
        if sentence == len(sentences):
            sentences.append("")
        sentences[sentence] += spelled_text(tokenizer, token_id)
    return sentences


@pytest.fixture(scope="module", params=["llama_style", "unigram_style"])
def sp_tokenizer(request):
    """Each SentencePiece-style tokenizer, wrapped, with ``max_sentence_len=16``."""
    build = llama_style_tokenizer if request.param == "llama_style" else unigram_style_tokenizer
    return SentenceTokenizer.from_tokenizer(build(), max_sentence_len=16)


# ----------------------------------------------------------------------------- boundary table

# Pieces of a hand-made vocabulary and their flags: the `▁` spelling of a space, byte fallback
# (`<0x0A>` is a newline; `<0xE3>` alone is no character), quotes and brackets after marks,
# CJK marks and ellipses.
EXPECTED_FLAGS = {
    ".": ENDS | TRAILS,
    "▁.": ENDS,
    ",": ENDS | TRAILS,
    ',"': ENDS | TRAILS,
    '."': ENDS | TRAILS,
    ".)": ENDS | TRAILS,
    "?": ENDS | TRAILS,
    "▁?": ENDS,
    "!": ENDS | TRAILS,
    ";": ENDS | TRAILS,
    ":": ENDS | TRAILS,
    '"': TRAILS,
    "▁\"": 0,
    ")": TRAILS,
    "▁(": 0,
    "▁": TRAILS | BLANK | SPACE_END,
    "▁▁": TRAILS | BLANK | SPACE_END,
    "<0x0A>": ENDS | TRAILS | BLANK | SPACE_END,
    "<0x09>": TRAILS | BLANK | SPACE_END,
    "<0xE3>": 0,
    "<0x2E>": ENDS | TRAILS,
    "。": ENDS | TRAILS,
    "▁。": ENDS,
    "！": ENDS | TRAILS,
    "？": ENDS | TRAILS,
    "，": ENDS | TRAILS,
    "；": ENDS | TRAILS,
    "：": ENDS | TRAILS,
    "。」": ENDS | TRAILS,
    "”": TRAILS,
    "…": ENDS | TRAILS,
    "...": ENDS | TRAILS,
    "▁...": ENDS,
    "▁Hello": 0,
    "Hello": 0,
    "▁end.": ENDS,
    "a": 0,
    "▁a": 0,
}


def hand_made_pieces() -> list[str]:
    return _with_bytes(SPECIAL_TOKENS + [p for p in EXPECTED_FLAGS if p not in BYTE_TOKENS])


def hand_made_tokenizers() -> dict[str, object]:
    """The hand-made vocabulary behind the decoders of Llama-2 (strips the leading space of a
    text), Gemma (no prefix space) and a Metaspace Unigram."""
    vocab = {piece: i for i, piece in enumerate(hand_made_pieces())}
    unigram = metaspace_unigram([(piece, -1.0) for piece in vocab])
    return {
        "llama": LlamaTokenizerFast(vocab=vocab, merges=[], add_bos_token=True),
        "gemma": GemmaTokenizerFast(vocab=vocab, merges=[], bos_token="<s>", eos_token="</s>"),
        "unigram": PreTrainedTokenizerFast(tokenizer_object=unigram, bos_token="<s>", eos_token="</s>"),
    }


@pytest.mark.parametrize("kind", ["llama", "gemma", "unigram"])
def test_boundary_table_reads_the_sentencepiece_spelling(kind):
    tokenizer = hand_made_tokenizers()[kind]
    table = build_boundary_table(tokenizer)
    assert table.shape == (len(tokenizer),)
    got = {piece: int(table[tokenizer.convert_tokens_to_ids(piece)]) for piece in EXPECTED_FLAGS}
    assert got == EXPECTED_FLAGS
    for token in SPECIAL_TOKENS:
        assert table[tokenizer.convert_tokens_to_ids(token)] == 0
    # Decoded alone, `▁.` reads "." with Llama's decoder: the table must not read it that way.
    if kind == "llama":
        assert tokenizer.decode([tokenizer.convert_tokens_to_ids("▁.")]) == "."


def byte_level_spelling(piece: str) -> str:
    """The GPT-2 byte-level spelling of a SentencePiece-style piece: ``▁.`` is ``Ġ.``,
    ``<0x0A>`` is ``Ċ``."""
    match = BYTE_TOKEN.fullmatch(piece)
    data = bytes([int(match[1], 16)]) if match else piece.replace("▁", " ").encode()
    alphabet = bytes_to_unicode()
    return "".join(alphabet[b] for b in data)


def test_boundary_table_is_the_same_for_both_spellings():
    # The same pieces in the byte-level spelling (GPT-2, OPT, Llama-3, Qwen2) get the same flags.
    spelled = {byte_level_spelling(piece): flags for piece, flags in EXPECTED_FLAGS.items()}
    pieces = SPECIAL_TOKENS + sorted(set(bytes_to_unicode().values()) | set(spelled))
    backend = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    table = build_boundary_table(tokenizer)
    assert {piece: int(table[tokenizer.convert_tokens_to_ids(piece)]) for piece in spelled} == spelled


# ----------------------------------------------------------------------------- sentence cuts


def test_sentence_cuts_with_the_sentencepiece_spelling(sp_tokenizer):
    text = 'He said, "Hello there." Then he left.\nNext line? Yes: fine; ok! (Sure.) Done'
    sentences = sentence_texts(sp_tokenizer, text)
    # The first sentence starts with the space the tokenizer prepends to a text (`▁He`).
    assert "".join(sentences) == " " + text
    assert [s.strip(" ") for s in sentences] == [
        "He said,",
        '"Hello there."',
        "Then he left.\n",
        "Next line?",
        "Yes:",
        "fine;",
        "ok!",
        "(Sure.)",
        "Done",
    ]


def test_newlines_from_byte_fallback_end_sentences(sp_tokenizer):
    ids = sp_tokenizer("one\n\ntwo\r\nthree", add_special_tokens=False)["input_ids"]
    assert "<0x0A>" in sp_tokenizer.convert_ids_to_tokens(ids)
    assert sentence_texts(sp_tokenizer, "one\n\ntwo\r\nthree") == [" one\n\n", "two\r\n", "three"]


def test_spaces_and_ellipses_stay_with_the_sentence(sp_tokenizer):
    sentences = sentence_texts(sp_tokenizer, "Wait... what?!  No… ok")
    assert [s.strip(" ") for s in sentences] == ["Wait...", "what?!", "No…", "ok"]
    # Of the two spaces, `▁` stays with the sentence it follows, `▁No` opens the next one.
    assert sentences[1] == " what?! "


def test_cjk_punctuation_with_the_sentencepiece_spelling(sp_tokenizer):
    text = "你好。我很好！你呢？他说：走吧，好；是「是。」好"
    sentences = sentence_texts(sp_tokenizer, text)
    assert "".join(sentences) == " " + text
    assert [s[-1] for s in sentences] == ["。", "！", "？", "：", "，", "；", "」", "好"]


def test_bos_is_in_no_sentence_and_the_text_decodes_back(sp_tokenizer):
    text = 'He said, "Hello there." Then\n\nok. 你好。 Ünïcödé → 😀!'
    encoding = sp_tokenizer(text)
    ids, sentence_ids = encoding["input_ids"], encoding["sentence_ids"]
    assert ids[0] == sp_tokenizer.bos_token_id and sentence_ids[0] == -1
    assert min(sentence_ids[1:]) == 0 and sentence_ids[1:] == sorted(sentence_ids[1:])
    assert sp_tokenizer.decode(ids, skip_special_tokens=True) == text


# ----------------------------------------------------------------------------- from_tokenizer


@pytest.mark.parametrize("build", [llama_style_tokenizer, unigram_style_tokenizer])
def test_from_tokenizer_keeps_the_bos_and_special_tokens(build):
    original = build()
    wrapped = SentenceTokenizer.from_tokenizer(original, max_sentence_len=8)
    assert original.pad_token is None  # the original is left alone
    assert (wrapped.bos_token, wrapped.eos_token, wrapped.unk_token) == ("<s>", "</s>", "<unk>")
    assert (wrapped.bos_token_id, wrapped.eos_token_id, wrapped.unk_token_id) == (1, 2, 0)
    # No padding token: padding uses the EOS.
    assert wrapped.pad_token == "</s>" and wrapped.pad_token_id == 2
    assert wrapped.add_bos_token and not wrapped.add_eos_token
    assert len(wrapped) == len(original)
    texts = ["Hello there. Bye!", "One\ntwo, three"]
    for text in texts:
        assert wrapped(text)["input_ids"] == original(text)["input_ids"]
        assert wrapped(text)["input_ids"][0] == 1 and wrapped(text)["input_ids"][-1] != 2
    batch = wrapped(texts, padding=True, padding_side="left", return_tensors="pt")
    assert torch.equal(batch["sentence_ids"], wrapped.segment(batch["input_ids"], batch["attention_mask"]))
    assert (batch["sentence_ids"][batch["attention_mask"] == 0] == -1).all()
    # Another padding token can be asked for.
    assert SentenceTokenizer.from_tokenizer(original, pad_token="<unk>").pad_token_id == 0


def test_from_tokenizer_keeps_gemma_special_tokens():
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>"] + BYTE_TOKENS + ["▁", "H", "i", ".", "▁H", "▁Hi"]
    merges = [("▁", "H"), ("▁H", "i")]
    gemma = GemmaTokenizerFast(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, add_bos_token=True)
    wrapped = SentenceTokenizer.from_tokenizer(gemma)
    assert wrapped.special_tokens_map == gemma.special_tokens_map
    assert wrapped.pad_token_id == 0 and wrapped.eos_token_id == 1
    ids = [2] + gemma.convert_tokens_to_ids(["▁Hi", ".", "▁Hi"])
    assert wrapped(" Hi. Hi")["input_ids"] == gemma(" Hi. Hi")["input_ids"] == ids
    assert wrapped(" Hi. Hi")["sentence_ids"] == [-1, 0, 0, 1]


def test_from_tokenizer_without_an_eos_token_names_the_fix():
    vocab = {piece: i for i, piece in enumerate(hand_made_pieces())}
    no_eos = PreTrainedTokenizerFast(tokenizer_object=metaspace_unigram([(p, -1.0) for p in vocab]), bos_token="<s>")
    with pytest.raises(ValueError, match=r"no EOS token.*eos_token="):
        SentenceTokenizer.from_tokenizer(no_eos)
    wrapped = SentenceTokenizer.from_tokenizer(no_eos, eos_token="</s>")
    assert wrapped.eos_token_id == wrapped.pad_token_id == 2


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("loader", [SentenceTokenizer.from_pretrained, AutoTokenizer.from_pretrained])
def test_save_and_load(sp_tokenizer, loader, tmp_path):
    sp_tokenizer.save_pretrained(tmp_path)
    loaded = loader(tmp_path)
    assert type(loaded) is SentenceTokenizer and loaded.max_sentence_len == 16
    assert loaded.special_tokens_map == sp_tokenizer.special_tokens_map
    assert loaded.add_bos_token and not loaded.add_eos_token
    assert loaded.padding_side == sp_tokenizer.padding_side
    texts = ['He said, "Hi." Then\n\nok。', "  leading spaces. And <0x0A> spelled out", ""]
    for side in ("left", "right"):
        a = loaded(texts, padding=True, padding_side=side, return_tensors="pt")
        b = sp_tokenizer(texts, padding=True, padding_side=side, return_tensors="pt")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.decode(a["input_ids"][0], skip_special_tokens=True) == texts[0]
    assert torch.equal(loaded.boundary_table, sp_tokenizer.boundary_table)
