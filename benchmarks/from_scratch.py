#!/usr/bin/env python
"""From scratch at equal wall time: a small SentenceLM against its same-shape token model.

Both models have a Llama backbone of the same shape (``--hidden_size``, ``--num_layers``,
``--num_heads``, ``--ffn_dim``) and one byte-level BPE of ``--vocab_size`` tokens trained here on
the training text; both train on the same text blocks (WikiText-2 train, detokenised, in blocks of
``--block_size`` tokens with a BOS) for the same ``--minutes`` of training time (evaluations not
counted). The token model is `LlamaForCausalLM` (:func:`sentence_lm.baseline.token_config_like`),
trained with the Trainer and the causal-LM collator. The SentenceLM spends ``--stage1_share`` of
its minutes on stage 1 (its SentenceVAE on the training sentences) and the rest on stage 2 (the
whole model, SentenceVAE included, on the blocks).

Both are scored on the same blocks of WikiText-2 raw valid, detokenised as the training text is
(the first ``--eval_tokens`` tokens), in
NLL per token: the token model's NLL of every token after the BOS, the SentenceLM's whole-text NLL
(tokens, sentence ends and stop decisions) over the same tokens
(:func:`~sentence_lm.training_sentence_opt.text_nll`). During training both are scored every
``--curve_minutes`` on the first ``--curve_tokens`` of them; the report fits a power law
``NLL = a * x ** -b`` to each curve (against training tokens and against training seconds, from the
second curve point on) and says where the two would meet, or the gap at ten times the budget.

Example (the recorded comparison)::

    python benchmarks/from_scratch.py --minutes 30 --json benchmarks/results/from_scratch_cpu.json \\
        --report benchmarks/results/from_scratch_cpu.md --plot benchmarks/results/from_scratch_cpu.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # levers.py, beside this script (also when imported by the tests)
try:
    import sentence_lm  # noqa: F401
except ImportError:  # a source checkout that is not installed
    sys.path.insert(0, str(HERE.parent))

import torch
from levers import blocks_of, training_arguments
from transformers import LlamaConfig, set_seed

from sentence_lm import SentenceLMConfig, SentenceLMForCausalLM, SentenceVAEModel
from sentence_lm.baseline import token_baseline_trainer, token_config_like, token_nll
from sentence_lm.corpus import text_paragraphs
from sentence_lm.data import PaddingCollator, first_tokens, split_into_sentences
from sentence_lm.learning_curves import fit_text, meeting, outlook_lines, plot_curves, power_law
from sentence_lm.machine import machine_info
from sentence_lm.tokenization_sentence_lm import train_sentence_tokenizer
from sentence_lm.trainer import LearningCurveCallback, SentenceLMTrainer, TimeBudgetCallback, show_time_budget
from sentence_lm.training_sentence_opt import text_nll
from sentence_lm.training_sentence_vae import parse_overrides

SHARED = HERE.parents[1] / "shared" / "data"


def token_model_nll(model, blocks, batch_size: int = 8) -> float:
    """NLL per token of a token model on text blocks (BOS first): every token after the BOS."""
    return token_nll(model, blocks, None, batch_size, show_progress=False)["nll_per_token"]


def sentence_lm_nll(model, blocks, batch_size: int = 8) -> float:
    return text_nll(model, blocks, batch_size, show_progress=False)["nll_per_token"]


def train_token_model(args, config, tokenizer, blocks, curve_blocks):
    set_seed(args.seed)
    trainer = token_baseline_trainer(token_config_like(config, args.block_size + 8), tokenizer, blocks["train"],
                                     training_arguments(args, "token_model", args.lr, args.batch, weight_decay=0.01))
    curve = LearningCurveCallback(60 * args.minutes, lambda m: {"nll": token_model_nll(m, curve_blocks)},
                                  every_seconds=60 * args.curve_minutes, clock=args.clock)
    trainer.add_callback(curve)
    show_time_budget(trainer)
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    return model, {"steps": trainer.state.global_step, "tokens": int(trainer.state.num_input_tokens_seen),
                   "curve": curve.points, "parameters": model.num_parameters()}


def train_sentence_lm(args, config, tokenizer, blocks, curve_blocks):
    stage1_seconds = 60 * args.minutes * args.stage1_share
    set_seed(args.seed)
    vae = SentenceVAEModel(config.sentence_vae)
    vae.set_boundary_table(tokenizer)
    sentences = split_into_sentences(blocks["train"], tokenizer, config.sentence_vae.max_sentence_len)
    stage1_args = training_arguments(args, "stage1", args.stage1_lr, args.stage1_batch, weight_decay=0.01)
    stage1 = SentenceLMTrainer(model=vae, args=stage1_args, train_dataset=sentences,
                                data_collator=PaddingCollator(tokenizer.pad_token_id),
                                callbacks=[TimeBudgetCallback(stage1_seconds, args.clock)])
    stage1.train()
    stage1_tokens = int(stage1.state.num_input_tokens_seen)

    set_seed(args.seed)
    model = SentenceLMForCausalLM(config)
    model.model.sentence_vae.load_state_dict(stage1.accelerator.unwrap_model(stage1.model).state_dict())
    curve = LearningCurveCallback(60 * args.minutes - stage1_seconds, lambda m: {"nll": sentence_lm_nll(m, curve_blocks)},
                                  every_seconds=60 * args.curve_minutes, clock=args.clock)
    stage2 = SentenceLMTrainer(model=model, args=training_arguments(args, "stage2", args.lr, args.batch, weight_decay=0.01),
                                train_dataset=blocks["train"], data_collator=PaddingCollator(tokenizer.pad_token_id),
                                callbacks=[curve])
    stage2.train()
    model = stage2.accelerator.unwrap_model(stage2.model)
    points = [{**p, "seconds": p["seconds"] + stage1_seconds, "stage2_tokens": p["tokens"],
               "tokens": p["tokens"] + stage1_tokens} for p in curve.points]
    return model, {"steps": stage2.state.global_step, "stage1_steps": stage1.state.global_step,
                   "tokens": int(stage2.state.num_input_tokens_seen), "stage1_tokens": stage1_tokens,
                   "curve": points, "parameters": model.num_parameters()}


def sentence_lm_config(args, tokenizer) -> SentenceLMConfig:
    backbone = LlamaConfig(
        hidden_size=args.hidden_size, intermediate_size=args.ffn_dim, num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads, num_key_value_heads=args.num_heads,
        max_position_embeddings=args.block_size + 8, tie_word_embeddings=True,
    )  # fmt: skip
    vae = dict(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, num_attention_heads=args.num_heads,
        ffn_dim=args.ffn_dim, max_sentence_len=args.max_sentence_len, dropout=0.0, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    vae.update(parse_overrides(args.sentence_vae_config or ""))
    return SentenceLMConfig(backbone=backbone, sentence_vae=vae)


def markdown(results: dict) -> str:
    rows = results["models"]
    lines = [
        f"Trained {results['minutes']} minutes each ({results['machine'].get('cpu', results['device'])}, "
        f"{results['threads']} threads); scored on {results['eval_tokens']:,} tokens of WikiText-2 raw valid.",
        "",
        "| model | parameters | steps | training tokens | NLL/token | perplexity | fit vs tokens (a, b) | fit vs seconds (a, b) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        tokens = f"{r['tokens']:,}" + (f" (+{r['stage1_tokens']:,} stage 1)" if "stage1_tokens" in r else "")
        lines.append(f"| {name} | {r['parameters'] / 1e6:.2f}M | {r['steps']} | {tokens} | {r['nll']:.4f} | "
                     f"{math.exp(r['nll']):.1f} | {fit_text(r['fit_tokens'])} | {fit_text(r['fit_seconds'])} |")
    lines += outlook_lines(results["outlook"], "the SentenceLM", "the token model")
    return "\n".join(lines)


def add_setting_arguments(p: argparse.ArgumentParser) -> None:
    """The data, model shape, training and output options this script shares with
    conversion_study.py (which adds its own steps and folders)."""
    p.add_argument("--train_file", default=str(SHARED / "wikitext-2" / "train.txt"))
    p.add_argument("--validation_file", default=str(SHARED / "wikitext-2-raw" / "valid.txt"))
    p.add_argument("--train_paragraphs", type=int, help="Train on the first N paragraphs only (smoke runs).")
    p.add_argument("--stage1_share", type=float, default=0.25, help="Share of the SentenceLM's minutes spent in stage 1.")
    p.add_argument("--curve_minutes", type=float, default=3.0)
    p.add_argument("--eval_tokens", type=int, default=20000)
    p.add_argument("--curve_tokens", type=int, default=4000)
    p.add_argument("--vocab_size", type=int, default=8192)
    p.add_argument("--hidden_size", type=int, default=256)
    p.add_argument("--num_layers", type=int, default=4)
    p.add_argument("--num_heads", type=int, default=4)
    p.add_argument("--ffn_dim", type=int, default=1024)
    p.add_argument("--max_sentence_len", type=int, default=48)
    p.add_argument("--sentence_vae_config", help="SentenceVAE overrides key=value,... (levers).")
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--batch", type=int, default=16, help="Text blocks per step (both models).")
    p.add_argument("--lr", type=float, default=1e-3, help="Learning rate of the token model and of stage 2.")
    p.add_argument("--stage1_batch", type=int, default=64)
    p.add_argument("--stage1_lr", type=float, default=1e-3)
    p.add_argument("--warmup_steps", type=int, default=20)
    p.add_argument("--threads", type=int)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="What the time budgets count: wall-clock seconds, or this process's CPU seconds (CPU runs "
                        "sharing a machine with other work).")  # fmt: skip
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    p.add_argument("--report")
    p.add_argument("--plot")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_setting_arguments(p)
    p.add_argument("--minutes", type=float, default=30.0, help="Training minutes of each model.")
    p.add_argument("--output_dir", default="runs/from_scratch", help="The Trainer's folders (it saves nothing there).")
    args = p.parse_args(argv)
    if not 0 < args.stage1_share < 1:
        p.error("--stage1_share must be between 0 and 1 (both stages need time)")
    return args


def main(argv=None) -> dict:
    began = time.perf_counter()
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # Training and validation text alike are detokenised when they hold WikiText markup: a validation
    # text left in WikiText's layout costs both models tokens they never saw in training.
    paragraphs = text_paragraphs(args.train_file)[: args.train_paragraphs]
    tokenizer = train_sentence_tokenizer(paragraphs, vocab_size=args.vocab_size, max_sentence_len=args.max_sentence_len)
    valid = text_paragraphs(args.validation_file)
    blocks = {
        "train": blocks_of(paragraphs, tokenizer, args.block_size, args.max_sentence_len, "training text"),
        "valid": blocks_of(valid, tokenizer, args.block_size, args.max_sentence_len, "validation text"),
    }
    eval_blocks = first_tokens(blocks["valid"], args.eval_tokens)
    curve_blocks = first_tokens(eval_blocks, args.curve_tokens)
    config = sentence_lm_config(args, tokenizer)

    models = {}
    for name, train, score in (("token model", train_token_model, token_model_nll),
                               ("SentenceLM", train_sentence_lm, sentence_lm_nll)):  # fmt: skip
        model, record = train(args, config, tokenizer, blocks, curve_blocks)
        record["nll"] = score(model, eval_blocks)
        later = record["curve"][1:]
        record["fit_tokens"], record["fit_seconds"] = power_law(later, "tokens"), power_law(later, "seconds")
        models[name] = record
        del model
    sentence, token = models["SentenceLM"], models["token model"]
    results = {
        "command": shlex.join(["python", "benchmarks/from_scratch.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(torch.device(args.device)), "device": args.device, "threads": torch.get_num_threads(),
        "minutes": args.minutes, "settings": vars(args), "vocab_size": len(tokenizer),
        "eval_tokens": sum(eval_blocks["length"]) - len(eval_blocks), "models": models,
        "outlook": {
            "tokens": meeting(sentence["fit_tokens"], token["fit_tokens"], max(token["tokens"], sentence["tokens"])),
            "seconds": meeting(sentence["fit_seconds"], token["fit_seconds"], 60 * args.minutes),
        },
        "wall_seconds": round(time.perf_counter() - began, 1),
    }
    report = markdown(results)
    print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.report:
        Path(args.report).write_text(report + "\n")
    if args.plot:
        plot_curves({name: r["curve"] for name, r in models.items()},
                    {name: {"tokens": r["fit_tokens"], "seconds": r["fit_seconds"]} for name, r in models.items()},
                    args.plot)
    return results


if __name__ == "__main__":
    main()
