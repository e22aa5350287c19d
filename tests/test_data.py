"""The data pipeline (paragraphs -> text examples -> sentences), the pad helper and the collator."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from sentence_lm.corpus import default_corpus
from sentence_lm.data import (
    DataArguments,
    PaddingCollator,
    first_tokens,
    load_texts,
    pad_sequences,
    split_into_sentences,
    tokenize_texts,
)

MAX_LEN = 16  # the `tokenizer` fixture's max_sentence_len


@pytest.fixture(scope="module")
def paragraphs():
    return default_corpus()[:40]


def texts_dataset(texts):
    return datasets.Dataset.from_dict({"text": list(texts)})


# ------------------------------------------------------------------------------ data pipeline
def test_text_examples_fit_the_block_and_keep_every_token(tokenizer, paragraphs):
    block = 64
    examples = tokenize_texts(texts_dataset(paragraphs), tokenizer, block, MAX_LEN)
    bos = tokenizer.bos_token_id
    assert len(examples) > len(paragraphs) / 4
    for row in examples:
        assert 2 <= len(row["input_ids"]) <= block
        assert row["input_ids"][0] == bos and bos not in row["input_ids"][1:]
        assert row["attention_mask"] == [1] * len(row["input_ids"])
        assert row["length"] == len(row["input_ids"])
    # Without joining, each paragraph's pieces give back exactly the paragraph's ids, and every
    # cut falls on a sentence start.
    unjoined = tokenize_texts(texts_dataset(paragraphs), tokenizer, block, MAX_LEN, join_paragraphs=False)
    pieces = iter(unjoined["input_ids"])
    chunked = 0
    for text in paragraphs:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        starts = tokenizer.segment(torch.tensor(ids))
        starts = {0} | {i for i in range(1, len(ids)) if starts[i] != starts[i - 1]}
        got, cuts = [], []
        while len(got) < len(ids):
            cuts.append(len(got))
            got += next(pieces)[1:]
        assert got == ids
        assert set(cuts) <= starts
        chunked += len(cuts) > 1
    assert chunked > 0, "no paragraph was long enough to be cut: make the block smaller"
    assert next(pieces, None) is None


def test_joined_paragraphs_decode_back_to_the_text(tokenizer, paragraphs):
    short = [p for p in paragraphs if len(tokenizer(p)["input_ids"]) < 120][:12]
    examples = tokenize_texts(texts_dataset(short), tokenizer, 256, MAX_LEN)
    assert 1 <= len(examples) < len(short)  # several paragraphs per example
    decoded = [tokenizer.decode(ids, skip_special_tokens=True) for ids in examples["input_ids"]]
    assert "\n\n".join(decoded) == "\n\n".join(short)


def test_block_size_must_hold_a_sentence(tokenizer, paragraphs):
    with pytest.raises(ValueError, match="block_size"):
        tokenize_texts(texts_dataset(paragraphs[:2]), tokenizer, MAX_LEN, MAX_LEN)


def test_sentences_round_trip_to_the_text_ids(tokenizer, paragraphs):
    examples = tokenize_texts(texts_dataset(paragraphs), tokenizer, 128, MAX_LEN)
    sentences = split_into_sentences(examples, tokenizer, MAX_LEN)
    special = set(tokenizer.all_special_ids)
    assert len(sentences) > len(examples)
    for row in sentences:
        assert 1 <= len(row["input_ids"]) <= MAX_LEN
        assert row["length"] == len(row["input_ids"])
        assert not special & set(row["input_ids"])
    # Sentences come out text by text, in order: their concatenation is every text's ids minus BOS.
    flat_sentences = [t for ids in sentences["input_ids"] for t in ids]
    flat_texts = [t for ids in examples["input_ids"] for t in ids[1:]]
    assert flat_sentences == flat_texts
    # Per text, the sentences are the tokenizer's own segmentation.
    first = examples[0]["input_ids"]
    sentence_ids = tokenizer.segment(torch.tensor(first))
    n = int(sentence_ids.max()) + 1
    expected = [[t for t, s in zip(first, sentence_ids.tolist()) if s == k] for k in range(n)]
    assert sentences["input_ids"][:n] == expected



# ------------------------------------------------------------------------------ padding, collator
def test_collator_pads_right(tokenizer):
    features = [{"input_ids": [5, 6, 7], "length": 3}, {"input_ids": [8], "length": 1}]
    batch = PaddingCollator(tokenizer.pad_token_id)(features)
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert pad_sequences([[4]], 1)["input_ids"].tolist() == [[4]]
    assert pad_sequences([], 1)["input_ids"].shape == (0, 0)
    assert torch.equal(PaddingCollator.from_tokenizer(tokenizer)(features)["input_ids"], batch["input_ids"])
    with pytest.raises(ValueError, match="go together"):
        PaddingCollator(tokenizer.pad_token_id, max_sentence_len=MAX_LEN)


def test_collator_cuts_texts_into_the_presegmented_sentences(tokenizer, paragraphs):
    examples = tokenize_texts(texts_dataset(paragraphs[:6]), tokenizer, 128, MAX_LEN)
    sentences = split_into_sentences(examples, tokenizer, MAX_LEN)
    packing = PaddingCollator.from_tokenizer(tokenizer, MAX_LEN, return_index=True)
    packed = packing([examples[i] for i in range(len(examples))])
    padded = PaddingCollator(tokenizer.pad_token_id)([sentences[i] for i in range(len(sentences))])
    assert torch.equal(packed["input_ids"], padded["input_ids"])
    assert torch.equal(packed["attention_mask"], padded["attention_mask"])
    assert packed["batch_index"].tolist() == sorted(packed["batch_index"].tolist())
    assert int(packed["batch_index"].max()) == len(examples) - 1
    # Left padding of the texts and missing attention masks change nothing.
    left = [{"input_ids": examples[i]["input_ids"]} for i in range(len(examples))]
    assert torch.equal(packing(left)["input_ids"], packed["input_ids"])


# ------------------------------------------------------------------------------ raw text
def test_load_texts_splits_off_the_last_lines(tmp_path):
    lines = [f"Paragraph {i} line one,\nand line two." for i in range(20)]
    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(lines) + "\n")
    raw = load_texts(DataArguments(train_file=str(path), validation_split_percentage=10))
    assert raw["train"]["text"][0] == "Paragraph 0 line one,\nand line two."
    assert raw["validation"]["text"][-1] == "Paragraph 19 line one,\nand line two."
    assert len(raw["train"]) + len(raw["validation"]) == 20 and len(raw["validation"]) in (1, 2, 3)
    unwrapped = load_texts(DataArguments(train_file=str(path), keep_linebreaks=False))
    assert unwrapped["train"]["text"][0] == "Paragraph 0 line one, and line two."
    default = load_texts(DataArguments())
    assert len(default["validation"]) >= 1 and len(default["train"]) > 9 * len(default["validation"]) - 9


def test_load_texts_from_a_dataset(tmp_path):
    # A local folder stands in for a hub dataset: `datasets.load_dataset` reads its JSON lines.
    rows = [{"text": f"Row {i}, first paragraph.\n\nRow {i}, second paragraph.", "id": i} for i in range(10)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    raw = load_texts(DataArguments(dataset_name=str(tmp_path), validation_split_percentage=20))
    assert raw["train"]["text"][:2] == ["Row 0, first paragraph.", "Row 0, second paragraph."]
    assert raw["validation"]["text"] == [f"Row {i}, {w} paragraph." for i in (8, 9) for w in ("first", "second")]
    assert raw["train"].column_names == ["text"]
    with pytest.raises(ValueError, match="text_column"):
        load_texts(DataArguments(dataset_name=str(tmp_path), text_column="body"))


def test_first_tokens_counts_the_scored_tokens_of_each_text():
    """The first rows that hold at least N tokens besides each row's first (its BOS)."""
    texts = datasets.Dataset.from_dict({"length": [5, 5, 5]})
    assert len(first_tokens(texts, 4)) == 1 and len(first_tokens(texts, 5)) == 2  # 4 scored tokens a row
    assert len(first_tokens(texts, 100)) == 3 and first_tokens(texts, None) is texts
