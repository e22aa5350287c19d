"""Reconstruction metrics on hand-computable cases, and the inputs they accept."""

from __future__ import annotations

import math

import datasets
import pytest
import torch
from torch.utils.data import DataLoader

from sentence_lm import SentenceVAEConfig, SentenceVAEModel
from sentence_lm.data import PaddingCollator, pad_sequences
from sentence_lm.metrics import reconstruct_sentences, reconstruction_metrics
from sentence_lm.modeling_sentence_vae import SentenceDecodeOutput


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
        batch = pad_sequences(rows, model.config.pad_token_id)
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
    loader = DataLoader(dataset, batch_size=3, collate_fn=PaddingCollator(model.config.pad_token_id))
    for source in (dataset, loader, [torch.tensor(s) for s in SENTENCES], iter(SENTENCES)):
        got = reconstruction_metrics(model, source, batch_size=2, show_progress=False)
        assert got["num_targets"] == N_TARGETS
        assert got["token_accuracy"] == pytest.approx(reference["token_accuracy"])
        assert got["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-4)
    assert reconstruction_metrics(model, SENTENCES, max_sentences=2, show_progress=False)["num_sentences"] == 2
    half = reconstruction_metrics(model.to(torch.bfloat16), SENTENCES, show_progress=False)
    assert half["num_targets"] == N_TARGETS and math.isfinite(half["perplexity"])
    assert len(reconstruct_sentences(model, SENTENCES)) == 4

