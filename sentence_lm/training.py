"""Training plumbing shared by both stages, in the style of ``transformers``'
``examples/pytorch/language-modeling/run_clm.py``.

The data pipeline has three steps, each a ``datasets`` map (batched, cached by ``datasets``):

1. :func:`load_texts` reads raw text (``--train_file``/``--validation_file`` plain text files,
   a hub dataset with ``--dataset_name``, or the stdlib default corpus) and returns a
   ``DatasetDict`` with ``train`` and ``validation`` splits of *paragraphs* (column ``text``).
2. :func:`tokenize_texts` turns paragraphs into *text examples* of at most ``block_size`` tokens
   (``input_ids`` starting with the tokenizer's BOS, ``attention_mask``, ``length``):
   consecutive paragraphs are joined while they fit, a paragraph longer than the block is cut
   at sentence boundaries. **Stage 2 trains on these examples** (one example = one text).
3. :func:`split_into_sentences` cuts text examples into sentences (the BOS special token is
   dropped), one sentence per row: the examples of **stage 1**. Segmentation and packing run
   vectorised on whole batches (:func:`~sentence_lm.segmentation.segment_sentences`,
   :func:`~sentence_lm.segmentation.pack_sentences`) once, before training; the collator
   (:class:`SentenceCollator`) only pads.

:class:`SentencePackingCollator` is the alternative for callers that keep text examples: it
segments and packs sentences of a batch of texts on the fly (no Python loop over sentences).

:func:`train_sentence_vae` is the stage-1 entry point (``examples/train_sentence_vae.py``).
"""

from __future__ import annotations

import ast
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import datasets
import torch
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

from .configuration_sentence_vae import SentenceVAEConfig
from .segmentation import build_boundary_table, pack_sentences, segment_sentences

logger = logging.getLogger(__name__)

__all__ = [
    "DataArguments",
    "SentenceCollator",
    "SentencePackingCollator",
    "SentenceVAEArguments",
    "SentenceVAETrainer",
    "TimeBudgetCallback",
    "TINY_SENTENCE_VAE_CONFIG",
    "boundary_table_of",
    "build_sentence_vae_config",
    "build_sentence_vae_datasets",
    "load_or_train_tokenizer",
    "load_texts",
    "pad_sentences",
    "parse_sentence_vae_args",
    "special_ids_of",
    "special_token_affixes",
    "split_into_sentences",
    "start_run",
    "tokenize_texts",
    "train_sentence_vae",
]


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------
@dataclass
class DataArguments:
    """Where the text comes from and how it is cut into examples (both stages)."""

    train_file: str | None = field(
        default=None,
        metadata={
            "help": "A plain text file to train on (e.g. ../shared/data/grimm/tales.txt). Paragraphs are "
            "separated by blank lines. Without --validation_file, the last "
            "--validation_split_percentage percent of its lines are held out for validation."
        },
    )
    validation_file: str | None = field(default=None, metadata={"help": "A plain text file to evaluate on."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "A dataset to load with `datasets.load_dataset` (needs a hub connection)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    text_column: str = field(default="text", metadata={"help": "Column of the dataset that holds the text."})
    validation_split_percentage: int = field(
        default=10,
        metadata={
            "help": "Percentage of the training lines (files) or rows (datasets without a validation split) "
            "held out for validation: the last ones, not a random sample."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training examples (sentences in stage 1)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N evaluation examples (sentences in stage 1)."}
    )
    block_size: int = field(
        default=256,
        metadata={
            "help": "Most tokens per text example, BOS included. Texts are split at paragraph boundaries "
            "(consecutive paragraphs are joined while they fit) and longer paragraphs are cut at "
            "sentence boundaries."
        },
    )
    keep_linebreaks: bool = field(
        default=True,
        metadata={
            "help": "Keep the line breaks inside paragraphs (a newline ends a sentence: right for verse). "
            "False joins each paragraph's lines with spaces, for hard-wrapped prose such as Project "
            "Gutenberg texts."
        },
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for the `datasets.map` preprocessing."}
    )


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
# Raw text
# --------------------------------------------------------------------------------------------
def _paragraphs_of_lines(lines: Sequence[str], keep_linebreaks: bool = True) -> list[str]:
    from .corpus import group_paragraphs

    paragraphs = [p for p in group_paragraphs(list(lines)) if p and p.strip()]
    if not keep_linebreaks:
        paragraphs = [" ".join(line.strip() for line in p.split("\n") if line.strip()) for p in paragraphs]
    return paragraphs


def load_texts(data_args: DataArguments, cache_dir: str | None = None):
    """Load the raw text as a ``datasets.DatasetDict`` with ``train`` and ``validation`` splits of
    paragraphs (column ``text``).

    * ``train_file`` (+ optional ``validation_file``): plain text files read with
      :func:`sentence_lm.corpus.read_text_lines`; without a validation file the last
      ``validation_split_percentage`` % of the lines are held out
      (:func:`sentence_lm.corpus.split_train_validation`). Lines are grouped into paragraphs with
      :func:`sentence_lm.corpus.group_paragraphs`.
    * ``dataset_name``: ``datasets.load_dataset(dataset_name, dataset_config_name)``; each row's
      ``text_column`` is cut into paragraphs the same way. Without a ``validation`` split the
      last ``validation_split_percentage`` % of the training rows are held out.
    * neither: :func:`sentence_lm.corpus.default_corpus` (no download), last tenth held out.
    """
    from . import corpus

    fraction = data_args.validation_split_percentage / 100
    if not 0 < fraction < 1 and not data_args.validation_file:
        raise ValueError(
            f"validation_split_percentage must lie in (0, 100), got {data_args.validation_split_percentage}."
        )
    if data_args.train_file is not None or data_args.validation_file is not None:
        if data_args.train_file is None:
            raise ValueError("--validation_file needs a --train_file too.")
        lines = corpus.read_text_lines(data_args.train_file)
        if data_args.validation_file is not None:
            train_lines, validation_lines = lines, corpus.read_text_lines(data_args.validation_file)
        else:
            train_lines, validation_lines = corpus.split_train_validation(lines, validation_fraction=fraction)
        keep = data_args.keep_linebreaks
        splits = {
            "train": _paragraphs_of_lines(train_lines, keep),
            "validation": _paragraphs_of_lines(validation_lines, keep),
        }
        return datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()})
    if data_args.dataset_name is not None:
        raw = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir)
        if "validation" not in raw:
            train = raw["train"]
            held = max(1, int(round(len(train) * fraction)))
            raw = datasets.DatasetDict(
                {
                    "train": train.select(range(len(train) - held)),
                    "validation": train.select(range(len(train) - held, len(train))),
                }
            )
        column = data_args.text_column
        if column not in raw["train"].column_names:
            raise ValueError(
                f"The dataset has no column {column!r}; its columns are {raw['train'].column_names}. "
                "Pass --text_column."
            )

        keep = data_args.keep_linebreaks

        def to_paragraphs(batch):
            return {"text": [p for text in batch[column] if text for p in _paragraphs_of_lines(text.splitlines(), keep)]}

        return datasets.DatasetDict(
            {
                split: raw[split].map(
                    to_paragraphs,
                    batched=True,
                    remove_columns=raw[split].column_names,
                    num_proc=data_args.preprocessing_num_workers,
                    desc=f"Paragraphs of {split}",
                )
                for split in ("train", "validation")
            }
        )
    paragraphs = [p for p in corpus.default_corpus() if p and p.strip()]
    held = max(1, int(round(len(paragraphs) * fraction)))
    return datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": paragraphs[:-held]}),
            "validation": datasets.Dataset.from_dict({"text": paragraphs[-held:]}),
        }
    )


# --------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------
def boundary_table_of(tokenizer) -> torch.Tensor:
    """The tokenizer's sentence-boundary table (``tokenizer.boundary_table`` when it has one)."""
    table = getattr(tokenizer, "boundary_table", None)
    if table is None:
        table = build_boundary_table(tokenizer)
    return torch.as_tensor(table, dtype=torch.uint8)


def special_ids_of(tokenizer) -> list[int]:
    """Ids that belong to no sentence: the tokenizer's special tokens (``special_token_ids`` of a
    SentenceTokenizer, which includes added special tokens such as OPT's ``<s>``)."""
    ids = getattr(tokenizer, "special_token_ids", None)
    return sorted(set(ids if ids is not None else tokenizer.all_special_ids))


def special_token_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The special token ids the tokenizer puts before and after a text (``([2], [])`` for
    OPT-style tokenizers that prepend ``</s>``)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start]), list(full[start + len(plain) :])
    raise ValueError("Could not find where the tokenizer puts its special tokens.")


def _sentence_starts(ids: list[int], table: torch.Tensor, max_sentence_len: int) -> list[int]:
    """Positions where the sentences of ``ids`` (no special tokens) start."""
    sentence_ids = segment_sentences(torch.tensor(ids, dtype=torch.long), table, max_sentence_len)
    starts = torch.ones(len(ids), dtype=torch.bool)
    starts[1:] = sentence_ids[1:] != sentence_ids[:-1]
    return torch.nonzero(starts).flatten().tolist()


def _chunk_at_sentences(ids: list[int], budget: int, table: torch.Tensor, max_sentence_len: int) -> list[list[int]]:
    """Cut ``ids`` into pieces of at most ``budget`` tokens, at sentence boundaries."""
    starts = _sentence_starts(ids, table, max_sentence_len) + [len(ids)]
    chunks, begin, end = [], 0, 0
    for start in starts[1:]:
        if start - begin > budget and end > begin:
            chunks.append(ids[begin:end])
            begin = end
        end = start
    chunks.append(ids[begin:end])
    return chunks


def tokenize_texts(
    dataset,
    tokenizer,
    block_size: int,
    max_sentence_len: int,
    text_column: str = "text",
    join_paragraphs: bool = True,
    paragraph_separator: str = "\n\n",
    num_proc: int | None = None,
    desc: str | None = None,
):
    """Turn a dataset of paragraphs into tokenized text examples of at most ``block_size`` tokens.

    Each example is what the tokenizer gives for one text: ``input_ids`` with its special tokens
    (the ``</s>`` BOS in front for a SentenceTokenizer or OPT's tokenizer), ``attention_mask``,
    and ``length``. With ``join_paragraphs``, consecutive paragraphs (of one ``datasets.map``
    batch) are joined with ``paragraph_separator`` while the example stays within the block; a
    paragraph longer than the block is cut at sentence boundaries (segmentation with the
    tokenizer's boundary table and ``max_sentence_len``), each piece getting the special tokens.

    This is the data of stage 2 (one example = one text); :func:`split_into_sentences` turns the
    examples into the sentences of stage 1.

    Args:
        dataset: a ``datasets.Dataset`` with a ``text_column`` of paragraphs.
        tokenizer: the SentenceTokenizer (any ``transformers`` tokenizer works).
        block_size: most tokens per example, special tokens included.
        max_sentence_len: sentence length cap used to find the cut points.
    """
    prefix, suffix = special_token_affixes(tokenizer)
    budget = block_size - len(prefix) - len(suffix)
    if budget < max_sentence_len:
        raise ValueError(
            f"block_size ({block_size}) must leave room for a whole sentence: at least max_sentence_len "
            f"({max_sentence_len}) + {len(prefix) + len(suffix)} special tokens."
        )
    table = boundary_table_of(tokenizer)
    separator_len = len(tokenizer(paragraph_separator, add_special_tokens=False)["input_ids"])

    def tokenize(batch):
        texts = [t for t in batch[text_column] if t and t.strip()]
        if join_paragraphs and texts:
            lengths = [len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
            groups, current, used = [], [], 0
            for text, n in zip(texts, lengths):
                extra = n + (separator_len if current else 0)
                if current and used + extra > budget:
                    groups.append(current)
                    current, used, extra = [], 0, n
                current.append(text)
                used += extra
            groups.append(current)
            texts = [paragraph_separator.join(g) for g in groups]
        input_ids = []
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []:
            pieces = [ids] if len(ids) <= budget else _chunk_at_sentences(ids, budget, table, max_sentence_len)
            input_ids.extend(prefix + piece + suffix for piece in pieces if piece)
        return {
            "input_ids": input_ids,
            "attention_mask": [[1] * len(ids) for ids in input_ids],
            "length": [len(ids) for ids in input_ids],
        }

    return dataset.map(
        tokenize,
        batched=True,
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        desc=desc or f"Tokenizing texts into blocks of {block_size}",
    )


def _pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad lists of ids into ``(input_ids, attention_mask)`` tensors."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    width = int(lengths.max()) if len(sequences) else 0
    mask = torch.arange(width) < lengths[:, None]
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    if width:
        input_ids[mask] = torch.tensor([t for s in sequences for t in s], dtype=torch.long)
    return input_ids, mask


def split_into_sentences(
    dataset,
    tokenizer,
    max_sentence_len: int,
    num_proc: int | None = None,
    desc: str = "Splitting texts into sentences",
):
    """Turn text examples (from :func:`tokenize_texts`) into one example per sentence.

    Special tokens (the BOS a SentenceTokenizer prepends) are dropped; segmentation uses the
    tokenizer's boundary table and ``max_sentence_len`` on whole batches at once. Each output
    row holds ``input_ids`` (the sentence's tokens, in order) and ``length``; the sentences of a
    text, concatenated, give back its ids without the special tokens.
    """
    table = boundary_table_of(tokenizer)
    special = torch.tensor(special_ids_of(tokenizer), dtype=torch.long)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def split(batch):
        input_ids, mask = _pad(batch["input_ids"], pad_token_id)
        if "attention_mask" in batch:
            mask &= _pad(batch["attention_mask"], 0)[0].bool()
        mask &= ~torch.isin(input_ids, special)
        packed = pack_sentences(input_ids, segment_sentences(input_ids, table, max_sentence_len, mask), pad_token_id)
        lengths = packed.lengths.tolist()
        rows = packed.input_ids.tolist()
        return {"input_ids": [row[:n] for row, n in zip(rows, lengths)], "length": lengths}

    return dataset.map(split, batched=True, remove_columns=dataset.column_names, num_proc=num_proc, desc=desc)


# --------------------------------------------------------------------------------------------
# Collators
# --------------------------------------------------------------------------------------------
def pad_sentences(sentences: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad sentences (lists of ids) into ``{"input_ids": (n, L), "attention_mask": (n, L)}``."""
    input_ids, mask = _pad(sentences, pad_token_id)
    return {"input_ids": input_ids, "attention_mask": mask.long()}


@dataclass
class SentenceCollator:
    """Stage-1 collator for pre-segmented sentences (rows of :func:`split_into_sentences`):
    right-pads their ``input_ids`` into packed sentences ``(n, L)`` + ``attention_mask``. Other
    keys of the features (``length``) are ignored."""

    pad_token_id: int

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        return pad_sentences([f["input_ids"] for f in features], self.pad_token_id)


@dataclass
class SentencePackingCollator:
    """Collator that packs the sentences of whole text examples (rows of :func:`tokenize_texts`).

    A batch of ``b`` texts becomes ``input_ids (n, L)`` + ``attention_mask`` of its ``n``
    sentences (special tokens dropped), with segmentation and packing vectorised over the batch.
    With ``return_index``, ``batch_index`` and ``sentence_index`` (which text and which position
    within it each sentence comes from) are returned too.
    """

    boundary_table: torch.Tensor
    max_sentence_len: int
    pad_token_id: int
    special_token_ids: Sequence[int] = ()
    return_index: bool = False

    @classmethod
    def from_tokenizer(cls, tokenizer, max_sentence_len: int, **kwargs) -> SentencePackingCollator:
        return cls(
            boundary_table=boundary_table_of(tokenizer),
            max_sentence_len=max_sentence_len,
            pad_token_id=tokenizer.pad_token_id,
            special_token_ids=tuple(special_ids_of(tokenizer)),
            **kwargs,
        )

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        input_ids, mask = _pad([f["input_ids"] for f in features], self.pad_token_id)
        if all("attention_mask" in f for f in features):
            mask &= _pad([f["attention_mask"] for f in features], 0)[0].bool()
        if len(self.special_token_ids):
            mask &= ~torch.isin(input_ids, torch.tensor(list(self.special_token_ids), dtype=torch.long))
        sentence_ids = segment_sentences(input_ids, self.boundary_table, self.max_sentence_len, mask)
        packed = pack_sentences(input_ids, sentence_ids, self.pad_token_id)
        batch = {"input_ids": packed.input_ids, "attention_mask": packed.attention_mask.long()}
        if self.return_index:
            batch["batch_index"] = packed.batch_index
            batch["sentence_index"] = packed.sentence_index
        return batch


# --------------------------------------------------------------------------------------------
# Tokenizer, config, datasets of stage 1
# --------------------------------------------------------------------------------------------
def _parse_overrides(text: str) -> dict:
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
            overrides.update(_parse_overrides(spec))
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
    from .tokenization_sentence_lm import SentenceTokenizer, train_sentence_tokenizer

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
# Trainer
# --------------------------------------------------------------------------------------------
class SentenceVAETrainer(Trainer):
    """``Trainer`` for models whose forward computes their own loss from ``input_ids`` alone (no
    ``labels``), like [`SentenceVAEModel`]: evaluation reports ``eval_loss``, and the loss (a
    per-batch mean) is divided by the gradient-accumulation steps as for any mean loss."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.can_return_loss = True
        if not hasattr(self.accelerator.unwrap_model(self.model), "accepts_loss_kwargs"):
            self.model_accepts_loss_kwargs = False


class TimeBudgetCallback(TrainerCallback):
    """Stop training once ``max_seconds`` of wall-clock time have passed since training began
    (checked after every optimizer step; the Trainer then saves and returns as at ``max_steps``)."""

    def __init__(self, max_seconds: float):
        self.max_seconds = max_seconds
        self.start = None
        self.stopped_at_step = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if self.start is not None and time.monotonic() - self.start > self.max_seconds:
            if self.stopped_at_step is None:
                logger.warning("Time budget of %.0f s reached: stopping at step %d.", self.max_seconds, state.global_step)
            self.stopped_at_step = state.global_step
            control.should_training_stop = True
            control.should_save = True
        return control


# --------------------------------------------------------------------------------------------
# Stage 1 entry point
# --------------------------------------------------------------------------------------------
def start_run(training_args: TrainingArguments) -> str | None:
    """Set up logging (per process, as the Trainer's examples do) and the seed; return the
    checkpoint to resume from (``--resume_from_checkpoint latest`` finds the last one in
    ``output_dir``), or ``None``."""
    import transformers
    from transformers import set_seed
    from transformers.trainer_utils import get_last_checkpoint

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logging.getLogger("sentence_lm").setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    set_seed(training_args.seed)
    resume = training_args.resume_from_checkpoint
    if resume is not None and resume.lower() in ("true", "latest", "last"):
        resume = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if resume is None:
            raise ValueError(f"--resume_from_checkpoint: no checkpoint found in {training_args.output_dir}.")
    return resume


def _loss_curve(log_history: list[dict]) -> list[tuple[int, float]]:
    return [(int(e["step"]), float(e["loss"])) for e in log_history if "loss" in e and "step" in e]


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
    from .metrics import reconstruct_sentences, reconstruction_metrics
    from .modeling_sentence_vae import SentenceVAEModel

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

    trainer = SentenceVAETrainer(
        model=model,
        args=training_args,
        train_dataset=sentences["train"] if training_args.do_train else None,
        eval_dataset=sentences["validation"] if training_args.do_eval else None,
        data_collator=SentenceCollator(tokenizer.pad_token_id),
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
        results["loss_curve"] = _loss_curve(trainer.state.log_history)

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
