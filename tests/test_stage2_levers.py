"""Stage-2 levers (issue 17): distillation of a token model's next-token distributions into the
SentenceLM's token scores, and a warm-up with the backbone frozen; through the Trainer and
through the stage-2 command line (`train_sentence_opt`)."""

from __future__ import annotations

import datasets
import pytest
import torch
import torch.nn.functional as F
from test_training_sentence_opt import backbone_arguments, text_file  # noqa: F401 (fixtures)
from transformers import AutoModelForCausalLM, TrainingArguments

from sentence_lm import SentenceLMForCausalLM
from sentence_lm.data import PaddingCollator, tokenize_texts
from sentence_lm.distillation import DistillationTrainer, FrozenBackboneWarmup, token_distillation_loss
from sentence_lm.trainer import SentenceLMTrainer
from sentence_lm.training_sentence_opt import train_sentence_opt


def test_distillation_loss_is_the_mean_kl_at_the_scored_positions():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    p = F.softmax(teacher / 2, -1)
    kl = (p * (p.log() - F.log_softmax(student / 2, -1))).sum(-1)
    torch.testing.assert_close(token_distillation_loss(student, teacher, mask, temperature=2.0), kl[mask].mean() * 4)
    assert token_distillation_loss(teacher, teacher, mask).abs() < 1e-6
    assert token_distillation_loss(student, teacher, torch.zeros_like(mask)) == 0


@pytest.fixture()
def setup(llama_dir):
    teacher = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    torch.manual_seed(0)
    model = SentenceLMForCausalLM.from_pretrained_backbone(llama_dir, sentence_vae_config=dict(max_sentence_len=16))
    from datasets import Dataset

    from sentence_lm.corpus import default_corpus

    texts = tokenize_texts(Dataset.from_dict({"text": default_corpus()[:40]}), model.tokenizer, 64, 16)
    return teacher, model, texts


def trainer_of(cls, model, texts, tmp_path, steps, **levers):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, learning_rate=3e-3,
                             logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=0)  # fmt: skip
    return cls(model=model, args=args, train_dataset=texts, data_collator=PaddingCollator(model.config.pad_token_id), **levers)


def distillation_gap(model, teacher, batch) -> float:
    model.eval()
    with torch.no_grad():
        student = model(**batch, logits_to_keep=0).logits
        target = teacher(**batch).logits
    mask = batch["attention_mask"].bool()
    scored = torch.zeros_like(mask)
    scored[:, :-1] = mask[:, :-1] & mask[:, 1:]
    model.train()
    return float(token_distillation_loss(student, target, scored))


def test_distillation_pulls_the_token_scores_towards_the_teacher(setup, tmp_path):
    teacher, model, texts = setup
    batch = PaddingCollator(model.config.pad_token_id)([texts[i] for i in range(4)])
    batch.pop("length", None)
    before = distillation_gap(model, teacher, batch)
    trainer = trainer_of(DistillationTrainer, model, texts, tmp_path, 8, teacher=teacher, distill_weight=5.0)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 8 and all(e["distill_loss"] >= 0 for e in logs)
    assert distillation_gap(model, teacher, batch) < 0.8 * before
    assert all(not p.requires_grad for p in trainer.teacher.parameters())


def test_a_teacher_with_another_vocabulary_is_refused(setup, tmp_path):
    teacher, model, texts = setup
    teacher.resize_token_embeddings(teacher.config.vocab_size + 8)
    with pytest.raises(ValueError, match="Cannot distil from a token model with .* output tokens into a SentenceLM"):
        trainer_of(DistillationTrainer, model, texts, tmp_path, 1, teacher=teacher)


def test_frozen_backbone_warmup_moves_the_backbone_only_after_its_steps(setup, tmp_path):
    """In one run of 4 steps with a 2-step warm-up: the backbone is unchanged after step 2 (the
    SentenceVAE has moved) and has moved by step 4, so the unfrozen weights were in the optimizer."""
    from transformers import TrainerCallback

    _, model, texts = setup
    backbone = model.model.backbone
    kept = next(backbone.parameters())
    kept.requires_grad_(False)  # frozen on purpose (as a PEFT base): must stay frozen after the warm-up
    snapshot = lambda: {n: p.detach().clone() for n, p in model.named_parameters()}  # noqa: E731
    seen = {0: snapshot()}

    class Snapshots(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen[state.global_step] = snapshot()

    trainer_of(SentenceLMTrainer, model, texts, tmp_path, 4, callbacks=[FrozenBackboneWarmup(2), Snapshots()]).train()
    backbone_names = [n for n in seen[0] if n.startswith("model.backbone.")]
    assert all(torch.equal(seen[2][n], seen[0][n]) for n in backbone_names)
    assert any(not torch.equal(seen[2][n], seen[0][n]) for n in seen[0] if n.startswith("model.sentence_vae."))
    assert any(not torch.equal(seen[4][n], seen[2][n]) for n in backbone_names)
    assert all(p.requires_grad for p in backbone.parameters() if p is not kept) and not kept.requires_grad
    with pytest.raises(ValueError, match="number of steps >= 0"):
        FrozenBackboneWarmup(-1)


def test_command_line_levers(text_file, llama_dir, tmp_path):
    args = backbone_arguments(text_file, tmp_path / "out", llama_dir, "--max_steps", "3", "--do_eval", "false",
                              "--distill_from", "backbone", "--distill_weight", "0.5", "--freeze_backbone_steps", "2")  # fmt: skip
    results = train_sentence_opt(args)
    assert results["global_step"] == 3 and len(results["loss_curve"]) == 3
    with pytest.raises(ValueError, match="--distill_from backbone needs --backbone_name_or_path"):
        train_sentence_opt([*args[: args.index("--backbone_name_or_path")], "--distill_from", "backbone"])


def test_conditioning_nll_splits_what_the_decoder_draws_from_the_context(tokenizer):
    from helpers import tiny_sentence_opt

    from sentence_lm.training_sentence_opt import conditioning_nll

    model = tiny_sentence_opt(tokenizer)
    texts = ["The cat sat on the mat. It was warm. The dog slept.", "Once upon a time. There was a king! He was old."]
    dataset = tokenize_texts(
        datasets.Dataset.from_dict({"text": texts}), tokenizer, 64, tokenizer.max_sentence_len, join_paragraphs=False
    )
    result = conditioning_nll(model, dataset, batch_size=2, show_progress=False)
    # "predicted" is the model's own teacher-forced score of the sentences (its sentence_loss).
    batch = PaddingCollator(model.config.pad_token_id)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    assert result["predicted"] == pytest.approx(float(out.sentence_loss), rel=1e-5)
    assert result["num_sentences"] == 6
    assert result["context_gain"] == pytest.approx(result["mean"] - result["predicted"])
    assert len({round(result[k], 4) for k in ("predicted", "mean", "shuffled", "own_vector", "previous_vector")}) == 5
    # "previous_vector", written out: each sentence from the vector of the one before it in its
    # text, a text's first from the mean vector; the same in batches of one text.
    with torch.no_grad():
        base = model.model(batch["input_ids"], batch["attention_mask"])
        packed, vectors = base.packed, base.sentence_vectors
        previous = torch.stack([
            vectors.mean(0) if packed.sentence_index[i] == 0 else vectors[i - 1] for i in range(len(vectors))
        ])  # fmt: skip
        vae = model.sentence_vae
        targets = vae.reconstruction_targets(packed.input_ids, packed.attention_mask)
        states = vae.teacher_forced_states(packed.input_ids, packed.attention_mask, previous)
        nll = vae.output_nll(states[targets != -100], targets[targets != -100]).sum() / (targets != -100).sum()
    assert result["previous_vector"] == pytest.approx(float(nll), rel=1e-5)
    one_by_one = conditioning_nll(model, dataset, batch_size=1, show_progress=False)
    assert one_by_one["previous_vector"] == pytest.approx(result["previous_vector"], rel=1e-5)
    # A decoder that reads nothing of what it is given scores the same under every condition.
    with torch.no_grad():
        for layer in model.sentence_vae.decoder.layers:
            layer.cross_attn.out_proj.weight.zero_()
            layer.cross_attn.out_proj.bias.zero_()
    deaf = conditioning_nll(model, dataset, batch_size=1, show_progress=False)
    for key in ("mean", "shuffled", "own_vector", "previous_vector"):
        assert deaf[key] == pytest.approx(deaf["predicted"], rel=1e-5)
    assert "mean_no_window" not in deaf

    # With a context window every condition reads the window (what the model reads), but one.
    windowed = tiny_sentence_opt(tokenizer, sentence_vae=dict(context_window=4))
    result = conditioning_nll(windowed, dataset, batch_size=2, show_progress=False)
    with torch.no_grad():
        out = windowed(batch["input_ids"], attention_mask=batch["attention_mask"])
    assert result["predicted"] == pytest.approx(float(out.sentence_loss), rel=1e-5)
    assert result["text_gain"] == pytest.approx(result["mean_no_window"] - result["predicted"])
    assert result["mean_no_window"] != pytest.approx(result["mean"], rel=1e-4)


def test_conditioning_script_scores_each_checkpoint(tokenizer, tmp_path):
    import json

    from helpers import load_script, tiny_sentence_opt

    tiny_sentence_opt(tokenizer).save_pretrained(tmp_path / "a")
    tiny_sentence_opt(tokenizer, seed=1).save_pretrained(tmp_path / "b")
    valid = tmp_path / "valid.txt"
    valid.write_text("The king had three sons. The youngest was a fool.\n\nOnce upon a time there was a miller. He was poor.")
    script = load_script("benchmarks/conditioning.py")
    results = script.main(["--sentence_lm", str(tmp_path / "a"), "--sentence_lm", str(tmp_path / "b"),
                           "--validation_file", str(valid), "--json", str(tmp_path / "out.json")])  # fmt: skip
    rows = results["rows"]
    assert [row["sentence_lm"] for row in rows] == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert rows[0]["predicted"] != rows[1]["predicted"] and rows[0]["num_sentences"] >= 4
    for row in rows:
        assert row["context_gain"] == pytest.approx(row["mean"] - row["predicted"])
    assert json.loads((tmp_path / "out.json").read_text())["rows"] == rows


def test_next_vector_loss_pulls_the_backbone_state_towards_the_next_sentence_vector(tokenizer, tmp_path):
    from helpers import encode, tiny_sentence_opt

    from sentence_lm import SentenceLMConfig

    plain = tiny_sentence_opt(tokenizer)
    model = tiny_sentence_opt(tokenizer, next_vector_weight=0.5)
    enc = encode(tokenizer, ["The cat sat on the mat. It was warm. The dog slept.", "Once upon a time. A king!"])
    out = model(**enc, labels=enc["input_ids"])
    base = model.model(**enc)
    first = base.last_hidden_state.shape[1] - 1 - base.packed.num_sentences
    states = base.last_hidden_state[base.packed.batch_index, first[base.packed.batch_index] + base.packed.sentence_index]
    expected = F.mse_loss(states, base.sentence_vectors)
    torch.testing.assert_close(out.next_vector_loss, expected)
    model.config.next_vector_weight = 0.0
    torch.testing.assert_close(out.loss, model(**enc, labels=enc["input_ids"]).loss + 0.5 * expected)
    assert plain(**enc).next_vector_loss is None
    # Its gradient reaches the backbone, and the vectors only as the backbone's
    # inputs: a text's last sentence, an input to no prediction, gets none (the target is detached).
    model = tiny_sentence_opt(tokenizer, next_vector_weight=0.5).train()
    encoded = []
    encode_vectors = model.sentence_vae.encode

    def keep(*args):
        vectors = encode_vectors(*args)
        vectors.retain_grad()
        encoded.append(vectors)
        return vectors

    model.sentence_vae.encode = keep
    out = model(**enc)
    out.next_vector_loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.model.backbone.parameters())
    packed = model.model(**enc).packed
    last = packed.sentence_index == packed.num_sentences[packed.batch_index] - 1
    grad_norms = encoded[0].grad.norm(dim=-1)
    assert bool((grad_norms[last] == 0).all()) and bool((grad_norms[~last] > 0).all())
    del model.sentence_vae.encode
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert loaded.config.next_vector_weight == 0.5
    with pytest.raises(ValueError, match="next_vector_weight"):
        SentenceLMConfig(next_vector_weight=-1.0)


def test_contrastive_next_vector_loss_is_infonce_over_the_batch_sentences(tokenizer, tmp_path):
    from helpers import encode, tiny_sentence_opt

    from sentence_lm import SentenceLMConfig
    from sentence_lm.modeling_sentence_lm import next_vector_loss_of, states_before_sentences

    model = tiny_sentence_opt(tokenizer, next_vector_weight=0.5, next_vector_objective="contrastive")
    enc = encode(tokenizer, ["The cat sat on the mat. It was warm. The dog slept.", "Once upon a time. A king!"])
    out = model(**enc, labels=enc["input_ids"])
    base = model.model(**enc)
    states = states_before_sentences(base.last_hidden_state, base.packed)
    vectors = base.sentence_vectors
    # Written out: sentence i's state scores every sentence j by cosine / 0.1; i is the target.
    n = len(vectors)
    log_probs = []
    for i in range(n):
        scores = torch.stack([F.cosine_similarity(states[i], vectors[j], dim=0) / 0.1 for j in range(n)])
        log_probs.append(scores[i] - torch.logsumexp(scores, dim=0))
    expected = -torch.stack(log_probs).mean()
    torch.testing.assert_close(out.next_vector_loss, expected)
    mse = tiny_sentence_opt(tokenizer, next_vector_weight=0.5)
    assert not torch.allclose(mse(**enc).next_vector_loss, expected)
    # A state that points at its own sentence and away from the others scores lower than one
    # that points at another sentence.
    assert next_vector_loss_of(vectors, vectors, "contrastive") < next_vector_loss_of(vectors.roll(1, 0), vectors, "contrastive")
    model.save_pretrained(tmp_path)
    assert type(model).from_pretrained(tmp_path).config.next_vector_objective == "contrastive"
    with pytest.raises(ValueError, match="next_vector_objective.*'mse', 'contrastive'"):
        SentenceLMConfig(next_vector_objective="infonce")


# ----------------------------------------------------------------------------- hidden-state distillation


def sentence_columns(model, batch):
    """The packed sentences of ``batch`` and, per sentence, the (row, column) of its last token."""
    out = model.model(batch["input_ids"], batch["attention_mask"])
    packed = out.packed
    last = (packed.token_sentence >= 0) & (
        packed.token_position == packed.lengths[packed.token_sentence.clamp(min=0)] - 1
    )
    rows, cols = torch.nonzero(last, as_tuple=True)
    order = packed.token_sentence[rows, cols]
    return out, rows[order.argsort()], cols[order.argsort()]


def test_hidden_state_loss_and_teacher_conditioning_line_up_with_the_sentences(setup):
    """Teacher states that are the backbone's own states, placed at each sentence's last token, give
    a hidden-state loss of 0; the same states read one token early do not. Conditioned on them
    (and on the start state at the BOS), the decoder writes each sentence from exactly the states it
    reads without a teacher: the same loss."""
    _, model, texts = setup
    model.eval()
    batch = PaddingCollator(model.config.pad_token_id)([texts[i] for i in range(3)])
    batch.pop("length", None)
    with torch.no_grad():
        out, rows, cols = sentence_columns(model, batch)
        packed, hidden = out.packed, out.last_hidden_state
        slots = packed.sentence_slots(hidden.shape[1])
        states = torch.randn(*batch["input_ids"].shape, model.config.hidden_size)
        states[rows, cols] = hidden[packed.batch_index, slots]
        first = torch.argmax(batch["attention_mask"], dim=1)
        text_rows = torch.arange(len(first))
        assert bool((batch["input_ids"][text_rows, first] == model.config.bos_token_id).all())
        states[text_rows, first] = hidden[text_rows, packed.first_slots(hidden.shape[1])]
        plain = model(**batch, logits_to_keep=torch.empty(0, dtype=torch.long))
        taught = model(**batch, teacher_hidden_states=states, logits_to_keep=torch.empty(0, dtype=torch.long))
        assert plain.hidden_state_loss is None and float(taught.hidden_state_loss) < 1e-10
        early = model(**batch, teacher_hidden_states=states.roll(-1, dims=1), logits_to_keep=torch.empty(0, dtype=torch.long))
        assert float(early.hidden_state_loss) > 0.1
        conditioned = model(**batch, teacher_hidden_states=states, condition_on_teacher=True,
                            logits_to_keep=torch.empty(0, dtype=torch.long))  # fmt: skip
        torch.testing.assert_close(conditioned.loss, plain.loss)
        other = model(**batch, teacher_hidden_states=states + 1.0, condition_on_teacher=True,
                      logits_to_keep=torch.empty(0, dtype=torch.long))  # fmt: skip
        assert not torch.allclose(other.loss, plain.loss)
        # Bad input: named.
        with pytest.raises(ValueError, match="teacher_hidden_states has shape"):
            model(**batch, teacher_hidden_states=states[:, :-1])
        with pytest.raises(ValueError, match="wide but this SentenceLM's backbone is"):
            model(**batch, teacher_hidden_states=states[..., :-1])
        with pytest.raises(ValueError, match="needs teacher_hidden_states"):
            model(**batch, condition_on_teacher=True)


def test_hidden_state_distillation_trainer_pulls_the_states_towards_the_teachers(setup, tmp_path):
    from sentence_lm.hidden_state_distillation import HiddenStateDistillationTrainer

    teacher, model, texts = setup
    conditioned = []

    class Recording(HiddenStateDistillationTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            conditioned.append(self.state.global_step < self.teacher_condition_steps)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    from sentence_lm.hidden_state_distillation import teacher_final_states

    batch = PaddingCollator(model.config.pad_token_id)([texts[i] for i in range(4)])
    batch.pop("length", None)

    def gap() -> float:
        model.eval()
        with torch.no_grad():
            states = teacher_final_states(teacher, batch["input_ids"], batch["attention_mask"])
            out = model(**batch, teacher_hidden_states=states, logits_to_keep=torch.empty(0, dtype=torch.long))
        model.train()
        return float(out.hidden_state_loss)

    before = gap()
    trainer = trainer_of(Recording, model, texts, tmp_path, 30, teacher=teacher, hidden_state_weight=50.0,
                         teacher_condition_steps=3)  # fmt: skip
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 30 and all(e["hidden_state_loss"] > 0 for e in logs)
    after = gap()
    assert after < 0.7 * before, (before, after)
    assert conditioned == [True] * 3 + [False] * 27
    assert all(not p.requires_grad for p in trainer.teacher.parameters())


def test_hidden_state_distillation_refuses_what_cannot_work(setup, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from sentence_lm.hidden_state_distillation import HiddenStateDistillationTrainer

    teacher, model, texts = setup
    with pytest.raises(ValueError, match="needs a teacher"):
        trainer_of(HiddenStateDistillationTrainer, model, texts, tmp_path, 1)
    with pytest.raises(ValueError, match="hidden_state_weight must be"):
        trainer_of(HiddenStateDistillationTrainer, model, texts, tmp_path, 1, teacher=teacher, hidden_state_weight=-1)
    with pytest.raises(ValueError, match="teacher_condition_steps must be"):
        trainer_of(HiddenStateDistillationTrainer, model, texts, tmp_path, 1, teacher=teacher, teacher_condition_steps=0.5)
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=model.config.vocab_size, hidden_size=48, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4))  # fmt: skip
    with pytest.raises(ValueError, match="48 wide but the SentenceLM's backbone is 32"):
        trainer_of(HiddenStateDistillationTrainer, model, texts, tmp_path, 1, teacher=wide)
    teacher.resize_token_embeddings(teacher.config.vocab_size + 8)
    with pytest.raises(ValueError, match="reads .* token ids but the SentenceLM"):
        trainer_of(HiddenStateDistillationTrainer, model, texts, tmp_path, 1, teacher=teacher)


# ----------------------------------------------------------------------------- cached top-k distillation


def test_top_k_loss_of_a_one_hot_teacher_is_the_decoders_token_nll(setup):
    """A teacher whose top-1 is the text's own next token with probability 1: the loss is the
    Sentence Decoder's NLL of each sentence token (its end-of-sentence steps left out), which is
    ``sentence_nll - end_nll`` over the tokens (every token follows the BOS or another token)."""
    _, model, texts = setup
    model.eval()
    batch = PaddingCollator(model.config.pad_token_id)([texts[i] for i in range(3)])
    batch.pop("length", None)
    ids = batch["input_ids"]
    next_ids = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)[..., None]
    one_hot = (next_ids, torch.zeros(next_ids.shape))
    with torch.no_grad():
        out = model(**batch, teacher_top_k=one_hot, logits_to_keep=torch.empty(0, dtype=torch.long))
    expected = (out.sentence_nll - out.end_nll).sum() / out.num_tokens.sum()
    torch.testing.assert_close(out.teacher_top_k_loss, expected)
    # Bad input: named.
    with torch.no_grad():
        bad = (next_ids.clone(), torch.zeros(next_ids.shape))
        bad[0][0, 0, 0] = model.config.vocab_size
        with pytest.raises(ValueError, match="outside"):
            model(**batch, teacher_top_k=bad)
        with pytest.raises(ValueError, match="teacher_top_k holds ids of shape"):
            model(**batch, teacher_top_k=(next_ids[:, :-1], torch.zeros(next_ids[:, :-1].shape)))


def test_cached_top_k_distillation_trains_and_caches_the_teachers_top_k(setup, tmp_path):
    from sentence_lm.cached_distillation import TOP_K_COLUMNS, TopKCollator, TopKDistillationTrainer, cache_teacher_top_k

    teacher, model, texts = setup
    cached = cache_teacher_top_k(teacher, texts.select(range(12)), k=4, batch_size=5)
    assert [len(r) for r in cached[TOP_K_COLUMNS[0]]] == [len(r) for r in cached["input_ids"]]
    row = cached[7]  # in the second batch, padded to its longest row
    with torch.no_grad():
        logits = teacher(input_ids=torch.tensor([row["input_ids"]])).logits[0]
    top = torch.log_softmax(logits, -1).topk(4, dim=-1)
    assert torch.equal(torch.tensor(row[TOP_K_COLUMNS[0]]), top.indices)
    torch.testing.assert_close(torch.tensor(row[TOP_K_COLUMNS[1]]), top.values.half().float())
    collator = TopKCollator(model.config.pad_token_id)
    with pytest.raises(ValueError, match="needs a TopKCollator"):
        trainer_of(TopKDistillationTrainer, model, cached, tmp_path, 4)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=3e-3,
                             logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=0)  # fmt: skip
    trainer = TopKDistillationTrainer(model=model, args=args, train_dataset=cached, data_collator=collator, distill_weight=1.0)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "teacher_top_k_loss" in e]
    assert logs and all(e["teacher_top_k_loss"] > 0 for e in logs)
    with pytest.raises(ValueError, match="cache the teacher's distributions first"):
        TopKDistillationTrainer(model=model, args=args, train_dataset=texts, data_collator=collator)
    with pytest.raises(ValueError, match="k must be"):
        cache_teacher_top_k(teacher, texts, k=0)
