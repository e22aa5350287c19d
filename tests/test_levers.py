"""The SentenceVAE's quality levers (issue 17): several memory vectors, the sentence vector added
to the decoder's inputs, the bag-of-words loss and word dropout; each against a reference written here, through save/load and through generation;
and benchmarks/levers.py (both stages) run for a few steps on a tiny Llama."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import encode, load_script, tiny_sentence_opt

from sentence_lm import SentenceVAEConfig, SentenceVAEModel, learning_curves
from sentence_lm.corpus import default_corpus
from sentence_lm.decoding import causal_key_mask

TINY = dict(vocab_size=97, hidden_size=32, num_attention_heads=4, ffn_dim=64, max_sentence_len=12, dropout=0.0)


def tiny_vae(**fields) -> SentenceVAEModel:
    """A tiny random SentenceVAE; with ``condition_inputs`` its input projection is random too
    (it starts at zero), so that the tests see it."""
    torch.manual_seed(0)
    model = SentenceVAEModel(SentenceVAEConfig(**{**TINY, "init_std": 0.3, **fields})).eval()
    if model.decoder.input_proj is not None:
        with torch.no_grad():
            model.decoder.input_proj.weight.normal_(0, 0.3)
    return model


def test_input_conditioning_starts_as_a_decoder_without_it():
    model = SentenceVAEModel(SentenceVAEConfig(**TINY, condition_inputs=True)).eval()
    assert model.decoder.input_proj.weight.abs().max() == 0 == model.decoder.input_proj.bias.abs().max()
    ids, mask = packed()
    with torch.no_grad():
        logits = model(ids, mask).logits
        model.decoder.input_proj = None
        assert torch.equal(model(ids, mask).logits, logits)


def packed(n: int = 6, width: int = 9, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (n, width), generator=generator)
    lengths = torch.randint(1, width + 1, (n,), generator=generator)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    return ids.masked_fill(~mask, 1), mask


def reference_memory_logits(model: SentenceVAEModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits with the decoder's cross-attention written out: every position
    attends over the m memory vectors with its own query (plain softmax attention); with
    ``condition_inputs`` the vector's projection is added to every input first."""
    vectors = model.encode(ids, mask)
    m = model.config.num_memory_vectors
    memory = model.decoder.memory_proj(vectors).view(len(ids), m, -1) if m > 1 else vectors[:, None]
    bos = torch.full_like(ids[:, :1], model.config.bos_token_id)
    inputs = torch.cat([bos, ids], dim=1)
    steps = inputs.shape[1]
    hidden = model.embed_tokens(inputs) + model.decoder.embed_positions.table(torch.arange(steps))
    if model.config.condition_inputs:
        hidden = hidden + model.decoder.input_proj(vectors / 32**0.5)[:, None]
    heads = model.config.num_attention_heads
    split = lambda x: x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    causal = torch.ones(steps, steps, dtype=torch.bool).tril()
    for layer in model.decoder.layers:
        h = layer.self_attn_layer_norm(hidden)
        a = layer.self_attn
        scores = split(a.q_proj(h)) @ split(a.k_proj(h)).transpose(-1, -2) / (32 // heads) ** 0.5
        out = (scores.masked_fill(~causal, float("-inf")).softmax(-1) @ split(a.v_proj(h))).transpose(1, 2)
        hidden = hidden + a.out_proj(out.reshape(hidden.shape))
        c = layer.cross_attn
        q = split(c.q_proj(layer.cross_attn_layer_norm(hidden)))
        weights = (q @ split(c.k_proj(memory)).transpose(-1, -2) / (32 // heads) ** 0.5).softmax(-1)
        hidden = hidden + c.out_proj((weights @ split(c.v_proj(memory))).transpose(1, 2).reshape(hidden.shape))
        hidden = hidden + layer.ffn(layer.final_layer_norm(hidden))
    return model.lm_head(model.decoder.layer_norm(hidden))


@pytest.mark.parametrize(
    "fields", [dict(num_memory_vectors=4), dict(condition_inputs=True), dict(num_memory_vectors=4, condition_inputs=True)]
)
def test_memory_vectors_and_input_conditioning_match_a_written_out_decoder(fields):
    model = tiny_vae(num_decoder_layers=2, **fields)
    m = model.config.num_memory_vectors
    assert (model.decoder.memory_proj is None) == (m == 1)
    assert (model.decoder.input_proj is not None) == model.config.condition_inputs
    ids, mask = packed()
    with torch.no_grad():
        logits = model(ids, mask).logits
        expected = reference_memory_logits(model, ids, mask)
    real = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)  # BOS + the sentence's steps
    torch.testing.assert_close(logits[real], expected[real], rtol=1e-4, atol=1e-4)
    # The keys/values precomputed once per sentence give what attending to the memory at every
    # position gives (the path of training with attention dropout).
    vectors = model.encode(ids, mask)
    conditioning = model.decoder.conditioning(vectors)
    layer_shape = (6, 4, 64) if m > 1 else (6, 1, 32)
    assert [tuple(c.shape) for c in conditioning.cross] == [layer_shape] * 2
    assert (conditioning.inputs is not None) == model.config.condition_inputs
    torch.testing.assert_close(model.teacher_forced_states(ids, mask, vectors), expected_states(model, ids, mask))


def expected_states(model, ids, mask):
    vectors = model.encode(ids, mask)
    bos = torch.full_like(ids[:, :1], model.config.bos_token_id)
    inputs = torch.cat([bos, ids], dim=1)
    positions = torch.arange(inputs.shape[1]).expand(len(ids), -1)
    key_mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
    mask = causal_key_mask(positions[0], positions.shape[1], key_mask)
    return model.decoder(model.embed_tokens(inputs), positions, mask, model.decoder.conditioning(vectors, precompute=False))


@pytest.mark.parametrize("memory_vectors,condition_inputs", [(1, False), (3, False), (1, True)])
def test_greedy_decoding_with_and_without_cache_follows_the_teacher_forced_argmax(memory_vectors, condition_inputs):
    model = tiny_vae(num_memory_vectors=memory_vectors, condition_inputs=condition_inputs)
    ids, mask = packed()
    vectors = model.encode(ids, mask)
    cached = model.decode(vectors, max_new_tokens=8)
    uncached = model.decode(vectors, max_new_tokens=8, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    written = cached.sequences
    written_mask = torch.arange(written.shape[1])[None, :] < cached.lengths[:, None]
    with torch.no_grad():
        logits = model.teacher_forced_logits(written, written_mask, vectors)
    logits[:, 0, model.config.eos_token_id] = float("-inf")  # decode writes one token before EOS
    for row in range(len(ids)):
        steps = int(cached.lengths[row])
        assert torch.equal(logits[row, :steps].argmax(-1), written[row, :steps])


@pytest.mark.parametrize("fields", [dict(num_memory_vectors=3), dict(condition_inputs=True)])
def test_memory_vectors_save_load_and_sentence_lm_generation(tokenizer, tmp_path, fields):
    model = tiny_sentence_opt(tokenizer, sentence_vae=fields)
    enc = encode(tokenizer, ["The cat sat on the mat. It was warm", "Once upon a time"])
    out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    reference = model.generate(**enc, max_new_tokens=20, do_sample=False, use_cache=False)
    assert torch.equal(out, reference) and out.shape[1] > enc["input_ids"].shape[1]
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert all(getattr(loaded.config.sentence_vae, k) == v for k, v in fields.items())
    assert torch.equal(loaded.generate(**enc, max_new_tokens=20, do_sample=False), out)


def test_bag_of_words_loss_is_the_mean_token_nll_from_the_vector_alone():
    model = tiny_vae(bag_of_words_weight=0.5)
    plain = tiny_vae()
    ids, mask = packed()
    out = model(ids, mask)
    vectors = model.encode(ids, mask)
    log_probs = F.log_softmax(model.lm_head(model.bag_of_words_proj(vectors)), dim=-1)
    expected = -torch.cat([log_probs[i, ids[i][mask[i]]] for i in range(len(ids))]).mean()
    torch.testing.assert_close(out.bag_of_words_loss, expected)
    torch.testing.assert_close(out.loss, out.reconstruction_loss + 0.5 * expected)
    plain_out = plain(ids, mask)
    assert plain.bag_of_words_proj is None and plain_out.bag_of_words_loss is None and plain_out.reconstruction_loss is None
    # It trains the encoder: its gradient reaches the encoder's layers even with the decoder's loss left out.
    model.train()
    model(ids, mask).bag_of_words_loss.backward()
    assert model.encoder.layers[0].ffn.fc1.weight.grad.abs().sum() > 0
    assert model.decoder.layers[0].ffn.fc1.weight.grad is None


def test_parallel_readout_reads_every_position_from_the_vector_alone():
    model = tiny_vae(parallel_readout_weight=0.25, num_memory_vectors=2)
    ids, mask = packed()
    out = model(ids, mask)
    vectors = model.encode(ids, mask)
    targets = model.reconstruction_targets(ids, mask)
    # Written out: a query per position attends over the memory vectors, feed-forward, LayerNorm, logits.
    readout = model.parallel_readout
    memory = model.decoder.memory_proj(vectors).view(len(ids), 2, -1)
    queries = readout.queries.weight[: targets.shape[1]].expand(len(ids), -1, -1)
    hidden = queries + readout.attn(readout.attn_layer_norm(queries), key_value_states=memory)
    hidden = readout.layer_norm(hidden + readout.ffn(readout.final_layer_norm(hidden)))
    logits = model.lm_head(hidden)
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.parallel_readout_loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, out.reconstruction_loss + 0.25 * expected, rtol=1e-5, atol=1e-5)
    model.train()
    model(ids, mask).parallel_readout_loss.backward()
    assert model.encoder.layers[0].ffn.fc1.weight.grad.abs().sum() > 0
    assert model.decoder.layers[0].ffn.fc1.weight.grad is None  # the decoder plays no part in it
    assert tiny_vae().parallel_readout is None


def test_word_dropout_blanks_decoder_inputs_in_training_only():
    model = tiny_vae(word_dropout=0.5)
    plain = tiny_vae()
    ids = torch.randint(3, 97, (40, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids, dtype=torch.bool)  # no padding: every fed position after BOS is a word
    with torch.no_grad():
        # Evaluation: no word dropout, the same loss as without the setting.
        assert model(ids, mask).loss == plain(ids, mask).loss
        model.train()
        plain.train()
        fed = []
        original = model.decoder.forward

        def spy(inputs_embeds, *args, **kwargs):
            fed.append(inputs_embeds)
            return original(inputs_embeds, *args, **kwargs)

        model.decoder.forward = spy
        model(ids, mask)
    blank = model.embed_tokens.weight[model.config.pad_token_id]
    blanked = torch.cat([(e == blank).all(-1) for e in fed], dim=0)
    assert not blanked[:, 0].any()  # BOS is always fed
    share = blanked[:, 1:].float().mean()
    assert 0.35 < share < 0.65


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(num_memory_vectors=0), "num_memory_vectors"),
        (dict(word_dropout=1.0), "word_dropout"),
        (dict(bag_of_words_weight=-1.0), "bag_of_words_weight"),
        (dict(bag_of_words_weight=float("nan")), "bag_of_words_weight"),
        (dict(parallel_readout_weight=-0.5), "parallel_readout_weight"),
        (dict(condition_inputs=1), "condition_inputs"),
    ],
)
def test_bad_lever_values_are_refused_by_name(fields, message):
    with pytest.raises(ValueError, match=message):
        SentenceVAEConfig(**TINY, **fields)


def test_levers_benchmark_runs_both_stages_on_a_tiny_llama(tokenizer, tmp_path):
    from test_smollm2_script import _wikitext_like, tiny_llama

    levers = load_script("benchmarks/levers.py")
    paragraphs = [p for p in default_corpus() if p.strip()]
    (tmp_path / "train.txt").write_text(_wikitext_like(paragraphs), encoding="utf-8")
    tiny_llama(tmp_path / "tiny", tokenizer)
    common = [
        "--model", str(tmp_path / "tiny"), "--train_file", str(tmp_path / "train.txt"), "--device", "cpu",
        "--minutes", "0.01", "--curve_minutes", "0.005", "--train_paragraphs", str(len(paragraphs) - 10),
        "--selection_paragraphs", "10", "--block_size", "64", "--max_sentence_len", "16",
        "--output_dir", str(tmp_path / "runs"),
    ]  # fmt: skip
    stage1 = levers.main([
        *common, "--stage", "1", "--selection_sentences", "12", "--curve_sentences", "4", "--batch", "4",
        "--json", str(tmp_path / "stage1.json"), "--save_dir", str(tmp_path / "vaes"),
        "--variants", "baseline:;levers:num_memory_vectors=2,bag_of_words_weight=1.0,word_dropout=0.2,lr=1e-3,batch=2,freeze_embeddings=True,"
        "copy_layers=True",
    ])  # fmt: skip
    saved = json.loads((tmp_path / "stage1.json").read_text())
    assert [v["name"] for v in saved["variants"]] == ["baseline", "levers"]
    levers_run = saved["variants"][1]
    assert levers_run["config"] == {"num_memory_vectors": 2, "bag_of_words_weight": 1.0, "word_dropout": 0.2}
    assert levers_run["training"] == {"lr": 1e-3, "batch": 2, "freeze_embeddings": True, "copy_layers": True}
    assert saved["variants"][0]["training"] == {"lr": 5e-4, "batch": 4, "freeze_embeddings": False}
    for run in saved["variants"]:
        assert run["steps"] >= 1 and run["tokens"] > 0
        assert 0 <= run["selection"]["greedy_accuracy"] <= 1 and run["selection"]["nll"] > 0
        assert run["curve"][0]["step"] == 0 and run["curve"][-1]["step"] == run["steps"]
    assert saved["data"]["selection_examples"] == 12
    assert "| levers |" in levers.markdown(stage1)
    saved_vae = SentenceVAEModel.from_pretrained(tmp_path / "vaes" / "levers").config
    assert saved_vae.num_memory_vectors == 2 and saved_vae.gated_ffn and saved_vae.activation_function == "silu"

    stage2 = levers.main([
        *common, "--stage", "2", "--sentence_vae", str(tmp_path / "vaes" / "levers"), "--selection_tokens", "200",
        "--curve_tokens", "60", "--batch", "2", "--json", str(tmp_path / "stage2.json"),
        "--variants", "plain:;levers:freeze_backbone_steps=1,distill_weight=0.5,freeze_sentence_vae=True,"
                      "next_vector_weight=1.0,next_vector_objective=contrastive;"
                      "hidden:hidden_state_weight=1.0,teacher_condition_steps=1",
    ])  # fmt: skip
    runs = {r["name"]: r for r in stage2["variants"]}
    assert runs["levers"]["training"]["distill_weight"] == 0.5 and runs["levers"]["training"]["freeze_backbone_steps"] == 1
    assert runs["levers"]["training"]["next_vector_weight"] == 1.0
    assert runs["levers"]["training"]["next_vector_objective"] == "contrastive"
    assert runs["hidden"]["training"]["hidden_state_weight"] == 1.0
    assert runs["hidden"]["hidden_state_loss"] and not runs["plain"]["hidden_state_loss"]
    for run in runs.values():
        assert run["steps"] >= 1 and run["selection"]["nll"] > 0 and run["curve"][0]["step"] == 0
        scores = run["selection"]
        assert scores["context_gain"] == pytest.approx(scores["mean_nll"] - scores["predicted_nll"])
    assert stage2["data"]["selection_tokens"] >= 200
    assert "NLL/token" in levers.markdown(stage2)
    with pytest.raises(SystemExit, match="distinct"):
        levers.parse_variants("a:;a:lr=1", 1, 1e-3, 4)
    with pytest.raises(SystemExit, match="unknown stage-2 key"):
        levers.parse_variants("a:num_memory_vectors=2", 2, 1e-3, 4)
    with pytest.raises(SystemExit):
        levers.parse_args(["--stage", "2"])


def test_from_scratch_comparison_runs_and_fits_its_curves(tmp_path):
    from test_smollm2_script import _wikitext_like

    script = load_script("benchmarks/from_scratch.py")
    paragraphs = [p for p in default_corpus() if p.strip()]
    (tmp_path / "train.txt").write_text(_wikitext_like(paragraphs[:-15]), encoding="utf-8")
    (tmp_path / "valid.txt").write_text(_wikitext_like(paragraphs[-15:]), encoding="utf-8")
    valid = script.text_paragraphs(tmp_path / "valid.txt")  # scored as the training text is read: detokenised
    assert valid[0] == "= A Title =" and not any("@-@" in p or " ." in p for p in valid)
    (tmp_path / "plain.txt").write_text("One. Two - three.\n\nFour.", encoding="utf-8")
    assert script.text_paragraphs(tmp_path / "plain.txt") == ["One. Two - three.", "Four."]
    results = script.main([
        "--train_file", str(tmp_path / "train.txt"), "--validation_file", str(tmp_path / "valid.txt"),
        "--minutes", "0.04", "--curve_minutes", "0.01", "--eval_tokens", "400", "--curve_tokens", "100",
        "--vocab_size", "512", "--hidden_size", "32", "--num_layers", "1", "--ffn_dim", "64", "--block_size", "64",
        "--max_sentence_len", "16", "--batch", "4", "--stage1_batch", "16", "--device", "cpu",
        "--sentence_vae_config", "num_memory_vectors=2", "--output_dir", str(tmp_path / "runs"),
        "--json", str(tmp_path / "r.json"), "--report", str(tmp_path / "r.md"),
    ])  # fmt: skip
    models = results["models"]
    assert set(models) == {"token model", "SentenceLM"}
    for record in models.values():
        assert record["steps"] >= 1 and 0 < record["nll"] < 20 and record["curve"][0]["nll"] > 0
    assert models["SentenceLM"]["stage1_tokens"] > 0
    assert all(p["seconds"] >= 0.04 * 60 * 0.25 for p in models["SentenceLM"]["curve"])  # after stage 1
    assert json.loads((tmp_path / "r.json").read_text())["eval_tokens"] >= 400
    assert "| SentenceLM |" in (tmp_path / "r.md").read_text()
    fit = learning_curves.power_law([{"tokens": 10, "nll": 4.0}, {"tokens": 100, "nll": 2.0}], "tokens")
    assert fit["b"] == pytest.approx(math.log10(2)) and fit["a"] * 10 ** -fit["b"] == pytest.approx(4.0)
    crossing = learning_curves.meeting({"a": 8.0, "b": 0.2}, {"a": 4.0, "b": 0.1}, budget=10.0)
    assert crossing["cross"] == pytest.approx(2 ** 10) and crossing["gap_at_10x"] > 0  # 10x = 100: not there yet
    assert learning_curves.meeting({"a": 8.0, "b": 0.2}, {"a": 4.0, "b": 0.1}, budget=2000.0)["cross"] is None  # behind us
    # Nearly equal exponents: the crossing lies beyond any float (no OverflowError).
    assert learning_curves.meeting({"a": 8.0, "b": 0.1 + 1e-9}, {"a": 4.0, "b": 0.1}, budget=10.0)["cross"] == math.inf
    with pytest.raises(SystemExit):
        script.parse_args(["--stage1_share", "1"])


def test_each_plotted_curve_and_its_fit_share_a_colour_of_their_own(tmp_path, monkeypatch):
    plt = pytest.importorskip("matplotlib.pyplot")
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    curves = {f"run {i}": [{"tokens": 10, "seconds": 1, "nll": 5.0 + i}, {"tokens": 100, "seconds": 9, "nll": 4.0 + i}]
              for i in range(12)}  # fmt: skip
    fits = {name: {"tokens": learning_curves.power_law(c, "tokens"), "seconds": learning_curves.power_law(c, "seconds")}
            for name, c in curves.items()}  # fmt: skip
    assert learning_curves.plot_curves(curves, fits, tmp_path / "c.png") and (tmp_path / "c.png").is_file()
    for ax in figures[0].axes:
        lines = ax.get_lines()
        assert len(lines) == 24  # a curve, then its fit
        colours = [lines[i].get_color() for i in range(0, 24, 2)]
        assert colours == [lines[i + 1].get_color() for i in range(0, 24, 2)] and len(set(map(str, colours))) == 12


def test_conversion_study_runs_every_step_and_reports_minutes_to_the_token_model(tmp_path):
    from test_smollm2_script import _wikitext_like

    script = load_script("benchmarks/conversion_study.py")
    paragraphs = [p for p in default_corpus() if p.strip()]
    (tmp_path / "train.txt").write_text(_wikitext_like(paragraphs[:-15]), encoding="utf-8")
    (tmp_path / "valid.txt").write_text(_wikitext_like(paragraphs[-15:]), encoding="utf-8")
    common = [
        "--workdir", str(tmp_path / "study"), "--train_file", str(tmp_path / "train.txt"),
        "--validation_file", str(tmp_path / "valid.txt"), "--selection_paragraphs", "10", "--curve_minutes", "0.01",
        "--eval_tokens", "300", "--curve_tokens", "100", "--vocab_size", "512", "--hidden_size", "32",
        "--num_layers", "1", "--ffn_dim", "64", "--block_size", "64", "--max_sentence_len", "16", "--batch", "4",
        "--stage1_batch", "16", "--device", "cpu", "--output_dir", str(tmp_path / "runs"),
    ]  # fmt: skip
    pretrained = script.main(["pretrain", *common, "--minutes", "0.03"])
    assert (tmp_path / "study" / "token_model" / "model.safetensors").is_file() and pretrained["steps"] >= 1
    for recipe, name in (("token", "token"), ("scratch", "scratch"),
                         ("convert:hidden_state_weight=1.0,teacher_condition_steps=1,copy_layers=True", "hidden"),
                         ("convert:top_k_weight=1.0,top_k=4,copy_layers=last", "topk")):  # fmt: skip
        record = script.main(["run", *common, "--recipe", recipe, "--name", name, "--minutes", "0.03"])
        assert record["steps"] >= 1 and 0 < record["valid_nll"] < 20 and record["curve"][0]["nll"] > 0
        assert record["generation_tokens_per_s"] > 0
    hidden = json.loads((tmp_path / "study" / "runs" / "hidden.json").read_text())
    assert hidden["training"] == {"hidden_state_weight": 1.0, "teacher_condition_steps": 1, "copy_layers": True}
    assert hidden["curve"][0]["seconds"] >= pretrained["seconds"]  # the pretraining is counted
    results = script.main(["report", *common, "--report", str(tmp_path / "r.md"), "--json", str(tmp_path / "r.json")])
    assert [r["name"] for r in results["rows"]] == ["pretrain", "hidden", "scratch", "token", "topk"]
    assert json.loads((tmp_path / "study" / "runs" / "topk.json").read_text())["cache_seconds"] > 0
    assert "| hidden |" in (tmp_path / "r.md").read_text()
    # Minutes to reach a target: from the curve where it gets there, else from the power law.
    record = {"offset_seconds": 60.0, "curve": [{"seconds": 60.0, "nll": 5.0, "tokens": 1},
                                                {"seconds": 120.0, "nll": 3.0, "tokens": 2}]}  # fmt: skip
    assert script.minutes_to_reach(record, 4.0) == (0.5, "reached")
    assert script.minutes_to_reach(record, 2.0)[1] in ("fit", "never (flat fit)")
    with pytest.raises(SystemExit, match="unknown key"):
        script.parse_recipe("convert:no_such_field=1")
    with pytest.raises(SystemExit, match="takes no keys"):
        script.parse_recipe("token:lr=1")
    with pytest.raises(SystemExit, match="separate levers"):
        script.parse_recipe("convert:distill_weight=1,hidden_state_weight=1")
    with pytest.raises(SystemExit, match="separate levers"):
        script.parse_recipe("convert:top_k_weight=1,teacher_condition_steps=5")
    with pytest.raises(SystemExit, match="copy_layers must be"):
        script.parse_recipe("convert:copy_layers=middle")
