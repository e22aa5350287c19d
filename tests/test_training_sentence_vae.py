"""Stage 1: argument parsing, the Trainer's time budget, and a short end-to-end run of
``train_sentence_vae`` (train, save, reload, resume)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sentence_lm import SentenceVAEModel
from sentence_lm.corpus import default_corpus
from sentence_lm.data import DataArguments, load_texts, split_into_sentences, tokenize_texts
from sentence_lm.metrics import reconstruction_metrics
from sentence_lm.tokenization_sentence_lm import SentenceTokenizer
from sentence_lm.trainer import LearningCurveCallback, TimeBudgetCallback
from sentence_lm.training_sentence_vae import parse_sentence_vae_args, train_sentence_vae


# ------------------------------------------------------------------------------ arguments, trainer
def test_parse_args_takes_training_arguments():
    model_args, data_args, training_args = parse_sentence_vae_args(
        ["--output_dir", "x", "--max_steps", "7", "--hidden_size", "64", "--block_size", "100", "--eval_strategy", "steps"]
    )
    assert model_args.hidden_size == 64 and data_args.block_size == 100
    assert training_args.max_steps == 7 and training_args.eval_strategy == "steps"
    assert training_args.remove_unused_columns is False and training_args.prediction_loss_only


@pytest.mark.parametrize("save_strategy", ["steps", "no"])
def test_time_budget_callback_stops_training(save_strategy, tmp_path):
    """It stops at the budget, and saves there only when the run saves checkpoints at all."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), save_strategy=save_strategy, report_to=[])
    state, control = TrainerState(), TrainerControl()
    state.global_step = 3
    patient = TimeBudgetCallback(max_seconds=3600)
    patient.on_train_begin(args, state, control)
    assert not patient.on_step_end(args, state, control).should_training_stop
    hasty = TimeBudgetCallback(max_seconds=0)
    hasty.on_train_begin(args, state, control)
    control = hasty.on_step_end(args, state, control)
    assert control.should_training_stop and hasty.stopped_at_step == 3
    assert control.should_save == (save_strategy != "no")


def test_a_cpu_clock_budget_does_not_count_time_the_process_spends_waiting(tmp_path):
    """With ``clock="cpu"`` the budget counts this process's CPU seconds: a sleep (the machine busy
    with other work) spends wall time but no budget; the wall clock counts it."""
    import time

    from transformers import TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), save_strategy="no", report_to=[])
    state = TrainerState()
    budgets = {clock: TimeBudgetCallback(max_seconds=0.2, clock=clock) for clock in ("wall", "cpu")}
    for budget in budgets.values():
        budget.on_train_begin(args, state, TrainerControl())
    time.sleep(0.3)
    assert budgets["wall"].on_step_end(args, state, TrainerControl()).should_training_stop
    assert not budgets["cpu"].on_step_end(args, state, TrainerControl()).should_training_stop
    with pytest.raises(ValueError, match="clock must be one of"):
        TimeBudgetCallback(1, clock="gpu")


def test_learning_curve_callback_scores_on_its_schedule_once_per_step(tmp_path):
    """At the start, every ``every_steps`` steps and at the end, once per step (a resumed run's
    points come back from the log history); the points also go to the log history, the model's
    training mode is restored, and the tokens counted are the text's, not its padding."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    model = torch.nn.Linear(1, 1)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    state, control = TrainerState(), TrainerControl()
    curve = LearningCurveCallback(3600, lambda m: {"nll": 1.5 + m.training}, every_steps=2)
    curve.on_train_begin(args, state, control, model=model)
    assert args.include_num_input_tokens_seen == "non_padding"
    for step in (1, 2, 3):
        state.global_step, state.num_input_tokens_seen = step, 10 * step
        curve.on_step_end(args, state, control, model=model)
    curve.on_train_end(args, state, control, model=model)
    curve.on_train_end(args, state, control, model=model)
    assert [(p["step"], p["tokens"], p["nll"]) for p in curve.points] == [(0, 0, 2.5), (2, 20, 2.5), (3, 30, 2.5)]
    assert all(p["seconds"] >= 0 and p["eval_seconds"] >= 0 for p in curve.points) and model.training
    assert state.log_history == curve.points
    resumed = LearningCurveCallback(3600, lambda m: {"nll": 0.5}, every_steps=2)
    resumed.on_train_begin(args, state, control, model=model)
    assert resumed.points == curve.points  # step 3 was scored before: not again
    with pytest.raises(ValueError, match="every_steps or every_seconds"):
        LearningCurveCallback(60, lambda m: {}, every_steps=2, every_seconds=1.0)


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


def test_frozen_token_embeddings_stay_as_they_were(text_file, tmp_path):
    """--freeze_token_embeddings trains everything but the embeddings and the tied output layer."""
    out = tmp_path / "frozen"
    train_sentence_vae(
        tiny_run_args(text_file, out, "--max_steps", "3", "--freeze_token_embeddings", "True", "--save_strategy", "no",
                      "--do_eval", "False", "--max_reconstruction_sentences", "8")
    )  # fmt: skip
    trained = SentenceVAEModel.from_pretrained(out)
    torch.manual_seed(0)  # the new model the run started from (same seed, same config)
    start = SentenceVAEModel(trained.config)
    assert torch.equal(trained.embed_tokens.weight, start.embed_tokens.weight)
    assert not torch.equal(trained.encoder.layers[0].ffn.fc1.weight, start.encoder.layers[0].ffn.fc1.weight)


def test_loss_only_evaluation_computes_no_logits_and_the_same_loss(tmp_path):
    from transformers import TrainingArguments

    from sentence_lm import SentenceVAEConfig
    from sentence_lm.data import PaddingCollator
    from sentence_lm.trainer import SentenceLMTrainer

    torch.manual_seed(0)
    model = SentenceVAEModel(SentenceVAEConfig(vocab_size=50, hidden_size=16, num_attention_heads=2, ffn_dim=32))
    rows = [{"input_ids": torch.randint(3, 50, (n,)).tolist()} for n in (3, 7, 5, 9)]
    seen = []
    model.register_forward_hook(lambda module, args, kwargs, out: seen.append(out.logits), with_kwargs=True)
    args = TrainingArguments(output_dir=str(tmp_path), remove_unused_columns=False, report_to=[])
    trainer = SentenceLMTrainer(model=model.eval(), args=args)
    batch = PaddingCollator(1)(rows)
    loss_only, _, _ = trainer.prediction_step(model, batch, prediction_loss_only=True)
    with_logits, logits, _ = trainer.prediction_step(model, batch, prediction_loss_only=False)
    assert seen[0] is None and torch.equal(seen[1], logits[0])  # (logits, sentence_vectors)
    torch.testing.assert_close(loss_only, with_logits)


def test_a_time_budget_shows_a_bar_of_its_seconds(text_file, tmp_path, capsys):
    """With --max_train_minutes the progress bar counts the budget's seconds, not max_steps."""
    train_sentence_vae(
        tiny_run_args(text_file, tmp_path / "budget", "--max_steps", "3", "--max_train_minutes", "10",
                      "--disable_tqdm", "False", "--do_eval", "False", "--save_strategy", "no",
                      "--max_reconstruction_sentences", "8")
    )  # fmt: skip
    err = capsys.readouterr().err
    assert "training (10 min)" in err and "/600" in err
    assert "/3 [" not in err  # no bar towards max_steps
