#!/usr/bin/env python
"""Conversion at small scale, whole curves: a token model pretrained here, converted into a
SentenceLM with each lever, against the token model trained on and a SentenceLM from scratch.

The setting is `benchmarks/from_scratch.py`'s (a Llama backbone of ``--hidden_size`` x
``--num_layers``, a byte-level BPE of ``--vocab_size`` tokens trained on the training text,
WikiText-2 train in blocks of ``--block_size`` tokens). The study runs in steps that share a work
folder (``--workdir``, outside the repository: it holds the tokenizer and the pretrained token
model), so that runs can go side by side on separate cores and a long study can be resumed:

* ``pretrain --minutes P``: the token model from nothing, P minutes; its curve, its checkpoint (the
  tokenizer is saved before training starts, so a ``scratch`` run can go alongside).
* ``run --recipe R --minutes C --name N``, one recipe per call:
  ``token`` (the pretrained token model trained C minutes more, the same settings),
  ``scratch`` (a SentenceLM from nothing for C minutes: give it P + C; from_scratch.py's settings,
  ``--sentence_vae_config`` included),
  ``convert`` or ``convert:key=value,...`` (`SentenceLMForCausalLM.from_pretrained_backbone` of the
  pretrained token model, then ``stage1_share`` of C on its new SentenceVAE and the rest on the
  whole model). Keys of ``convert``: any `SentenceVAEConfig` field (``num_decoder_layers``,
  ``num_memory_vectors``, ...), ``copy_layers`` (the SentenceVAE's layers start from the token
  model's first layers, or with ``last`` its decoder's from the last, see
  :mod:`sentence_lm.pretrained_layers`),
  ``stage1_share``, ``lr``, ``stage1_lr``, ``freeze_backbone_steps``, ``distill_weight`` (KL to the
  token model's next-token distributions, :class:`~sentence_lm.distillation.DistillationTrainer`),
  ``hidden_state_weight`` and ``teacher_condition_steps`` (its hidden states,
  :class:`~sentence_lm.hidden_state_distillation.HiddenStateDistillationTrainer`), ``top_k_weight``
  and ``top_k`` (its top-k next-token distributions cached once, distilled into the Sentence
  Decoder's steps, :mod:`sentence_lm.cached_distillation`; the cache's time is recorded as
  ``cache_seconds``, outside the budget). The three teacher levers are one trainer each.
* ``report``: one table and one plot of every run, curves against training seconds with the token
  model's pretraining counted for the runs that start from it, and for each the minutes it needed
  (or, from its power-law fit, would need) to reach the token model's NLL at the end of pretraining,
  beside its greedy generation tokens/s at batch 1 (timed at the end of its run, on its core).

Every curve is scored on the *selection split* (the last ``--selection_paragraphs`` paragraphs of
the training file, never trained on), which is where levers are chosen; each run's final model is
also scored on WikiText-2 raw valid (``--eval_tokens``), the figure reported as final.

Example (one core per run; the pretraining first, the rest side by side)::

    W=/tmp/conversion
    taskset -c 0 python benchmarks/conversion_study.py pretrain --workdir $W --minutes 60 --threads 1
    taskset -c 1 python benchmarks/conversion_study.py run --workdir $W --recipe scratch --minutes 80 --threads 1
    taskset -c 0 python benchmarks/conversion_study.py run --workdir $W --recipe token --minutes 20 --threads 1
    taskset -c 0 python benchmarks/conversion_study.py run --workdir $W --recipe convert --name convert --minutes 20 --threads 1
    taskset -c 1 python benchmarks/conversion_study.py run --workdir $W --name hidden --minutes 20 --threads 1 \\
        --recipe convert:hidden_state_weight=1.0,teacher_condition_steps=200
    python benchmarks/conversion_study.py report --workdir $W --json benchmarks/results/conversion_cpu.json \\
        --report benchmarks/results/conversion_cpu.md --plot benchmarks/results/conversion_cpu.png
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
sys.path.insert(0, str(HERE))  # from_scratch.py and levers.py, beside this script
try:
    import sentence_lm  # noqa: F401
except ImportError:  # a source checkout that is not installed
    sys.path.insert(0, str(HERE.parent))

import torch
from from_scratch import add_setting_arguments, sentence_lm_config, sentence_lm_nll, token_model_nll, train_sentence_lm
from levers import blocks_of, copied_layers, training_arguments
from transformers import AutoModelForCausalLM, set_seed

from sentence_lm import SentenceLMForCausalLM, SentenceVAEConfig
from sentence_lm.baseline import token_baseline_trainer, token_config_like
from sentence_lm.corpus import text_paragraphs
from sentence_lm.data import PaddingCollator, first_tokens, split_into_sentences
from sentence_lm.cached_distillation import TopKCollator, TopKDistillationTrainer, cache_teacher_top_k
from sentence_lm.distillation import DistillationTrainer, FrozenBackboneWarmup
from sentence_lm.hidden_state_distillation import HiddenStateDistillationTrainer
from sentence_lm.learning_curves import plot_curves, power_law
from sentence_lm.machine import machine_info
from sentence_lm.tokenization_sentence_lm import SentenceTokenizer, train_sentence_tokenizer
from sentence_lm.trainer import LearningCurveCallback, SentenceLMTrainer, TimeBudgetCallback, show_time_budget
from sentence_lm.training_sentence_vae import parse_overrides

SHARED = HERE.parents[1] / "shared" / "data"
TRAINING_KEYS = {
    "copy_layers": copied_layers, "stage1_share": float, "lr": float, "stage1_lr": float, "freeze_backbone_steps": int,
    "distill_weight": float, "hidden_state_weight": float, "teacher_condition_steps": int, "top_k_weight": float,
    "top_k": int,
}  # fmt: skip
TEACHER_LEVERS = ("distill_weight", "hidden_state_weight", "top_k_weight")


def parse_recipe(text: str) -> tuple[str, dict, dict]:
    """``kind[:key=value,...]`` into ``(kind, training keys, SentenceVAE fields)``; unknown keys and
    keys of another kind are refused by name."""
    kind, _, fields = text.partition(":")
    if kind not in ("token", "scratch", "convert"):
        raise SystemExit(f"Unknown recipe {kind!r}: use token, scratch or convert[:key=value,...].")
    values = parse_overrides(fields)
    if values and kind != "convert":
        raise SystemExit(f"The {kind} recipe takes no keys (got {sorted(values)}); only convert does.")
    training = {key: cast(values.pop(key)) for key, cast in TRAINING_KEYS.items() if key in values}
    unknown = sorted(set(values) - set(SentenceVAEConfig().to_dict()))
    if unknown:
        raise SystemExit(f"Recipe {text!r}: unknown key(s) {unknown}; convert takes {sorted(TRAINING_KEYS)} and "
                         "SentenceVAEConfig fields.")  # fmt: skip
    if training.get("teacher_condition_steps") and "hidden_state_weight" not in training:
        training["hidden_state_weight"] = 0.0
    if sum(key in training for key in TEACHER_LEVERS) > 1:
        raise SystemExit(f"Recipe {text!r}: {', '.join(TEACHER_LEVERS)} are separate levers (one trainer each); pick one.")
    return kind, training, values


def load_blocks(args, tokenizer) -> dict:
    """Training, selection and validation blocks: the selection split is the training file's last
    ``--selection_paragraphs`` paragraphs, held out of training."""
    paragraphs = text_paragraphs(args.train_file)[: args.train_paragraphs]
    train, selection = paragraphs[: -args.selection_paragraphs], paragraphs[-args.selection_paragraphs :]
    valid = text_paragraphs(args.validation_file)
    blocks = {
        "train": blocks_of(train, tokenizer, args.block_size, args.max_sentence_len, "training text"),
        "selection": blocks_of(selection, tokenizer, args.block_size, args.max_sentence_len, "selection text"),
        "valid": blocks_of(valid, tokenizer, args.block_size, args.max_sentence_len, "validation text"),
    }
    blocks["curve"] = first_tokens(blocks["selection"], args.curve_tokens)
    blocks["final"] = first_tokens(blocks["valid"], args.eval_tokens)
    return blocks


def train_token(args, model, tokenizer, blocks, minutes: float):
    """Train a token model (``model``, or a fresh one of the study's shape) for ``minutes``."""
    config = token_config_like(sentence_lm_config(args, tokenizer), args.block_size + 8)
    set_seed(args.seed)
    trainer = token_baseline_trainer(config, tokenizer, blocks["train"],
                                     training_arguments(args, "token", args.lr, args.batch, weight_decay=0.01),
                                     model=model)  # fmt: skip
    curve = LearningCurveCallback(60 * minutes, lambda m: {"nll": token_model_nll(m, blocks["curve"])},
                                  every_seconds=60 * args.curve_minutes, clock=args.clock)  # fmt: skip
    trainer.add_callback(curve)
    show_time_budget(trainer)
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    return model, {"steps": trainer.state.global_step, "tokens": int(trainer.state.num_input_tokens_seen),
                   "curve": curve.points, "parameters": model.num_parameters()}  # fmt: skip


def convert(args, training: dict, vae_fields: dict, tokenizer, blocks, minutes: float):
    """The pretrained token model converted and trained for ``minutes``: stage 1 on its new
    SentenceVAE (``stage1_share`` of them), then the whole model with the recipe's levers."""
    token_dir = Path(args.workdir) / "token_model"
    teacher = AutoModelForCausalLM.from_pretrained(token_dir).eval()
    fields = {"max_sentence_len": args.max_sentence_len, "dropout": 0.0, **vae_fields}
    set_seed(args.seed)
    model = SentenceLMForCausalLM.from_pretrained_backbone(
        token_dir, tokenizer=tokenizer, sentence_vae_config=fields, copy_layers=training.get("copy_layers", False),
        max_position_embeddings=args.block_size + 8,
    )  # fmt: skip
    stage1_seconds = 60 * minutes * training.get("stage1_share", args.stage1_share)
    sentences = split_into_sentences(blocks["train"], tokenizer, args.max_sentence_len)
    stage1 = SentenceLMTrainer(
        model=model.sentence_vae, args=training_arguments(args, "stage1", training.get("stage1_lr", args.stage1_lr),
                                                          args.stage1_batch, weight_decay=0.01),
        train_dataset=sentences, data_collator=PaddingCollator(tokenizer.pad_token_id),
        callbacks=[TimeBudgetCallback(stage1_seconds, args.clock)],
    )  # fmt: skip
    stage1.train()
    stage1_tokens = int(stage1.state.num_input_tokens_seen)
    model.train()
    curve = LearningCurveCallback(60 * minutes - stage1_seconds, lambda m: {"nll": sentence_lm_nll(m, blocks["curve"])},
                                  every_seconds=60 * args.curve_minutes, clock=args.clock)  # fmt: skip
    callbacks = [curve]
    if training.get("freeze_backbone_steps"):
        callbacks.append(FrozenBackboneWarmup(training["freeze_backbone_steps"]))
    trainer_class, levers, train_data = SentenceLMTrainer, {}, blocks["train"]
    collator = PaddingCollator(tokenizer.pad_token_id)
    if "top_k_weight" in training:
        began = time.perf_counter()
        train_data = cache_teacher_top_k(teacher, train_data, k=training.get("top_k", 16))
        cache_seconds = time.perf_counter() - began
        trainer_class, levers = TopKDistillationTrainer, dict(distill_weight=training["top_k_weight"])
        collator = TopKCollator(tokenizer.pad_token_id)
    elif "hidden_state_weight" in training:
        trainer_class = HiddenStateDistillationTrainer
        levers = dict(teacher=teacher, hidden_state_weight=training.get("hidden_state_weight", 0.0),
                      teacher_condition_steps=training.get("teacher_condition_steps", 0))  # fmt: skip
    elif training.get("distill_weight"):
        trainer_class, levers = DistillationTrainer, dict(teacher=teacher, distill_weight=training["distill_weight"])
    stage2 = trainer_class(model=model, args=training_arguments(args, "stage2", training.get("lr", args.lr), args.batch,
                                                                weight_decay=0.01),
                           train_dataset=train_data, data_collator=collator, callbacks=callbacks, **levers)  # fmt: skip
    show_time_budget(stage2)
    stage2.train()
    model = stage2.accelerator.unwrap_model(stage2.model)
    points = [{**p, "seconds": p["seconds"] + stage1_seconds, "tokens": p["tokens"] + stage1_tokens} for p in curve.points]
    record = {"steps": stage2.state.global_step, "stage1_steps": stage1.state.global_step,
              "tokens": int(stage2.state.num_input_tokens_seen), "stage1_tokens": stage1_tokens,
              "curve": points, "parameters": model.num_parameters()}  # fmt: skip
    if "top_k_weight" in training:
        record["cache_seconds"] = round(cache_seconds, 1)  # the teacher's pass over the texts, not in the budget
    return model, record


def pretrain(args) -> dict:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    paragraphs = text_paragraphs(args.train_file)[: args.train_paragraphs][: -args.selection_paragraphs]
    tokenizer = train_sentence_tokenizer(paragraphs, vocab_size=args.vocab_size, max_sentence_len=args.max_sentence_len)
    tokenizer.save_pretrained(workdir / "token_model")  # first: the scratch recipe can start at once
    blocks = load_blocks(args, tokenizer)
    model, record = train_token(args, None, tokenizer, blocks, args.minutes)
    model.save_pretrained(workdir / "token_model")
    return finish(args, "pretrain", "token", model, record, blocks, offset=0.0)


def run(args) -> dict:
    kind, training, vae_fields = parse_recipe(args.recipe)
    tokenizer = SentenceTokenizer.from_pretrained(Path(args.workdir) / "token_model")
    blocks = load_blocks(args, tokenizer)
    offset = 0.0 if kind == "scratch" else json.loads((Path(args.workdir) / "pretrain.json").read_text())["seconds"]
    if kind == "token":
        start = AutoModelForCausalLM.from_pretrained(Path(args.workdir) / "token_model")
        model, record = train_token(args, start, tokenizer, blocks, args.minutes)
    elif kind == "scratch":
        model, record = train_sentence_lm(args, sentence_lm_config(args, tokenizer), tokenizer, blocks, blocks["curve"])
    else:
        model, record = convert(args, training, vae_fields, tokenizer, blocks, args.minutes)
    record.update(recipe=args.recipe, training=training, sentence_vae=vae_fields)
    return finish(args, args.name or kind, kind, model, record, blocks, offset)


def generation_speed(model, blocks, batch_size: int = 1, new_tokens: int = 64, repeats: int = 3) -> float:
    """Greedy tokens/s of ``generate()`` at ``batch_size``: ``new_tokens`` per row (exactly that
    many: ``min_new_tokens``) after the first 64 tokens of the first ``batch_size`` selection
    blocks that hold 64, median of ``repeats`` runs after a warm-up. Timed where the run trained
    (its core, its threads)."""
    prompts = [block["input_ids"][:64] for block in blocks["selection"] if len(block["input_ids"]) >= 64]
    if len(prompts) < batch_size:
        raise ValueError(f"generation_speed: {len(prompts)} selection blocks hold 64 tokens; batch {batch_size} needs "
                         f"that many (use a longer --selection_paragraphs or a smaller batch).")  # fmt: skip
    prompt = torch.tensor(prompts[:batch_size])
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    times = []
    with torch.no_grad():
        for attempt in range(repeats + 1):
            began = time.perf_counter()
            model.generate(prompt, attention_mask=torch.ones_like(prompt), **settings)
            if attempt:
                times.append(time.perf_counter() - began)
    return batch_size * new_tokens / sorted(times)[len(times) // 2]


def finish(args, name: str, kind: str, model, record: dict, blocks, offset: float) -> dict:
    """Score the final model and time its generation, shift its curve by ``offset`` seconds (the
    pretraining it builds on) and write the run's record to the work folder."""
    score = token_model_nll if kind == "token" else sentence_lm_nll
    model.eval()
    record.update(
        name=name, kind=kind, minutes=args.minutes, offset_seconds=offset, seconds=60 * args.minutes,
        selection_nll=score(model, blocks["curve"]), valid_nll=score(model, blocks["final"]),
        generation_tokens_per_s=generation_speed(model, blocks),
        curve=[{**p, "seconds": p["seconds"] + offset} for p in record["curve"]],
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=machine_info(torch.device(args.device)), threads=torch.get_num_threads(),
        command=shlex.join(["python", "benchmarks/conversion_study.py", *sys.argv[1:]]),
    )  # fmt: skip
    path = Path(args.workdir) / ("pretrain.json" if name == "pretrain" else f"runs/{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    print(json.dumps({k: record[k] for k in ("name", "steps", "tokens", "selection_nll", "valid_nll")}))
    return record


def minutes_to_reach(record: dict, target: float) -> tuple[float | None, str]:
    """Minutes of the run's own training (its pretraining not counted) until its curve first
    reaches ``target`` (linear between points), else where its power-law fit in seconds would."""
    curve, offset = record["curve"], record["offset_seconds"]
    for before, after in zip(curve, curve[1:]):
        if after["nll"] <= target:
            share = (before["nll"] - target) / (before["nll"] - after["nll"]) if before["nll"] > target else 0.0
            seconds = before["seconds"] + share * (after["seconds"] - before["seconds"])
            return (seconds - offset) / 60, "reached"
    fit = power_law([{**p, "seconds": p["seconds"] - offset} for p in curve[1:]], "seconds")
    if not fit or fit["b"] <= 0 or target <= 0:
        return None, "never (flat fit)"
    return (fit["a"] / target) ** (1 / fit["b"]) / 60, "fit"


def report(args) -> dict:
    workdir = Path(args.workdir)
    pretrained = json.loads((workdir / "pretrain.json").read_text())
    runs = [json.loads(path.read_text()) for path in sorted((workdir / "runs").glob("*.json"))]
    target = pretrained["selection_nll"]
    rows = []
    for record in [pretrained, *runs]:
        needed, how = minutes_to_reach(record, target) if record is not pretrained else (record["minutes"], "itself")
        rows.append({"name": record["name"], "recipe": record.get("recipe", "token (pretraining)"),
                     "minutes": record["minutes"], "total_minutes": (record["offset_seconds"] + record["seconds"]) / 60,
                     "steps": record["steps"], "tokens": record["tokens"] + record.get("stage1_tokens", 0),
                     "selection_nll": record["selection_nll"], "valid_nll": record["valid_nll"],
                     "generation_tokens_per_s": record.get("generation_tokens_per_s"),
                     "minutes_to_token_nll_at_P": needed, "how": how})  # fmt: skip
    lines = [
        f"Token model pretrained {pretrained['minutes']:g} minutes (P); NLL per token on the selection split at P: "
        f"{target:.4f} (valid {pretrained['valid_nll']:.4f}). Curves on the selection split; final figures also on "
        "WikiText-2 raw valid.",
        "",
        "| run | recipe | own minutes | minutes with P | steps | tokens | NLL selection | NLL valid | minutes to the token model's NLL at P | generation tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        needed = "-" if r["minutes_to_token_nll_at_P"] is None else f"{r['minutes_to_token_nll_at_P']:.3g} ({r['how']})"
        speed = "-" if r["generation_tokens_per_s"] is None else f"{r['generation_tokens_per_s']:.0f}"
        lines.append(f"| {r['name']} | `{r['recipe']}` | {r['minutes']:g} | {r['total_minutes']:g} | {r['steps']} | "
                     f"{r['tokens']:,} | {r['selection_nll']:.4f} | {r['valid_nll']:.4f} | {needed} | {speed} |")  # fmt: skip
    text = "\n".join(lines)
    print(text)
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rows": rows,
               "pretrain": pretrained, "runs": runs}  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.report:
        Path(args.report).write_text(text + "\n")
    if args.plot:
        curves = {r["name"]: r["curve"] for r in [pretrained, *runs]}
        fits = {r["name"]: {"tokens": power_law(r["curve"][1:], "tokens"), "seconds": power_law(r["curve"][1:], "seconds")}
                for r in [pretrained, *runs]}  # fmt: skip
        plot_curves(curves, fits, args.plot, ylabel="selection NLL per token")
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)  # fmt: skip
    p.add_argument("step", choices=["pretrain", "run", "report"])
    p.add_argument("--workdir", required=True, help="The study's folder (tokenizer, token model, run records).")
    p.add_argument("--recipe", default="convert", help="run: token, scratch or convert[:key=value,...].")
    p.add_argument("--name", help="run: the record's name (default: the recipe's kind).")
    p.add_argument("--minutes", type=float, default=20.0, help="Training minutes of this step.")
    p.add_argument("--selection_paragraphs", type=int, default=200, help="Held-out tail of the training file.")
    p.add_argument("--output_dir", default="runs/conversion_study", help="The Trainer's folders (it saves nothing there).")
    add_setting_arguments(p)  # from_scratch.py's data, shape, training and output options
    args = p.parse_args(argv)
    if args.step == "run":
        parse_recipe(args.recipe)  # refuse a bad recipe before any work
    return args


def main(argv=None):
    began = time.perf_counter()
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"pretrain": pretrain, "run": run, "report": report}[args.step](args)
    print(f"({args.step}: {time.perf_counter() - began:.0f} s)")
    return result


if __name__ == "__main__":
    main()
