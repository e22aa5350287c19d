"""The quality benchmark (benchmarks/quality.py) end to end on a tiny text: OPT and the SLLM are
scored on the same validation tokens, trained on the same tokens, and the report has its fields."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sentence_lm.baseline import token_config_like, token_nll
from sentence_lm.corpus import default_corpus

QUALITY_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("sentence_lm_benchmarks_quality", QUALITY_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture()
def text_file(tmp_path):
    """About 300 lines of English prose: paragraphs separated by blank lines."""
    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(default_corpus()[:150]) + "\n", encoding="utf-8")
    return path


TINY = [
    "--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "2", "--ffn_dim", "64",
    "--vocab_size", "400", "--block_size", "64", "--max_sentence_len", "16",
    "--train_tokens", "1200", "--vae_train_tokens", "1500", "--batch_size", "8", "--vae_batch_size", "64",
    "--eval_batch_size", "16", "--max_reconstruction_sentences", "48", "--logging_steps", "1", "--threads", "1",
]  # fmt: skip


@pytest.fixture()
def restore_threads():
    """`main` sets torch's thread count (one thread here: predictable on a shared CPU); put it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quality_end_to_end(quality, text_file, tmp_path, restore_threads, monkeypatch):
    built = {}  # the first model each training function returns

    def keep(name, train):
        def wrapped(*args, **kwargs):
            model, record = train(*args, **kwargs)
            built.setdefault(name, model)
            return model, record

        return wrapped

    monkeypatch.setattr(quality, "train_baseline", keep("opt", quality.train_baseline))
    monkeypatch.setattr(quality, "train_sllm", keep("sllm", quality.train_sllm))
    out, report, json_path = tmp_path / "out", tmp_path / "QUALITY.md", tmp_path / "quality.json"
    results = quality.main(
        [*TINY, "--train_file", str(text_file), "--heads", "H1", "--output_dir", str(out), "--report", str(report),
         "--json", str(json_path)]
    )  # fmt: skip

    (dataset,) = results["datasets"]
    opt, opt_long, sllm = dataset["models"]
    assert (opt["model"], opt_long["model"], sllm["model"], sllm["heads"]) == ("OPT", "OPT+S1", "SLLM-H1", 1)

    # The baseline is the token model of the trained SLLM's backbone: family, shape, every setting,
    # vocabulary and special tokens (its positions count the block's tokens).
    like = token_config_like(built["sllm"].config, 64)
    like.use_cache = built["opt"].config.use_cache  # the Trainer sets it to args.use_cache
    assert built["opt"].config.to_dict() == like.to_dict()

    # The same validation tokens: every original token of every validation text (BOS excluded).
    settings = quality.settings_from_args(quality.parse_args([*TINY, "--heads", "H1"]))
    data = quality.prepare_data("again", text_file, True, settings, tmp_path / "again")
    expected = sum(n - 1 for n in data.texts["validation"]["length"])
    assert expected > 0
    assert opt["eval"]["num_tokens"] == sllm["eval"]["num_tokens"] == sllm["nll_parts"]["num_tokens"] == expected
    assert opt_long["eval"]["num_tokens"] == expected
    assert opt["eval"]["num_texts"] == sllm["eval"]["num_texts"] == dataset["validation_texts"]

    # The same training tokens: same steps over the same examples in the same order.
    assert opt["train"]["steps"] == sllm["train"]["steps"] == dataset["max_steps"]
    assert opt["train"]["train_tokens"] == sllm["train"]["train_tokens"] > 0
    assert sllm["vae_train"]["train_tokens"] > 0 and sllm["vae_train"]["steps"] == dataset["vae_max_steps"]
    # The second baseline saw about as many tokens as stage 1 and stage 2 together.
    assert opt_long["train"]["train_tokens"] > opt["train"]["train_tokens"]
    assert sllm["ratio_to_opt_with_stage1_tokens"] == pytest.approx(
        sllm["eval"]["nll_per_token"] / opt_long["eval"]["nll_per_token"]
    )

    # Numbers that fit together.
    for model in (opt, opt_long, sllm):
        assert math.isfinite(model["eval"]["nll_per_token"]) and model["eval"]["nll_per_token"] > 0
        assert model["eval"]["perplexity"] == pytest.approx(math.exp(model["eval"]["nll_per_token"]))
    parts = sllm["nll_parts"]
    assert parts["tokens"] + parts["eos"] + parts["stop"] == pytest.approx(sllm["eval"]["nll_per_token"])
    assert parts["eos"] > 0 and parts["stop"] > 0
    assert sllm["ratio_to_opt"] == pytest.approx(sllm["eval"]["nll_per_token"] / opt["eval"]["nll_per_token"])
    assert sllm["target_met"] == (sllm["ratio_to_opt"] <= 1.10)
    reconstruction = sllm["reconstruction"]
    assert 0 <= reconstruction["token_accuracy"] <= 1 and 0 <= reconstruction["exact_match"] <= 1
    assert reconstruction["num_sentences"] == 48

    # The JSON and Markdown reports.
    saved = json.loads(json_path.read_text())
    assert saved["datasets"][0]["models"][2]["eval"] == sllm["eval"]
    for key in ("command", "settings", "machine", "wall_seconds"):
        assert key in saved
    for key in ("torch", "transformers", "cpu", "torch_threads"):
        assert key in saved["machine"]
    text = report.read_text()
    for needle in ("| dataset | model |", "NLL/token", "perplexity", "ratio SLLM/OPT", "recon acc", "exact match",
                   "| text | OPT |", "| text | OPT+S1 |", "| text | SLLM-H1 |", "ratio vs OPT+S1",
                   "within 10% of OPT", "**text, SLLM-H1**", "Command:"):  # fmt: skip
        assert needle in text, needle
    assert ("target met" in text) or ("target NOT met" in text)


def test_token_nll_is_the_causal_lm_loss_over_every_token_after_bos(quality, tokenizer):
    """`token_nll` (OPT's figure here) sums cross-entropy over the predicted tokens 1..n of each text (one BOS each) and
    divides by their count: for one text it is OPT's own causal-LM loss."""
    settings = quality.QualitySettings(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64)
    model = AutoModelForCausalLM.from_config(token_config_like(quality.sentence_opt_config(tokenizer, settings)))
    texts = [tokenizer(t)["input_ids"] for t in ("One small text. With two sentences.", "Another, longer one here.")]
    rows = [{"input_ids": ids} for ids in texts]
    both = token_nll(model, rows, None, batch_size=2, show_progress=False)
    assert both["num_tokens"] == sum(len(ids) - 1 for ids in texts)
    sums = []
    for ids in texts:
        one = token_nll(model, [{"input_ids": ids}], None, show_progress=False)
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
        assert one["nll_per_token"] == pytest.approx(float(loss), rel=1e-5)
        sums.append(one["nll_per_token"] * one["num_tokens"])
    # Right padding of the batch changes nothing: a sum over tokens, not a mean of means.
    assert both["nll_per_token"] == pytest.approx(sum(sums) / both["num_tokens"], rel=1e-5)


def test_steps_for_token_budget(quality):
    assert quality.steps_for(1000, 10, 10.0) == 10
    assert quality.steps_for(1001, 10, 10.0) == 11
    assert quality.steps_for(1, 10, 10.0) == 1
