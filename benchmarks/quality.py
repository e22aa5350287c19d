#!/usr/bin/env python
"""Quality benchmark: a Sentence-level LLM against a token-level OPT on the same text, the same
token ids and the same number of training tokens.

For every dataset (``grimm`` and ``tinyshakespeare`` from ``../shared/data``; the last 10% of
each file's lines are held out for validation):

1. one byte-level BPE :class:`~sentence_lm.SentenceTokenizer` is trained on the training
   paragraphs and used by every model, and one set of text examples is built with
   :func:`~sentence_lm.data.tokenize_texts` (texts of at most ``--block_size`` tokens, a BOS
   in front): the training and validation data of every model;
2. the models' shapes come from one place, :func:`sentence_opt_config` (the SentenceOPT of
   SentenceVAE-H); the baseline is the token model of its backbone,
   :func:`sentence_lm.baseline.token_config_like` (an ``OPTForCausalLM`` of the backbone's shape
   with the tokenizer's vocabulary), trained with the ``Trainer`` and
   ``DataCollatorForLanguageModeling(mlm=False)`` for ``max_steps`` steps of ``--batch_size``
   texts (about ``--train_tokens`` tokens);
   A second baseline, ``OPT+S1``, is trained for as many tokens as an SLLM's stage 1 and stage 2
   together (``--no-opt_with_stage1_tokens`` leaves it out);
3. for every H in ``--heads`` a SentenceVAE-H (H encoder and H decoder layers) is trained in
   stage 1 (about ``--vae_train_tokens`` sentence tokens, with the library's
   ``SentenceLMTrainer`` and ``PaddingCollator`` on the sentences of
   :func:`~sentence_lm.data.split_into_sentences`), then a SentenceOPT with that SentenceVAE
   (fine-tuned) and that config's backbone (every OPT field given to
   :func:`~sentence_lm.training_sentence_opt.build_sentence_opt`) is trained in stage 2
   (``SentenceLMTrainer``, ``PaddingCollator``) on the same text examples, with the same batch
   size, steps, seed (so the same examples in the same order), optimizer and schedule as the
   baseline: the same training tokens, counted by the Trainer (``num_input_tokens_seen``,
   non-padding);
4. everything is evaluated on the same validation examples.

The stages are driven here rather than through ``train_sentence_vae``/``train_sentence_opt``
so that every model reads the very same tokenized datasets and the Trainer counts non-padding
tokens (``include_num_input_tokens_seen="non_padding"``, which the entry points' command-line
parser cannot take: ``HfArgumentParser`` reads that ``str | bool`` field as a boolean).

Accounting (the same original tokens for both models):

* OPT reads ``[BOS, t_1, ..., t_n]`` and is charged ``-log p(t_i | BOS, t_<i)`` for
  ``i = 1..n``: every original token, none for BOS (given) and no end-of-text event (OPT's
  causal-LM loss has none).
* The SLLM is charged its whole-text negative log-likelihood (``text_nll``): every sentence's
  tokens *and* its end-of-sentence token given the previous sentences (the first sentence from
  the start state, which stands for the BOS), plus one stop decision per sentence and one at the
  end of the text. The sum is divided by the same ``n`` original tokens. The end-of-sentence
  tokens and stop decisions are extra events that OPT does not pay for, so this accounting
  favours OPT slightly; their share is reported separately.

Both numbers are sums over the validation set divided by token counts (not means of per-text
means); the script checks that the two token counts are equal. Perplexity is ``exp`` of the NLL
per token. Reconstruction token accuracy and exact match of each stage-1 SentenceVAE are
measured with :func:`~sentence_lm.metrics.reconstruction_metrics` on the validation sentences.

Example (the recorded run, see benchmarks/QUALITY.md)::

    python benchmarks/quality.py --output_dir /work/runs/quality \
        --json benchmarks/quality_results.json --max_minutes_per_model 10

Results go to ``--output_dir`` (models, ``quality.json``), ``--json`` and ``--report``
(Markdown).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __name__ == "__main__":
    # Passive OpenMP waiting: on a CPU shared with other jobs, busy-waiting torch threads slowed a
    # training step forty-fold (0.09 s uncontended; 3.7 s beside two busy processes, 0.37 s with
    # PASSIVE). Only effective before torch is first imported, so only when run as a script.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

DATASETS = {
    # name: (file under the data directory, keep_linebreaks). Grimm is hard-wrapped prose (its
    # line breaks are not sentence ends); tiny Shakespeare is verse (a line break ends a sentence).
    "grimm": ("grimm/tales.txt", False),
    "tinyshakespeare": ("tinyshakespeare/input.txt", True),
}

LONG_OPT = "OPT+S1"
"""The second baseline: OPT trained on as many tokens as the SLLM's stage 1 and stage 2 together."""

TARGET_RATIO = 1.10
"""The target: SLLM NLL per original token at most 10% above OPT's."""


def default_data_dir() -> Path:
    """``../shared/data`` next to the repository (``<repo>/../shared/data``)."""
    return Path(__file__).resolve().parents[2] / "shared" / "data"


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------
@dataclass
class QualitySettings:
    """Everything that defines a run (shared by all models unless the name says otherwise)."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    ffn_dim: int = 512
    vocab_size: int = 2048
    block_size: int = 128
    max_sentence_len: int = 32
    train_tokens: int = 400_000
    vae_train_tokens: int = 200_000
    batch_size: int = 16
    vae_batch_size: int = 128
    learning_rate: float = 1e-3
    vae_learning_rate: float = 2e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    heads: list[int] = field(default_factory=lambda: [1, 2, 4])
    seed: int = 0
    eval_batch_size: int = 32
    max_reconstruction_sentences: int | None = None
    max_minutes_per_model: float | None = None
    max_lines: int | None = None
    logging_steps: int = 25
    opt_with_stage1_tokens: bool = True

    def common_training_args(self, max_steps: int) -> dict:
        """TrainingArguments shared by the baseline and stage 2 (same optimizer, schedule, seed)."""
        return {
            "max_steps": max_steps,
            "per_device_train_batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "weight_decay": self.weight_decay,
            "warmup_steps": self.warmup_ratio,
            "lr_scheduler_type": "cosine",
            "seed": self.seed,
            "logging_steps": self.logging_steps,
            "save_strategy": "no",
            "report_to": "none",
            "disable_tqdm": True,
            "include_num_input_tokens_seen": "non_padding",
            "dataloader_num_workers": 0,
            "use_cpu": not torch.cuda.is_available(),
        }


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
@dataclass
class PreparedData:
    """One dataset, tokenized once for every model."""

    name: str
    train_file: str
    keep_linebreaks: bool
    tokenizer: object
    tokenizer_dir: str
    texts: object  # DatasetDict of text examples (train / validation)
    sentences: object  # DatasetDict of sentences (train / validation)

    def mean_text_tokens(self) -> float:
        """Mean tokens per training text example (BOS included): the Trainer's non-padding count."""
        lengths = self.texts["train"]["length"]
        return sum(lengths) / len(lengths)

    def mean_sentence_tokens(self) -> float:
        lengths = self.sentences["train"]["length"]
        return sum(lengths) / len(lengths)


def prepare_data(
    name: str,
    train_file: str | os.PathLike,
    keep_linebreaks: bool,
    settings: QualitySettings,
    work_dir: str | os.PathLike,
) -> PreparedData:
    """Split the file's lines 90/10 (last 10% held out), train the shared tokenizer on the training
    paragraphs (saved to ``work_dir/tokenizer``), and build the text examples and sentences of
    both splits."""
    from sentence_lm import train_sentence_tokenizer
    from sentence_lm.data import DataArguments, load_texts, split_into_sentences, tokenize_texts

    train_file = str(train_file)
    if settings.max_lines is not None:  # a shorter copy of the file, for quick runs and tests
        from sentence_lm.corpus import read_text_lines

        lines = read_text_lines(train_file)[: settings.max_lines]
        os.makedirs(work_dir, exist_ok=True)
        train_file = os.path.join(work_dir, "text.txt")
        with open(train_file, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
    data_args = DataArguments(
        train_file=train_file,
        validation_split_percentage=10,
        block_size=settings.block_size,
        keep_linebreaks=keep_linebreaks,
    )
    raw = load_texts(data_args)
    tokenizer = train_sentence_tokenizer(
        raw["train"]["text"], vocab_size=settings.vocab_size, max_sentence_len=settings.max_sentence_len
    )
    tokenizer_dir = os.path.join(work_dir, "tokenizer")
    tokenizer.save_pretrained(tokenizer_dir)
    texts, sentences = {}, {}
    for split in ("train", "validation"):
        texts[split] = tokenize_texts(
            raw[split], tokenizer, settings.block_size, settings.max_sentence_len, desc=f"{name}: {split} texts"
        )
        sentences[split] = split_into_sentences(
            texts[split], tokenizer, settings.max_sentence_len, desc=f"{name}: {split} sentences"
        )
    return PreparedData(name, train_file, keep_linebreaks, tokenizer, tokenizer_dir, texts, sentences)


def steps_for(tokens: int, batch_size: int, mean_tokens: float) -> int:
    """Optimizer steps that see about ``tokens`` tokens in batches of ``batch_size`` examples."""
    return max(1, math.ceil(tokens / (batch_size * mean_tokens)))


def tokens_seen(output_dir: str | os.PathLike) -> int | None:
    """The Trainer's ``num_input_tokens_seen`` (non-padding) from ``trainer_state.json``."""
    path = Path(output_dir) / "trainer_state.json"
    if not path.is_file():
        return None
    return int(json.loads(path.read_text()).get("num_input_tokens_seen", 0))


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
def sentence_opt_config(tokenizer, settings: QualitySettings, heads: int = 1):
    """The SentenceOPT of SentenceVAE-H (H encoder and H decoder layers) with the settings' backbone
    and the tokenizer's vocabulary: the one place the models' shapes come from. Stage 1 builds its
    ``sentence_vae``, stage 2 its ``backbone``, and the baseline is
    ``token_config_like(config, settings.block_size)`` (the same for every H)."""
    from sentence_lm import SentenceOPTConfig
    from sentence_lm.training_sentence_vae import SentenceVAEArguments, build_sentence_vae_config

    shape = dict(num_attention_heads=settings.num_attention_heads, ffn_dim=settings.ffn_dim, dropout=0.0)
    vae_args = SentenceVAEArguments(
        hidden_size=settings.hidden_size, num_encoder_layers=heads, num_decoder_layers=heads,
        max_sentence_len=settings.max_sentence_len, **shape,
    )  # fmt: skip
    return SentenceOPTConfig(
        sentence_vae=build_sentence_vae_config(vae_args, tokenizer),
        hidden_size=settings.hidden_size,
        num_hidden_layers=settings.num_hidden_layers,
        max_position_embeddings=settings.block_size + 1,  # sentence slots: the start state and one per sentence
        **shape,
    )


def train_baseline(config, data: PreparedData, settings: QualitySettings, max_steps: int, output_dir: str):
    """Train a fresh token model of ``config`` on the training text examples with
    :func:`sentence_lm.baseline.token_baseline_trainer`, through :func:`_train` (time budget and
    record). Returns ``(model, record)``."""
    from transformers import set_seed

    from sentence_lm.baseline import token_baseline_trainer

    set_seed(settings.seed)
    args = training_arguments(settings, output_dir, max_steps)
    trainer = token_baseline_trainer(config, data.tokenizer, data.texts["train"], args)
    record = _train(trainer, settings)
    return trainer.accelerator.unwrap_model(trainer.model), record


# --------------------------------------------------------------------------------------------
# Sentence-level LLM
# --------------------------------------------------------------------------------------------
def _train(trainer, settings: QualitySettings) -> dict:
    """Run ``trainer.train()`` (under the per-model time budget) and save its state; the record
    of what it did."""
    from sentence_lm.trainer import TimeBudgetCallback

    budget = None
    if settings.max_minutes_per_model is not None:
        budget = TimeBudgetCallback(60 * settings.max_minutes_per_model)
        trainer.add_callback(budget)
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_state()
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {
        "steps": trainer.state.global_step,
        "train_tokens": int(trainer.state.num_input_tokens_seen),
        "train_seconds": seconds,
        "train_loss": float(result.training_loss),
        "stopped_by_time_budget": budget is not None and budget.stopped_at_step is not None,
        "num_parameters": model.num_parameters(),
    }


def training_arguments(settings: QualitySettings, output_dir: str, max_steps: int, **overrides):
    """``TrainingArguments`` of the baseline and stage 2 (``overrides`` for stage 1)."""
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=output_dir, **dict(settings.common_training_args(max_steps), **overrides))


def train_vae(data: PreparedData, settings: QualitySettings, config, max_steps: int, output_dir: str) -> dict:
    """Stage 1: a SentenceVAE of ``config`` (the ``sentence_vae`` of :func:`sentence_opt_config`)
    trained on the training sentences with the library's Trainer and collator, saved with the
    shared tokenizer to ``output_dir``."""
    from transformers import set_seed

    from sentence_lm import SentenceVAEModel
    from sentence_lm.data import PaddingCollator
    from sentence_lm.trainer import SentenceLMTrainer

    set_seed(settings.seed)
    model = SentenceVAEModel(config)
    model.set_boundary_table(data.tokenizer)
    args = training_arguments(
        settings,
        output_dir,
        max_steps,
        per_device_train_batch_size=settings.vae_batch_size,
        learning_rate=settings.vae_learning_rate,
        train_sampling_strategy="group_by_length",  # stage 1's default: less padding
        remove_unused_columns=False,
    )
    trainer = SentenceLMTrainer(
        model=model,
        args=args,
        train_dataset=data.sentences["train"],
        data_collator=PaddingCollator(data.tokenizer.pad_token_id),
        processing_class=data.tokenizer,
    )
    record = _train(trainer, settings)
    trainer.save_model()
    data.tokenizer.save_pretrained(output_dir)
    return record


def vae_reconstruction(vae_dir: str, data: PreparedData, settings: QualitySettings) -> dict:
    """Reconstruction token accuracy and exact match of a saved SentenceVAE on the validation
    sentences (all of them, or the first ``max_reconstruction_sentences``)."""
    from sentence_lm import SentenceVAEModel
    from sentence_lm.metrics import reconstruction_metrics

    model = SentenceVAEModel.from_pretrained(vae_dir)
    held_out = data.sentences["validation"]
    if settings.max_reconstruction_sentences is not None:
        held_out = held_out.select(range(min(settings.max_reconstruction_sentences, len(held_out))))
    return reconstruction_metrics(model, held_out, batch_size=256, show_progress=False)


def train_sllm(
    data: PreparedData, settings: QualitySettings, backbone, vae_dir: str, max_steps: int, output_dir: str
) -> tuple[object, dict]:
    """Stage 2: a SentenceOPT with the stage-1 SentenceVAE (fine-tuned) and the ``backbone`` of
    :func:`sentence_opt_config`, built by the library's ``build_sentence_opt`` (every OPT field
    given, so nothing is left to its defaults) and trained with its Trainer and collator on the
    same text examples and with the same training arguments as the baseline.
    Returns ``(model, record)``."""
    from transformers import set_seed

    from sentence_lm.configuration_sentence_opt import OPT_FIELDS
    from sentence_lm.data import PaddingCollator
    from sentence_lm.trainer import SentenceLMTrainer
    from sentence_lm.training_sentence_opt import SentenceOPTArguments, build_sentence_opt

    backbone = ",".join(f"{name}={getattr(backbone, name)!r}" for name in OPT_FIELDS)
    set_seed(settings.seed)
    model, tokenizer = build_sentence_opt(
        SentenceOPTArguments(sentence_vae_name_or_path=vae_dir, backbone_config=backbone), []
    )
    if tokenizer.get_vocab() != data.tokenizer.get_vocab():
        raise RuntimeError(f"The SentenceVAE in {vae_dir} was saved with another tokenizer.")
    args = training_arguments(settings, output_dir, max_steps, remove_unused_columns=False)
    trainer = SentenceLMTrainer(
        model=model,
        args=args,
        train_dataset=data.texts["train"],
        data_collator=PaddingCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    record = _train(trainer, settings)
    return trainer.accelerator.unwrap_model(trainer.model), record


@torch.no_grad()
def sllm_nll_parts(model, dataset, batch_size: int = 32) -> dict:
    """Split a SentenceOPT's whole-text NLL on text examples into its three parts, in nats per
    original token: ``tokens`` (the sentences' own tokens), ``eos`` (the end-of-sentence tokens)
    and ``stop`` (the stop decisions), from the output's per-text sums ``sentence_nll``,
    ``end_nll`` and ``stop_nll``. Their sum is ``nll_per_token`` (the same total as :func:`text_nll`)."""
    from sentence_lm.data import PaddingCollator

    was_training = model.training
    model.eval()
    collate = PaddingCollator(model.config.pad_token_id)
    device = next(model.parameters()).device
    sums = {"total": 0.0, "sentences": 0.0, "eos": 0.0, "stop": 0.0}
    count, sentences = 0, 0
    no_logits = torch.empty(0, dtype=torch.long)
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        out = model(ids, attention_mask=mask, logits_to_keep=no_logits)
        sums["total"] += float(out.nll.sum())
        sums["sentences"] += float(out.sentence_nll.sum())
        sums["eos"] += float(out.end_nll.sum())
        sums["stop"] += float(out.stop_nll.sum())
        count += int(out.num_tokens.sum())
        sentences += int(out.num_sentences.sum())
    model.train(was_training)
    eos, stop = sums["eos"] / count, sums["stop"] / count
    return {
        "nll_per_token": sums["total"] / count,
        "tokens": (sums["sentences"] - sums["eos"]) / count,
        "eos": eos,
        "stop": stop,
        "num_tokens": count,
        "num_sentences": sentences,
        "tokens_per_sentence": count / max(sentences, 1),
    }


# --------------------------------------------------------------------------------------------
# One dataset, all models
# --------------------------------------------------------------------------------------------
def run_dataset(data: PreparedData, settings: QualitySettings, output_dir: str, log=print) -> dict:
    """Train and evaluate the baseline and the SLLM of every H on one prepared dataset."""
    from sentence_lm.baseline import token_config_like, token_nll
    from sentence_lm.training_sentence_opt import text_nll

    validation = data.texts["validation"]
    steps = steps_for(settings.train_tokens, settings.batch_size, data.mean_text_tokens())
    vae_steps = steps_for(settings.vae_train_tokens, settings.vae_batch_size, data.mean_sentence_tokens())
    record: dict = {
        "dataset": data.name,
        "train_file": data.train_file,
        "train_texts": len(data.texts["train"]),
        "train_text_tokens": int(sum(data.texts["train"]["length"])),
        "validation_texts": len(validation),
        "validation_sentences": len(data.sentences["validation"]),
        "max_steps": steps,
        "vae_max_steps": vae_steps,
        "models": [],
    }
    log(
        f"[{data.name}] {record['train_texts']} training texts ({record['train_text_tokens']} tokens), "
        f"{len(validation)} validation texts; {steps} steps of {settings.batch_size} texts, "
        f"stage 1: {vae_steps} steps of {settings.vae_batch_size} sentences"
    )

    opt_config = token_config_like(sentence_opt_config(data.tokenizer, settings), settings.block_size)
    model, train = train_baseline(opt_config, data, settings, steps, os.path.join(output_dir, "opt"))
    log(f"[{data.name}] OPT trained: {train}")
    evaluation = token_nll(model, validation, None, settings.eval_batch_size, show_progress=False)
    log(f"[{data.name}] OPT validation: {evaluation}")
    baseline = {"model": "OPT", "heads": None, "train": train, "eval": evaluation}
    record["models"].append(baseline)
    del model

    if settings.opt_with_stage1_tokens:
        # The SLLM also saw stage-1 sentence tokens: a second baseline with that many more tokens.
        more = steps_for(
            settings.train_tokens + settings.vae_train_tokens, settings.batch_size, data.mean_text_tokens()
        )
        model, train = train_baseline(opt_config, data, settings, more, os.path.join(output_dir, "opt_plus_stage1"))
        evaluation = token_nll(model, validation, None, settings.eval_batch_size, show_progress=False)
        log(f"[{data.name}] {LONG_OPT} validation: {evaluation} (trained: {train})")
        record["models"].append({"model": LONG_OPT, "heads": None, "train": train, "eval": evaluation})
        del model

    for heads in settings.heads:
        name = f"SLLM-H{heads}"
        vae_dir = os.path.join(output_dir, f"svae_h{heads}")
        config = sentence_opt_config(data.tokenizer, settings, heads)
        vae_train = train_vae(data, settings, config.sentence_vae, vae_steps, vae_dir)
        log(f"[{data.name}] SentenceVAE-H{heads} trained: {vae_train}")
        start = time.perf_counter()
        reconstruction = vae_reconstruction(vae_dir, data, settings)
        reconstruction["seconds"] = time.perf_counter() - start
        log(f"[{data.name}] SentenceVAE-H{heads} reconstruction: {reconstruction}")

        model, train = train_sllm(
            data, settings, config.backbone, vae_dir, steps, os.path.join(output_dir, f"sllm_h{heads}")
        )
        log(f"[{data.name}] {name} trained: {train}")
        evaluation = text_nll(model, validation, settings.eval_batch_size, show_progress=False)
        parts = sllm_nll_parts(model, validation, settings.eval_batch_size)
        log(f"[{data.name}] {name} validation: {evaluation}; parts {parts}")
        if evaluation["num_tokens"] != baseline["eval"]["num_tokens"]:
            raise RuntimeError(
                f"{name} was evaluated on {evaluation['num_tokens']} tokens but OPT on "
                f"{baseline['eval']['num_tokens']}: the accounting is not the same."
            )
        if abs(parts["nll_per_token"] - evaluation["nll_per_token"]) > 1e-4 * max(1.0, evaluation["nll_per_token"]):
            raise RuntimeError(f"NLL parts do not add up: {parts['nll_per_token']} vs {evaluation['nll_per_token']}")
        ratio = evaluation["nll_per_token"] / baseline["eval"]["nll_per_token"]
        long_opt = next((m for m in record["models"] if m["model"] == LONG_OPT), None)
        record["models"].append(
            {
                "model": name,
                "heads": heads,
                "vae_train": vae_train,
                "reconstruction": reconstruction,
                "train": train,
                "eval": evaluation,
                "nll_parts": parts,
                "ratio_to_opt": ratio,
                "target_met": ratio <= TARGET_RATIO,
                "ratio_to_opt_with_stage1_tokens": (
                    None if long_opt is None else evaluation["nll_per_token"] / long_opt["eval"]["nll_per_token"]
                ),
            }
        )
        del model
    return record


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
TABLE_COLUMNS = (
    "dataset",
    "model",
    "params",
    "steps",
    "train tokens",
    "val tokens",
    "NLL/token",
    "perplexity",
    "ratio SLLM/OPT",
    "PPL ratio",
    "within 10%",
    "recon acc",
    "exact match",
    "train s",
)


def opt_of(dataset: dict) -> dict | None:
    """A dataset's OPT baseline record (``None`` when it has none)."""
    return next((m for m in dataset["models"] if m["model"] == "OPT"), None)


def sllm_records(results: dict, key: str):
    """``(dataset, its OPT record, model record)`` for each model record that holds ``key``."""
    for dataset in results["datasets"]:
        opt = opt_of(dataset)
        for m in dataset["models"]:
            if key in m:
                yield dataset, opt, m


def table_rows(results: dict) -> list[list[str]]:
    """Rows of the main table, one per model and dataset."""
    rows = []
    for dataset in results["datasets"]:
        opt = opt_of(dataset)
        opt_ppl = opt["eval"]["perplexity"] if opt else float("nan")
        for m in dataset["models"]:
            rec = m.get("reconstruction")
            rows.append(
                [
                    dataset["dataset"],
                    m["model"],
                    f"{m['train']['num_parameters'] / 1e6:.2f}M",
                    str(m["train"]["steps"]),
                    str(m["train"]["train_tokens"]),
                    str(m["eval"]["num_tokens"]),
                    f"{m['eval']['nll_per_token']:.4f}",
                    f"{m['eval']['perplexity']:.2f}",
                    "-" if "ratio_to_opt" not in m else f"{m['ratio_to_opt']:.3f}",
                    "-" if "ratio_to_opt" not in m else f"{m['eval']['perplexity'] / opt_ppl:.2f}",
                    "-" if "target_met" not in m else ("yes" if m["target_met"] else "NO"),
                    "-" if rec is None else f"{rec['token_accuracy']:.4f}",
                    "-" if rec is None else f"{rec['exact_match']:.4f}",
                    f"{m['train']['train_seconds']:.0f}",
                ]
            )
    return rows


PARTS_COLUMNS = (
    "dataset",
    "model",
    "tokens/sentence",
    "sentence tokens",
    "end-of-sentence",
    "stop decisions",
    "total",
    "OPT",
    "tokens only / OPT",
    "ratio vs OPT+S1",
    "stage-1 tokens",
    "stage-1 s",
)


def parts_rows(results: dict) -> list[list[str]]:
    """The SLLMs' NLL per original token split into its parts, against OPT's."""
    rows = []
    for dataset, opt, m in sllm_records(results, "nll_parts"):
        p = m["nll_parts"]
        base = opt["eval"]["nll_per_token"] if opt else float("nan")
        rows.append(
            [
                dataset["dataset"],
                m["model"],
                f"{p['tokens_per_sentence']:.2f}",
                f"{p['tokens']:.4f}",
                f"{p['eos']:.4f}",
                f"{p['stop']:.4f}",
                f"{p['nll_per_token']:.4f}",
                f"{base:.4f}",
                f"{p['tokens'] / base:.3f}",
                "-" if m.get("ratio_to_opt_with_stage1_tokens") is None
                else f"{m['ratio_to_opt_with_stage1_tokens']:.3f}",
                str(m["vae_train"]["train_tokens"]),
                f"{m['vae_train']['train_seconds']:.0f}",
            ]
        )
    return rows


def format_table(columns, rows, markdown: bool = False) -> str:
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def verdicts(results: dict) -> list[str]:
    """One plain sentence per SLLM: target met or not, by how much, and the main reason."""
    lines = []
    for dataset, opt, m in sllm_records(results, "ratio_to_opt"):
        p, base = m["nll_parts"], opt["eval"]["nll_per_token"]
        gap = m["eval"]["nll_per_token"] - base
        head = (
            f"- **{dataset['dataset']}, {m['model']}**: NLL/token {m['eval']['nll_per_token']:.3f} vs OPT "
            f"{base:.3f} (ratio {m['ratio_to_opt']:.3f}): "
        )
        long_ratio = m.get("ratio_to_opt_with_stage1_tokens")
        also = (
            ""
            if long_ratio is None
            else f" Against {LONG_OPT} (OPT trained on the stage-1 + stage-2 token count) the ratio is "
            f"{long_ratio:.3f}{' (above 1.10)' if long_ratio > TARGET_RATIO else ''}."
        )
        if m["target_met"]:
            lines.append(head + "target met." + also)
            continue
        token_gap = p["tokens"] - base
        extra = p["eos"] + p["stop"]
        lines.append(
            head
            + f"target NOT met ({100 * (m['ratio_to_opt'] - 1):.0f}% above OPT; the target is 10%). Of the "
            f"{gap:.3f}-nat gap, {token_gap:.3f} is on the sentence tokens themselves and {extra:.3f} is the "
            f"end-of-sentence tokens and stop decisions that OPT does not pay for; the SentenceVAE alone "
            f"reconstructs {100 * m['reconstruction']['token_accuracy']:.1f}% of held-out tokens "
            f"({100 * m['reconstruction']['exact_match']:.1f}% of sentences exactly)."
            + also
        )
    return lines


HAND_WRITTEN_MARKER = "<!-- hand-written: kept when the report is regenerated -->"
"""Everything from this line on in an existing report survives a rewrite."""


def write_markdown(results: dict, path: str | os.PathLike) -> str:
    """Write the report (machine, versions, command, tables, verdicts) and return its text. The part
    of an existing report from :data:`HAND_WRITTEN_MARKER` on is kept."""
    s, info = results["settings"], results["machine"]
    finished = {d["dataset"] for d in results["datasets"]}
    missing = [d for d in results["requested_datasets"] if d not in finished]
    lines = [
        "# Quality: SentenceOPT (SLLM) vs OPT at equal training tokens",
        "",
        "Generated by `benchmarks/quality.py` (this file is rewritten by every run).",
        "",
        "## Setup",
        "",
        f"- Machine: {info['cpu']}, {info['cpu_count']} cores (shared with other jobs; load average "
        f"{info['load_average_at_start']} at start), `torch.set_num_threads({info['torch_threads']})`, "
        f"OMP_WAIT_POLICY={info.get('omp_wait_policy')}, "
        f"{info['device']}.",
        f"- Versions: Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, "
        f"datasets {info['datasets']}, tokenizers {info['tokenizers']}; sentence_lm at git {info['git_commit']} "
        "(plus the working tree).",
        f"- Command: `{results['command']}`",
        f"- Wall-clock: {results['wall_seconds'] / 60:.1f} min.",
        f"- Backbone (OPT baseline and SLLM backbone alike): hidden {s['hidden_size']}, "
        f"{s['num_hidden_layers']} layers, {s['num_attention_heads']} heads, FFN {s['ffn_dim']}, dropout 0. "
        f"SentenceVAE-H: H encoder and H decoder layers of the same width/heads/FFN, "
        f"max_sentence_len {s['max_sentence_len']}.",
        f"- Data: one byte-level BPE tokenizer ({s['vocab_size']} tokens) per dataset, trained on its training "
        f"paragraphs and shared by every model; text examples of at most {s['block_size']} tokens (BOS "
        "included) from `tokenize_texts`; validation = the last 10% of the file's lines. Grimm is read with "
        "its hard line breaks joined (`keep_linebreaks=False`; the file's few Project Gutenberg marker and "
        "transcriber's-note lines are kept), tiny Shakespeare with line breaks kept.",
        f"- Training (OPT and stage 2 identical): AdamW, lr {s['learning_rate']}, cosine schedule with "
        f"{s['warmup_ratio']:.0%} warm-up, weight decay {s['weight_decay']}, batch {s['batch_size']} texts, "
        f"seed {s['seed']}, the same number of steps (about {s['train_tokens']} tokens), so the same examples "
        "in the same order. `train tokens` is the Trainer's `num_input_tokens_seen` (non-padding, one BOS per "
        "text included); it is equal for OPT and every SLLM of a dataset. "
        f"Stage 1 (not counted in `train tokens`): about {s['vae_train_tokens']} sentence tokens per "
        f"SentenceVAE (batch {s['vae_batch_size']} sentences, lr {s['vae_learning_rate']}); the SentenceVAE "
        "is then fine-tuned in stage 2.",
        f"- `{LONG_OPT}`: a second OPT baseline, trained the same way for as many tokens as stage 1 and stage "
        "2 of an SLLM together (the SLLM's decoder has, in effect, been pre-trained on the stage-1 sentences)."
        if s.get("opt_with_stage1_tokens")
        else "",
        "- Accounting: OPT is charged -log p of every original token t_1..t_n given BOS and the tokens "
        "before it (not BOS itself, and no end-of-text event). The SLLM is charged its whole-text NLL "
        "(`text_nll`): sentence tokens, one end-of-sentence token per sentence and one stop decision per "
        "sentence plus one at the end, divided by the same n. `val tokens` shows that n is the same for "
        "both; perplexity = exp(NLL/token).",
        "",
    ]
    if missing:
        lines += [f"**Not finished:** {', '.join(missing)} (the run stopped before these).", ""]
    lines += ["## Results", "", format_table(TABLE_COLUMNS, table_rows(results), markdown=True), ""]
    lines += [
        "`recon acc` / `exact match`: the stage-1 SentenceVAE encoding each held-out sentence and writing it "
        "back greedily (`sentence_lm.metrics.reconstruction_metrics`; end-of-sentence token included in "
        "the positions).",
        "",
        "### Where the SLLM's NLL goes (nats per original token)",
        "",
        format_table(PARTS_COLUMNS, parts_rows(results), markdown=True),
        "",
        "`sentence tokens` is the NLL of the text's own tokens only (what OPT is charged for); "
        "`tokens only / OPT` compares just that part.",
        "",
        "## Target: SLLM NLL per original token within 10% of OPT's",
        "",
        *verdicts(results),
        "",
    ]
    text = "\n".join(lines)
    path = Path(path)
    if path.is_file():  # keep a hand-written part of an earlier report
        old = path.read_text()
        if HAND_WRITTEN_MARKER in old:
            text += "\n" + old[old.index(HAND_WRITTEN_MARKER) :]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    defaults = QualitySettings()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--data_dir", type=Path, default=default_data_dir())
    p.add_argument("--train_file", default=None, help="Use this text file instead of --datasets (named after it).")
    p.add_argument("--keep_linebreaks", type=lambda v: v.lower() in ("1", "true", "yes"), default=True,
                   help="With --train_file: keep line breaks inside paragraphs.")
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim", "vocab_size", "block_size",
                 "max_sentence_len", "train_tokens", "vae_train_tokens", "batch_size", "vae_batch_size", "seed",
                 "eval_batch_size", "logging_steps"):
        p.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
    for name in ("learning_rate", "vae_learning_rate", "weight_decay", "warmup_ratio"):
        p.add_argument(f"--{name}", type=float, default=getattr(defaults, name))
    p.add_argument("--heads", nargs="+", default=["H1", "H2", "H4"],
                   help="SentenceVAE depths: H1 H2 H4 (or 1 2 4).")
    p.add_argument("--max_reconstruction_sentences", type=int, default=None)
    p.add_argument("--opt_with_stage1_tokens", action=argparse.BooleanOptionalAction, default=True,
                   help=f"Also train {LONG_OPT}: OPT on train_tokens + vae_train_tokens tokens.")
    p.add_argument("--max_minutes_per_model", type=float, default=None,
                   help="Stop any one training after this many minutes (its token count is then reported as is).")
    p.add_argument("--max_lines", type=int, default=None, help="Use only the first N lines of each file (quick runs).")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (0: leave torch's setting).")
    p.add_argument("--output_dir", default=str(REPO_ROOT / "outputs" / "quality"))
    p.add_argument("--json", default=None, help="Results JSON (default: <output_dir>/quality.json).")
    p.add_argument("--from_json", default=None,
                   help="Only rewrite --report (and print the tables) from this results JSON; no training.")
    p.add_argument("--report", default=str(Path(__file__).resolve().parent / "QUALITY.md"), help="Markdown report.")
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> QualitySettings:
    values = {k: getattr(args, k) for k in QualitySettings.__dataclass_fields__ if hasattr(args, k) and k != "heads"}
    heads = [int(str(h).upper().lstrip("H")) for h in args.heads]
    return QualitySettings(**values, heads=heads)


def print_summary(results: dict) -> None:
    print()
    print(format_table(TABLE_COLUMNS, table_rows(results)))
    print()
    print(format_table(PARTS_COLUMNS, parts_rows(results)))
    print()
    print("\n".join(verdicts(results)))


def main(argv=None) -> dict:
    from sentence_lm.machine import machine_info

    args = parse_args(argv)
    if args.from_json is not None:
        with open(args.from_json) as handle:
            results = json.load(handle)
        write_markdown(results, args.report)
        print_summary(results)
        return results
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    settings = settings_from_args(args)
    words = [os.path.relpath(__file__, os.getcwd()), *(sys.argv[1:] if argv is None else argv)]
    command = "python " + " ".join(shlex.quote(a) for a in words)
    if args.train_file is not None:
        sources = [(Path(args.train_file).stem, Path(args.train_file), args.keep_linebreaks)]
    else:
        sources = [(name, args.data_dir / DATASETS[name][0], DATASETS[name][1]) for name in args.datasets]
    os.makedirs(args.output_dir, exist_ok=True)
    json_path = args.json or os.path.join(args.output_dir, "quality.json")
    results = {
        "command": command,
        "settings": asdict(settings),
        "machine": machine_info(packages=("datasets", "tokenizers")),
        "requested_datasets": [name for name, _, _ in sources],
        "datasets": [],
        "wall_seconds": 0.0,
    }
    start = time.perf_counter()

    def save():
        results["wall_seconds"] = time.perf_counter() - start
        with open(json_path, "w") as handle:
            json.dump(results, handle, indent=2)
        if args.report:
            write_markdown(results, args.report)

    for name, path, keep in sources:
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (see --data_dir).")
        work = os.path.join(args.output_dir, name)
        data = prepare_data(name, path, keep, settings, work)
        record = run_dataset(data, settings, work, log=lambda msg: print(msg, flush=True))
        results["datasets"].append(record)
        save()  # keep what finished, even if a later dataset does not
    save()
    print_summary(results)
    return results


if __name__ == "__main__":
    main()
