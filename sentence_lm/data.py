"""The data of both stages: where the text comes from and how it becomes batches.

The pipeline has three steps, each a ``datasets`` map (batched, cached by ``datasets``), in the
style of ``transformers``' ``examples/pytorch/language-modeling/run_clm.py``:

1. :func:`load_texts` reads raw text (``--train_file``/``--validation_file`` plain text files,
   a hub dataset with ``--dataset_name``, or the stdlib default corpus; see
   :class:`DataArguments`) and returns a ``DatasetDict`` with ``train`` and ``validation``
   splits of *paragraphs* (column ``text``).
2. :func:`tokenize_texts` turns paragraphs into *text examples* of at most ``block_size`` tokens
   (``input_ids`` starting with the tokenizer's BOS, ``attention_mask``, ``length``):
   consecutive paragraphs are joined while they fit, a paragraph longer than the block is cut
   at sentence boundaries. **Stage 2 trains on these examples** (one example = one text).
3. :func:`split_into_sentences` cuts text examples into sentences (the BOS special token is
   dropped), one sentence per row: the examples of **stage 1**. Segmentation and packing run
   vectorised on whole batches (:func:`~sentence_lm.segmentation.segment_sentences`,
   :func:`~sentence_lm.segmentation.pack_sentences`) once, before training.

:class:`PaddingCollator` batches the rows of either stage (sentences or texts) by right-padding
them with :func:`pad_sequences`; built with a sentence length cap
(``PaddingCollator.from_tokenizer(tokenizer, max_sentence_len)``) it instead cuts a batch of text
examples into their sentences on the fly, as step 3 does ahead of time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import datasets
import torch

from . import corpus
from .segmentation import PackedSentences, build_boundary_table, pack_sentences, segment_sentences

__all__ = [
    "DataArguments",
    "PaddingCollator",
    "boundary_table_of",
    "first_tokens",
    "load_texts",
    "pad_sequences",
    "special_ids_of",
    "special_token_affixes",
    "split_into_sentences",
    "tokenize_texts",
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


# --------------------------------------------------------------------------------------------
# Raw text
# --------------------------------------------------------------------------------------------
def _paragraphs_of_lines(lines: Sequence[str], keep_linebreaks: bool = True) -> list[str]:
    """The non-blank paragraphs of ``lines``, their lines joined with spaces unless ``keep_linebreaks``."""
    paragraphs = [p for p in corpus.group_paragraphs(list(lines)) if p and p.strip()]
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


def first_tokens(texts, num_tokens: int | None):
    """The first rows of ``texts`` (text examples of :func:`tokenize_texts`, with a ``length``
    column) that hold at least ``num_tokens`` *scored* tokens: every token of a row but its first
    (the BOS or other special prefix, which ``text_nll`` and ``token_nll`` read as context and do
    not score), so ``num_tokens`` counts what an NLL per token is divided by. The fewest rows that
    reach it (all rows when they hold fewer); ``None``: every row."""
    if num_tokens is None:
        return texts
    total, rows = 0, 0
    for length in texts["length"]:
        if total >= num_tokens:
            break
        total, rows = total + length - 1, rows + 1
    return texts.select(range(rows))


# --------------------------------------------------------------------------------------------
# Padding and sentences
# --------------------------------------------------------------------------------------------
def pad_sequences(sequences: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad lists of ids (sentences or texts) into ``{"input_ids": (n, L), "attention_mask":
    (n, L)}``, both ``long``, ``L`` the longest length (0 for no sequence or only empty ones)."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    width = int(lengths.max()) if len(sequences) else 0
    mask = torch.arange(width) < lengths[:, None]
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    if width:
        input_ids[mask] = torch.tensor([t for s in sequences for t in s], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": mask.long()}


def _sentences_of_texts(
    input_ids: Sequence[Sequence[int]],
    attention_mask: Sequence[Sequence[int]] | None,
    boundary_table: torch.Tensor,
    max_sentence_len: int,
    special_token_ids: Sequence[int],
    pad_token_id: int,
) -> PackedSentences:
    """Segment a batch of texts (lists of ids, with their attention masks when given) into
    sentences, special tokens dropped, and pack them one sentence per row."""
    padded = pad_sequences(input_ids, pad_token_id)
    ids, mask = padded["input_ids"], padded["attention_mask"].bool()
    if attention_mask is not None:
        mask &= pad_sequences(attention_mask, 0)["input_ids"].bool()
    if len(special_token_ids):
        mask &= ~torch.isin(ids, torch.tensor(list(special_token_ids), dtype=torch.long))
    return pack_sentences(ids, segment_sentences(ids, boundary_table, max_sentence_len, mask), pad_token_id)


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
    special = special_ids_of(tokenizer)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def split(batch):
        masks = batch["attention_mask"] if "attention_mask" in batch else None
        packed = _sentences_of_texts(batch["input_ids"], masks, table, max_sentence_len, special, pad_token_id)
        lengths = packed.lengths.tolist()
        rows = packed.input_ids.tolist()
        return {"input_ids": [row[:n] for row, n in zip(rows, lengths)], "length": lengths}

    return dataset.map(split, batched=True, remove_columns=dataset.column_names, num_proc=num_proc, desc=desc)


@dataclass
class PaddingCollator:
    """The data collator of both stages: right-pads the ``input_ids`` of a batch of rows into
    ``{"input_ids": (b, L), "attention_mask": (b, L)}`` (:func:`pad_sequences`); other keys of the
    rows (``length``) are dropped.

    Stage 1 gives it sentences (rows of :func:`split_into_sentences`), stage 2 texts (rows of
    :func:`tokenize_texts`).

    With a ``boundary_table`` and ``max_sentence_len`` (see :meth:`from_tokenizer`), the rows are
    text examples instead, cut here into their sentences: a batch of ``b`` texts becomes the
    ``input_ids (n, L)`` + ``attention_mask`` of its ``n`` sentences (``special_token_ids``
    dropped, texts' own ``attention_mask`` honoured), segmentation and packing vectorised over
    the batch, the same sentences as :func:`split_into_sentences`. With ``return_index``,
    ``batch_index`` and ``sentence_index`` (which text and which position within it each
    sentence comes from) are returned too.
    """

    pad_token_id: int
    boundary_table: torch.Tensor | None = None
    max_sentence_len: int | None = None
    special_token_ids: Sequence[int] = ()
    return_index: bool = False

    def __post_init__(self):
        if (self.boundary_table is None) != (self.max_sentence_len is None):
            raise ValueError("boundary_table and max_sentence_len go together: give both (to split texts) or neither.")
        if self.return_index and self.boundary_table is None:
            raise ValueError("return_index needs boundary_table and max_sentence_len (sentences cut from texts).")

    @classmethod
    def from_tokenizer(cls, tokenizer, max_sentence_len: int | None = None, **kwargs) -> PaddingCollator:
        """The collator for ``tokenizer``'s padding id; with ``max_sentence_len``, one that cuts
        text examples into sentences with the tokenizer's boundary table and special tokens."""
        if max_sentence_len is None:
            return cls(pad_token_id=tokenizer.pad_token_id, **kwargs)
        return cls(
            pad_token_id=tokenizer.pad_token_id,
            boundary_table=boundary_table_of(tokenizer),
            max_sentence_len=max_sentence_len,
            special_token_ids=tuple(special_ids_of(tokenizer)),
            **kwargs,
        )

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        input_ids = [f["input_ids"] for f in features]
        if self.boundary_table is None:
            return pad_sequences(input_ids, self.pad_token_id)
        masks = [f["attention_mask"] for f in features] if all("attention_mask" in f for f in features) else None
        packed = _sentences_of_texts(
            input_ids, masks, self.boundary_table, self.max_sentence_len, self.special_token_ids, self.pad_token_id
        )
        batch = {"input_ids": packed.input_ids, "attention_mask": packed.attention_mask.long()}
        if self.return_index:
            batch["batch_index"] = packed.batch_index
            batch["sentence_index"] = packed.sentence_index
        return batch
