"""Stage 1: train a SentenceVAE with the `transformers` Trainer (``examples/train_sentence_vae.py``).

:func:`train_sentence_vae` is the entry point; its command-line arguments are
:class:`SentenceVAEArguments` (model and tokenizer), :class:`~sentence_lm.data.DataArguments`
and ``TrainingArguments`` (:func:`parse_sentence_vae_args`). The steps it takes are public too:
:func:`load_or_train_tokenizer`, :func:`build_sentence_vae_config` and
:func:`build_sentence_vae_datasets` (the sentences of :mod:`sentence_lm.data`'s pipeline).
"""

from __future__ import annotations

import ast
import json
import logging
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import datasets
import torch
from transformers import HfArgumentParser, TrainingArguments

from .configuration_sentence_vae import SentenceVAEConfig
from .data import DataArguments, PaddingCollator, load_texts, split_into_sentences, tokenize_texts
from .metrics import reconstruct_sentences, reconstruction_metrics
from .modeling_sentence_vae import SentenceVAEModel
from .tokenization_sentence_lm import SentenceTokenizer, train_sentence_tokenizer
from .trainer import SentenceLMTrainer, TimeBudgetCallback, loss_curve, start_run

logger = logging.getLogger(__name__)

__all__ = [
    "STAGE1_TRAINING_DEFAULTS",
    "SentenceVAEArguments",
    "TINY_SENTENCE_VAE_CONFIG",
    "build_sentence_vae_config",
    "build_sentence_vae_datasets",
    "load_or_train_tokenizer",
    "parse_sentence_vae_args",
    "train_sentence_vae",
]


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------
TINY_SENTENCE_VAE_CONFIG = {
    "hidden_size": 128,
    "num_encoder_layers": 1,
    "num_decoder_layers": 1,
    "num_attention_heads": 4,
    "ffn_dim": 512,
    "max_sentence_len": 32,
    "dropout": 0.0,
}
"""Architecture used when neither --model_name_or_path nor --sentence_vae_config names one: small
enough to train in about a minute on a laptop CPU."""


@dataclass
class SentenceVAEArguments:
    """Model and tokenizer of stage 1 (the SentenceVAE)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A SentenceVAE checkpoint to start from; a new model is built when not given."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A saved SentenceTokenizer (directory or hub id). When not given, the tokenizer of "
            "--model_name_or_path (or of the checkpoint being resumed) is used, else a new byte-level "
            "BPE is trained on the training text."
        },
    )
    vocab_size: int = field(default=1024, metadata={"help": "Vocabulary size of a newly trained BPE tokenizer."})
    sentence_vae_config: str | None = field(
        default=None,
        metadata={
            "help": "The SentenceVAEConfig to start from: a config.json file, a checkpoint directory, or "
            "comma-separated overrides `key=value,...` (e.g. `hidden_size=256,num_encoder_layers=2`) "
            "applied on top of the tiny default config (or of --model_name_or_path's config)."
        },
    )
    hidden_size: int | None = field(default=None, metadata={"help": "Override of the config's hidden_size."})
    num_encoder_layers: int | None = field(default=None, metadata={"help": "Override: encoder layers."})
    num_decoder_layers: int | None = field(default=None, metadata={"help": "Override: decoder layers."})
    num_attention_heads: int | None = field(default=None, metadata={"help": "Override: attention heads."})
    ffn_dim: int | None = field(default=None, metadata={"help": "Override: feed-forward width."})
    max_sentence_len: int | None = field(default=None, metadata={"help": "Override: most tokens per sentence."})
    focal_gamma: float | None = field(
        default=None, metadata={"help": "Override: focal-loss exponent (0 = cross-entropy; the paper uses 2)."}
    )
    dropout: float | None = field(default=None, metadata={"help": "Override: dropout."})
    fusion: str | None = field(default=None, metadata={"help": "Override: 'learnable', 'sum' or 'mean'."})
    loss_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Override: compute the loss over the vocabulary this many rows at a time (less memory)."},
    )
    freeze_token_embeddings: bool = field(
        default=False,
        metadata={"help": "Keep the token embeddings and the (tied) output layer fixed: a faster step, fewer trained weights."},
    )
    reconstruction_batch_size: int = field(
        default=256, metadata={"help": "Sentences per batch of the final reconstruction metrics."}
    )
    max_reconstruction_sentences: int | None = field(
        default=None, metadata={"help": "Evaluate reconstruction on at most this many held-out sentences."}
    )
    num_reconstruction_examples: int = field(
        default=5, metadata={"help": "Held-out sentences printed with their reconstruction at the end."}
    )
    max_train_minutes: float | None = field(
        default=None,
        metadata={
            "help": "Safety net for a wall-clock budget: stop training (and save) once this many minutes "
            "of training have passed, even before --max_steps (the learning-rate schedule is then cut short)."
        },
    )


_CONFIG_OVERRIDE_FIELDS = (
    "hidden_size",
    "num_encoder_layers",
    "num_decoder_layers",
    "num_attention_heads",
    "ffn_dim",
    "max_sentence_len",
    "focal_gamma",
    "dropout",
    "fusion",
    "loss_chunk_size",
)

STAGE1_TRAINING_DEFAULTS = {
    "output_dir": os.path.join("outputs", "sentence_vae"),
    "do_train": True,
    "do_eval": True,
    "max_steps": 300,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 256,
    "learning_rate": 2e-3,
    "weight_decay": 0.01,
    "warmup_steps": 0.05,
    "lr_scheduler_type": "cosine",
    "logging_steps": 25,
    "save_total_limit": 2,
    "train_sampling_strategy": "group_by_length",
    "remove_unused_columns": False,
    "prediction_loss_only": True,
    "dataloader_pin_memory": torch.cuda.is_available(),
}
"""TrainingArguments defaults of stage 1 (any of them can be given on the command line)."""


def parse_sentence_vae_args(args: Sequence[str] | None = None):
    """Parse stage-1 arguments: ``(SentenceVAEArguments, DataArguments, TrainingArguments)``.

    ``args`` is a list of command-line strings (``sys.argv[1:]`` when ``None``); a single
    ``.json`` argument is read as a file of arguments, as in ``run_clm.py``.
    """
    parser = HfArgumentParser((SentenceVAEArguments, DataArguments, TrainingArguments))
    parser.set_defaults(**STAGE1_TRAINING_DEFAULTS)
    argv = list(sys.argv[1:] if args is None else args)
    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(argv[0]) as f:
            values = {**STAGE1_TRAINING_DEFAULTS, **json.load(f)}
        return parser.parse_dict(values)
    return parser.parse_args_into_dataclasses(args=argv)


# --------------------------------------------------------------------------------------------
# Tokenizer, config, datasets of stage 1
# --------------------------------------------------------------------------------------------
def parse_overrides(text: str) -> dict:
    """Comma-separated ``key=value`` config overrides as a dict (also used by stage 2's
    ``--backbone_config``): a value is a Python literal when it parses as one, else a string."""
    values = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "=" not in item:
            raise ValueError(f"Config override {item!r} is not of the form key=value.")
        key, raw = (s.strip() for s in item.split("=", 1))
        try:
            values[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            values[key] = raw
    return values


def _config_overrides(model_args: SentenceVAEArguments) -> tuple[SentenceVAEConfig | None, dict]:
    """The base config named by ``--sentence_vae_config`` (if it is a file/directory) and the
    overrides from ``key=value`` pairs and the explicit flags (flags win)."""
    base, overrides = None, {}
    spec = model_args.sentence_vae_config
    if spec:
        if os.path.isdir(spec):
            base = SentenceVAEConfig.from_pretrained(spec)
        elif os.path.isfile(spec):
            base = SentenceVAEConfig.from_json_file(spec)
        else:
            overrides.update(parse_overrides(spec))
    for name in _CONFIG_OVERRIDE_FIELDS:
        value = getattr(model_args, name)
        if value is not None:
            overrides[name] = value
    return base, overrides


def build_sentence_vae_config(model_args: SentenceVAEArguments, tokenizer=None) -> SentenceVAEConfig:
    """The SentenceVAEConfig to train: from ``--model_name_or_path``, a ``--sentence_vae_config``
    file, or :data:`TINY_SENTENCE_VAE_CONFIG`; then the overrides; then the tokenizer's vocabulary
    size and pad/BOS/EOS ids (when ``tokenizer`` is given)."""
    base, overrides = _config_overrides(model_args)
    if model_args.model_name_or_path is not None:
        base = SentenceVAEConfig.from_pretrained(model_args.model_name_or_path)
    values = base.to_dict() if base is not None else dict(TINY_SENTENCE_VAE_CONFIG)
    for key in ("model_type", "transformers_version", "architectures", "auto_map", "_name_or_path", "dtype"):
        values.pop(key, None)
    values.update(overrides)
    if tokenizer is not None:
        values["vocab_size"] = len(tokenizer)
        values["pad_token_id"] = tokenizer.pad_token_id
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        values["bos_token_id"] = bos
        values["eos_token_id"] = tokenizer.eos_token_id
    return SentenceVAEConfig(**values)


def _has_tokenizer(path: str | None) -> bool:
    """Whether ``path`` is a directory with a saved tokenizer in it."""
    return bool(path) and os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "tokenizer.json")) or os.path.isfile(os.path.join(path, "tokenizer_config.json"))
    )


def load_or_train_tokenizer(
    model_args: SentenceVAEArguments,
    train_texts: Iterable[str],
    max_sentence_len: int,
    resume_from: str | None = None,
):
    """The SentenceTokenizer: ``--tokenizer_name_or_path``, else the one saved with
    ``--model_name_or_path`` or with the checkpoint being resumed (``resume_from``), else a new
    byte-level BPE of ``--vocab_size`` trained on ``train_texts``."""
    for source in (model_args.tokenizer_name_or_path, model_args.model_name_or_path, resume_from):
        if source is None:
            continue
        if source is model_args.tokenizer_name_or_path or _has_tokenizer(source):
            logger.info("Loading the tokenizer from %s", source)
            tokenizer = SentenceTokenizer.from_pretrained(source)
            break
    else:
        logger.info("Training a byte-level BPE tokenizer with %d tokens", model_args.vocab_size)
        tokenizer = train_sentence_tokenizer(
            list(train_texts), vocab_size=model_args.vocab_size, max_sentence_len=max_sentence_len
        )
    if getattr(tokenizer, "max_sentence_len", max_sentence_len) != max_sentence_len:
        logger.warning(
            "The tokenizer cuts sentences at %s tokens but the model at %d; using the model's value.",
            tokenizer.max_sentence_len,
            max_sentence_len,
        )
        tokenizer.max_sentence_len = max_sentence_len
    return tokenizer


def build_sentence_vae_datasets(raw, tokenizer, data_args: DataArguments, max_sentence_len: int):
    """Text examples and sentence examples of every split of ``raw`` (from :func:`load_texts`).

    Returns:
        ``(texts, sentences)``: two ``datasets.DatasetDict`` with the same splits; ``texts``
        from :func:`tokenize_texts`, ``sentences`` from :func:`split_into_sentences` (truncated
        to ``max_train_samples`` / ``max_eval_samples``).
    """
    texts, sentences = {}, {}
    for split in raw:
        texts[split] = tokenize_texts(
            raw[split],
            tokenizer,
            data_args.block_size,
            max_sentence_len,
            num_proc=data_args.preprocessing_num_workers,
            desc=f"Tokenizing {split}",
        )
        sentences[split] = split_into_sentences(
            texts[split],
            tokenizer,
            max_sentence_len,
            num_proc=data_args.preprocessing_num_workers,
            desc=f"Sentences of {split}",
        )
        limit = data_args.max_train_samples if split == "train" else data_args.max_eval_samples
        if limit is not None:
            sentences[split] = sentences[split].select(range(min(limit, len(sentences[split]))))
    return datasets.DatasetDict(texts), datasets.DatasetDict(sentences)


# --------------------------------------------------------------------------------------------
# Stage 1 entry point
# --------------------------------------------------------------------------------------------
def train_sentence_vae(args: Sequence[str] | None = None) -> dict:
    """Stage 1: train a SentenceVAE with the ``transformers`` Trainer.

    Builds or loads the tokenizer, builds the model (boundary table set from the tokenizer),
    trains on the sentences of the training text, saves model and tokenizer to ``output_dir``,
    evaluates the loss and the reconstruction metrics of the held-out sentences
    (``output_dir/reconstruction_metrics.json``) and prints a few reconstructions.

    Args:
        args: command-line arguments (``sys.argv[1:]`` when ``None``); see
            :func:`parse_sentence_vae_args`.

    Returns:
        A dict with ``train`` (Trainer metrics), ``eval`` (loss), ``reconstruction`` (metrics of
        :func:`~sentence_lm.metrics.reconstruction_metrics`), ``loss_curve`` ([(step, loss)]),
        ``examples`` ([(original, reconstruction)] strings) and ``output_dir``.
    """
    model_args, data_args, training_args = parse_sentence_vae_args(args)
    resume = start_run(training_args)

    raw = load_texts(data_args, cache_dir=None)
    config = build_sentence_vae_config(model_args)
    tokenizer = load_or_train_tokenizer(model_args, raw["train"]["text"], config.max_sentence_len, resume)
    config = build_sentence_vae_config(model_args, tokenizer)
    if model_args.model_name_or_path is not None:
        model = SentenceVAEModel.from_pretrained(model_args.model_name_or_path, config=config)
    else:
        model = SentenceVAEModel(config)
    model.set_boundary_table(tokenizer)
    if model_args.freeze_token_embeddings:
        model.freeze_token_embeddings()
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("SentenceVAE with %.2fM parameters: %s", n_params / 1e6, config.to_json_string(use_diff=True))

    with training_args.main_process_first(desc="dataset preprocessing"):
        _, sentences = build_sentence_vae_datasets(raw, tokenizer, data_args, config.max_sentence_len)
    logger.info(
        "%d training sentences, %d held-out sentences (%d / %d paragraphs)",
        len(sentences["train"]),
        len(sentences["validation"]),
        len(raw["train"]),
        len(raw["validation"]),
    )

    if training_args.should_save:
        os.makedirs(training_args.output_dir, exist_ok=True)
        tokenizer.save_pretrained(training_args.output_dir)

    trainer = SentenceLMTrainer(
        model=model,
        args=training_args,
        train_dataset=sentences["train"] if training_args.do_train else None,
        eval_dataset=sentences["validation"] if training_args.do_eval else None,
        data_collator=PaddingCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    budget = None
    if model_args.max_train_minutes is not None:
        budget = TimeBudgetCallback(60 * model_args.max_train_minutes)
        trainer.add_callback(budget)

    results: dict = {"output_dir": training_args.output_dir, "num_parameters": n_params}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=resume)
        trainer.save_model()
        tokenizer.save_pretrained(training_args.output_dir)
        metrics = dict(train_result.metrics)
        metrics["train_samples"] = len(sentences["train"])
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        results["train"] = metrics
        results["global_step"] = trainer.state.global_step
        results["stopped_by_time_budget"] = budget is not None and budget.stopped_at_step is not None
        results["loss_curve"] = loss_curve(trainer.state.log_history)

    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(sentences["validation"])
        try:
            metrics["eval_loss_exp"] = math.exp(metrics["eval_loss"])
        except (KeyError, OverflowError):
            metrics["eval_loss_exp"] = float("inf")
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results["eval"] = metrics

        model = trainer.accelerator.unwrap_model(trainer.model)
        held_out = sentences["validation"]
        if model_args.max_reconstruction_sentences is not None:
            held_out = held_out.select(range(min(model_args.max_reconstruction_sentences, len(held_out))))
        reconstruction = reconstruction_metrics(
            model,
            held_out,
            batch_size=model_args.reconstruction_batch_size,
            show_progress=not training_args.disable_tqdm,
        )
        results["reconstruction"] = reconstruction
        examples = []
        if model_args.num_reconstruction_examples > 0 and len(held_out):
            # A spread of held-out sentences of at least 4 tokens (short ones are mostly trivial).
            candidates = [i for i, n in enumerate(held_out["length"]) if n >= 4] or list(range(len(held_out)))
            k = min(model_args.num_reconstruction_examples, len(candidates))
            picked = [candidates[(j * len(candidates)) // k] for j in range(k)]
            originals = [held_out[i]["input_ids"] for i in picked]
            rebuilt = reconstruct_sentences(model, originals, pad_token_id=tokenizer.pad_token_id)
            examples = [(tokenizer.decode(a), tokenizer.decode(b)) for a, b in zip(originals, rebuilt)]
        results["examples"] = examples
        if trainer.is_world_process_zero():
            print("\n***** held-out reconstruction *****")
            for key, value in reconstruction.items():
                print(f"  {key:<26} = {value:.6g}" if isinstance(value, float) else f"  {key:<26} = {value}")
            for original, rebuilt in examples:
                print(f"  original: {original!r}\n  rebuilt:  {rebuilt!r}")
            with open(os.path.join(training_args.output_dir, "reconstruction_metrics.json"), "w") as f:
                json.dump({**reconstruction, "examples": examples}, f, indent=2)
    return results
