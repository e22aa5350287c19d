"""Stage-1 training plumbing: data pipeline (paragraphs -> text examples -> sentences),
collators, reconstruction metrics on hand-computable cases, and a short end-to-end run of
``train_sentence_vae`` (train, save, reload, resume)."""

from __future__ import annotations

import json
import math

import datasets
import pytest
import torch
from torch.utils.data import DataLoader

from sentence_lm import SentenceVAEConfig, SentenceVAEModel
from sentence_lm.corpus import default_corpus
from sentence_lm.metrics import reconstruct_sentences, reconstruction_metrics
from sentence_lm.modeling_sentence_vae import SentenceDecodeOutput
from sentence_lm.tokenization_sentence_lm import SentenceTokenizer
from sentence_lm.training import (
    DataArguments,
    SentenceCollator,
    SentencePackingCollator,
    TimeBudgetCallback,
    load_texts,
    pad_sentences,
    parse_sentence_vae_args,
    split_into_sentences,
    tokenize_texts,
    train_sentence_vae,
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


def test_sentence_collator_pads_right(tokenizer):
    features = [{"input_ids": [5, 6, 7], "length": 3}, {"input_ids": [8], "length": 1}]
    batch = SentenceCollator(tokenizer.pad_token_id)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long
    assert pad_sentences([[4]], 1)["input_ids"].tolist() == [[4]]


def test_packing_collator_matches_presegmented_sentences(tokenizer, paragraphs):
    examples = tokenize_texts(texts_dataset(paragraphs[:6]), tokenizer, 128, MAX_LEN)
    sentences = split_into_sentences(examples, tokenizer, MAX_LEN)
    packing = SentencePackingCollator.from_tokenizer(tokenizer, MAX_LEN, return_index=True)
    packed = packing([examples[i] for i in range(len(examples))])
    padded = SentenceCollator(tokenizer.pad_token_id)([sentences[i] for i in range(len(sentences))])
    assert torch.equal(packed["input_ids"], padded["input_ids"])
    assert torch.equal(packed["attention_mask"], padded["attention_mask"])
    assert packed["batch_index"].tolist() == sorted(packed["batch_index"].tolist())
    assert int(packed["batch_index"].max()) == len(examples) - 1
    # Left padding of the texts and missing attention masks change nothing.
    left = [{"input_ids": examples[i]["input_ids"]} for i in range(len(examples))]
    assert torch.equal(packing(left)["input_ids"], packed["input_ids"])


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


def test_parse_args_takes_training_arguments():
    model_args, data_args, training_args = parse_sentence_vae_args(
        ["--output_dir", "x", "--max_steps", "7", "--hidden_size", "64", "--block_size", "100", "--eval_strategy", "steps"]
    )
    assert model_args.hidden_size == 64 and data_args.block_size == 100
    assert training_args.max_steps == 7 and training_args.eval_strategy == "steps"
    assert training_args.remove_unused_columns is False and training_args.prediction_loss_only


def test_time_budget_callback_stops_training():
    from transformers import TrainerControl, TrainerState

    state, control = TrainerState(), TrainerControl()
    state.global_step = 3
    patient = TimeBudgetCallback(max_seconds=3600)
    patient.on_train_begin(None, state, control)
    assert not patient.on_step_end(None, state, control).should_training_stop
    hasty = TimeBudgetCallback(max_seconds=0)
    hasty.on_train_begin(None, state, control)
    control = hasty.on_step_end(None, state, control)
    assert control.should_training_stop and control.should_save and hasty.stopped_at_step == 3


# ------------------------------------------------------------------------------ metrics
def tiny_model(**overrides) -> SentenceVAEModel:
    torch.manual_seed(0)
    fields = dict(
        vocab_size=64, hidden_size=16, num_attention_heads=2, ffn_dim=32, max_sentence_len=6, dropout=0.0
    )
    fields.update(overrides)
    return SentenceVAEModel(SentenceVAEConfig(**fields))


SENTENCES = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15], [20]]  # the third one has max_sentence_len tokens
N_TARGETS = 3 + 2 + 6 + 1 + 4  # tokens + one EOS per sentence


def patch_decoder(monkeypatch, model, edit=None):
    """Make ``model.decode`` write back exactly the sentences last given to ``encode``, changed by
    ``edit(rows) -> (rows, ended)`` when given."""
    seen = {}
    real_encode = model.encode

    def encode(input_ids, attention_mask=None):
        seen["rows"] = [ids[m].tolist() for ids, m in zip(input_ids, attention_mask.bool())]
        return real_encode(input_ids, attention_mask)

    def decode(vectors, max_new_tokens=None, **kwargs):
        rows = seen["rows"]
        ended = [len(r) < model.config.max_sentence_len for r in rows]
        if edit is not None:
            rows, ended = edit(rows, ended)
        batch = pad_sentences(rows, model.config.pad_token_id)
        return SentenceDecodeOutput(
            sequences=batch["input_ids"], lengths=torch.tensor([len(r) for r in rows]), ended=torch.tensor(ended)
        )

    monkeypatch.setattr(model, "encode", encode)
    monkeypatch.setattr(model, "decode", decode)


def test_perfect_reconstruction_scores_one(monkeypatch):
    model = tiny_model()
    patch_decoder(monkeypatch, model)
    metrics = reconstruction_metrics(model, SENTENCES, batch_size=3, show_progress=False)
    assert metrics["token_accuracy"] == 1.0 and metrics["exact_match"] == 1.0
    assert metrics["num_sentences"] == 4 and metrics["num_tokens"] == 12 and metrics["num_targets"] == N_TARGETS
    assert 1.0 < metrics["perplexity"] and math.isclose(metrics["perplexity"], math.exp(metrics["nll"]))


def test_errors_are_counted_position_by_position(monkeypatch):
    def edit(rows, ended):
        rows = [list(r) for r in rows]
        if rows[0] == [5, 6, 7]:
            rows[0][1] = 30  # one wrong token
            rows[1] = rows[1] + [9]  # one extra token: the EOS position is wrong
            ended[3] = False  # stopped without EOS
        return rows, ended

    model = tiny_model()
    patch_decoder(monkeypatch, model, edit)
    metrics = reconstruction_metrics(model, SENTENCES, batch_size=8, show_progress=False)
    assert metrics["token_accuracy"] == pytest.approx((N_TARGETS - 3) / N_TARGETS)
    # The full-length third sentence has no EOS written but is closed by the length cap.
    assert metrics["exact_match"] == pytest.approx(1 / 4)


def test_uniform_logits_give_vocabulary_perplexity(monkeypatch):
    model = tiny_model()
    monkeypatch.setattr(
        model,
        "teacher_forced_logits",
        lambda ids, mask, vectors: torch.zeros(ids.shape[0], ids.shape[1] + 1, model.config.vocab_size),
    )
    metrics = reconstruction_metrics(model, SENTENCES, show_progress=False)
    assert metrics["perplexity"] == pytest.approx(model.config.vocab_size)
    assert metrics["teacher_forced_accuracy"] == 0.0  # argmax is id 0, never a target


def test_metrics_accept_datasets_loaders_and_dtypes():
    model = tiny_model()
    model.train()
    reference = reconstruction_metrics(model, SENTENCES, show_progress=False)
    assert model.training  # mode restored
    for name in ("token_accuracy", "exact_match", "teacher_forced_accuracy"):
        assert 0.0 <= reference[name] <= 1.0
    dataset = datasets.Dataset.from_dict({"input_ids": SENTENCES, "length": [len(s) for s in SENTENCES]})
    loader = DataLoader(dataset, batch_size=3, collate_fn=SentenceCollator(model.config.pad_token_id))
    for source in (dataset, loader, [torch.tensor(s) for s in SENTENCES], iter(SENTENCES)):
        got = reconstruction_metrics(model, source, batch_size=2, show_progress=False)
        assert got["num_targets"] == N_TARGETS
        assert got["token_accuracy"] == pytest.approx(reference["token_accuracy"])
        assert got["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-4)
    assert reconstruction_metrics(model, SENTENCES, max_sentences=2, show_progress=False)["num_sentences"] == 2
    half = reconstruction_metrics(model.to(torch.bfloat16), SENTENCES, show_progress=False)
    assert half["num_targets"] == N_TARGETS and math.isfinite(half["perplexity"])
    assert len(reconstruct_sentences(model, SENTENCES)) == 4


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text("\n\n".join(default_corpus()[:60]) + "\n")
    return path


def tiny_run_args(text_file, output_dir, *extra):
    return [
        "--train_file", str(text_file),
        "--output_dir", str(output_dir),
        "--vocab_size", "400",
        "--hidden_size", "32",
        "--num_attention_heads", "2",
        "--ffn_dim", "64",
        "--max_sentence_len", "16",
        "--block_size", "64",
        "--per_device_train_batch_size", "32",
        "--learning_rate", "5e-3",
        "--warmup_steps", "0",
        "--logging_steps", "5",
        "--seed", "0",
        "--disable_tqdm", "True",
        "--max_reconstruction_sentences", "64",
        "--num_reconstruction_examples", "2",
        *extra,
    ]  # fmt: skip


def test_train_sentence_vae_end_to_end(text_file, tmp_path, capsys):
    out = tmp_path / "svae"
    result = train_sentence_vae(tiny_run_args(text_file, out, "--max_steps", "30", "--save_steps", "15"))

    curve = result["loss_curve"]
    assert len(curve) >= 4 and curve[-1][1] < curve[0][1] - 0.5
    metrics = result["reconstruction"]
    for name in ("token_accuracy", "exact_match", "teacher_forced_accuracy"):
        assert 0.0 <= metrics[name] <= 1.0
    assert metrics["num_sentences"] == 64 and metrics["num_targets"] == metrics["num_tokens"] + 64
    assert 1.0 < metrics["perplexity"] < 400 and math.isfinite(result["eval"]["eval_loss"])
    assert json.loads((out / "reconstruction_metrics.json").read_text())["num_sentences"] == 64
    assert len(result["examples"]) == 2
    assert "held-out reconstruction" in capsys.readouterr().out
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert (out / "checkpoint-15").is_dir() and (out / "checkpoint-30").is_dir()

    # The saved model and tokenizer reload and reproduce the reported metrics.
    tokenizer = SentenceTokenizer.from_pretrained(out)
    model = SentenceVAEModel.from_pretrained(out)
    assert len(tokenizer) == model.config.vocab_size == 400 and model.config.max_sentence_len == 16
    assert torch.equal(model.boundary_table[: len(tokenizer)], tokenizer.boundary_table)
    raw = load_texts(DataArguments(train_file=str(text_file)))
    held_out = split_into_sentences(tokenize_texts(raw["validation"], tokenizer, 64, 16), tokenizer, 16)
    again = reconstruction_metrics(model, held_out.select(range(64)), show_progress=False)
    assert again["token_accuracy"] == pytest.approx(metrics["token_accuracy"])
    assert again["perplexity"] == pytest.approx(metrics["perplexity"], rel=1e-4)

    # Resuming from a checkpoint reuses its tokenizer and continues the step count.
    resumed = train_sentence_vae(
        tiny_run_args(
            text_file, out, "--max_steps", "32", "--resume_from_checkpoint", str(out / "checkpoint-30"),
            "--save_strategy", "no", "--do_eval", "False",
        )
    )  # fmt: skip
    assert resumed["global_step"] == 32
    assert SentenceTokenizer.from_pretrained(out).get_vocab() == tokenizer.get_vocab()
