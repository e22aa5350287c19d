"""Reconstruction metrics of a SentenceVAE: how well sentences survive encode -> decode.

For every sentence the *targets* are its tokens followed by the end-of-sentence token (EOS), as
in training (:meth:`SentenceVAEModel.reconstruction_targets`):

* ``token_accuracy``: the sentence is encoded, then written back greedily by
  :meth:`SentenceVAEModel.decode` from its vector alone; the written tokens, then EOS where the
  decoder stopped, are compared position by position with the targets (a missing or extra
  token shifts everything after it, as it should). A sentence cut at ``max_sentence_len`` tokens
  has its EOS implied by the length cap (segmentation closes it there, and ``decode`` stops
  there without writing one), so a decoder that writes all ``max_sentence_len`` tokens gets
  that end position right.
* ``exact_match``: fraction of sentences whose every target position is right (same tokens,
  same length).
* ``perplexity``: ``exp`` of the teacher-forced mean cross-entropy per target (EOS included),
  ``nll`` that mean in nats; ``teacher_forced_accuracy``: argmax of the teacher-forced logits.
* ``num_sentences``, ``num_tokens`` (sentence tokens, without EOS), ``num_targets`` (with).

Everything is batched and runs under ``torch.no_grad`` on the model's device and dtype
(log-probabilities in float32).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch

from .data import pad_sequences

__all__ = ["reconstruct_sentences", "reconstruction_metrics"]


def _as_ids(example) -> Sequence[int]:
    if isinstance(example, Mapping):
        example = example["input_ids"]
    if isinstance(example, torch.Tensor):
        example = example.tolist()
    return example


def _is_batch(item) -> bool:
    """Whether ``item`` is a batch of packed sentences (2-D ids) rather than one sentence."""
    ids = item["input_ids"] if isinstance(item, Mapping) else item
    if isinstance(ids, torch.Tensor):
        return ids.dim() == 2
    return bool(len(ids)) and isinstance(ids[0], (list, tuple, torch.Tensor))


def _batches(data, batch_size: int, pad_token_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Yield ``{"input_ids", "attention_mask"}`` batches from batches or from single sentences."""
    pending: list[Sequence[int]] = []
    for item in data:
        if _is_batch(item):
            if not isinstance(item, Mapping):
                yield pad_sequences([_as_ids(x) for x in item], pad_token_id)
                continue
            ids, mask = item["input_ids"], item.get("attention_mask")
            if not isinstance(ids, torch.Tensor):
                padded = pad_sequences([_as_ids(x) for x in ids], pad_token_id)
                ids = padded["input_ids"]
                if mask is None:
                    mask = padded["attention_mask"]
                else:
                    mask = pad_sequences([_as_ids(x) for x in mask], 0)["input_ids"]
            elif mask is None:
                mask = ids != pad_token_id
            yield {"input_ids": ids, "attention_mask": torch.as_tensor(mask)}
            continue
        pending.append(_as_ids(item))
        if len(pending) == batch_size:
            yield pad_sequences(pending, pad_token_id)
            pending = []
    if pending:
        yield pad_sequences(pending, pad_token_id)


def _count(data) -> tuple[int | None, str]:
    """Total for the progress bar: (sentences, "sentence") when known cheaply, else batches."""
    try:
        n = len(data)
    except TypeError:
        return None, "sentence"
    from torch.utils.data import DataLoader

    if isinstance(data, DataLoader):
        return n, "batch"
    return n, "sentence"


@torch.no_grad()
def reconstruction_metrics(
    model,
    sentences,
    batch_size: int = 128,
    pad_token_id: int | None = None,
    max_sentences: int | None = None,
    show_progress: bool = True,
    accelerator=None,
    desc: str = "Reconstruction",
) -> dict[str, float | int]:
    """Reconstruction quality of a [`SentenceVAEModel`] on held-out sentences.

    Args:
        model: a ``SentenceVAEModel`` (any device, any dtype); put in eval mode while measuring.
        sentences: either batches of packed sentences (a ``DataLoader`` or any iterable of dicts
            with 2-D ``input_ids`` and ``attention_mask``, e.g. from
            :class:`~sentence_lm.data.PaddingCollator`), or single sentences (a
            ``datasets.Dataset`` / list of dicts with ``input_ids``, lists of ids or 1-D
            tensors), which are batched here by ``batch_size``. Sentences hold no special
            tokens; each has at most ``model.config.max_sentence_len`` tokens.
        batch_size: sentences per batch when batching single sentences.
        pad_token_id: padding id (default: the model's).
        max_sentences: stop after this many sentences.
        show_progress: show a ``tqdm`` progress bar.
        accelerator: an ``accelerate.Accelerator``; the counts are summed over its processes.
        desc: progress bar label.

    Returns:
        ``token_accuracy``, ``exact_match``, ``perplexity``, ``nll``,
        ``teacher_forced_accuracy`` (floats in [0, 1] except the last-but-one two) and the counts
        ``num_sentences``, ``num_tokens``, ``num_targets`` (see the module docstring).
    """
    from tqdm.auto import tqdm

    config = model.config
    pad = config.pad_token_id if pad_token_id is None else pad_token_id
    eos, cap = config.eos_token_id, config.max_sentence_len
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = torch.zeros(6, dtype=torch.float64, device=device)  # sent, tok, targets, nll, tf ok, greedy ok
    exact = torch.zeros((), dtype=torch.float64, device=device)
    total, unit = _count(sentences)
    if max_sentences is not None and unit == "sentence":
        total = max_sentences if total is None else min(total, max_sentences)
    bar = tqdm(total=total, unit=unit, desc=desc, disable=not show_progress)
    seen = 0
    try:
        for batch in _batches(sentences, batch_size, pad):
            ids = batch["input_ids"].to(device)
            mask = batch["attention_mask"].to(device).bool()
            if max_sentences is not None:
                room = max_sentences - seen
                if room <= 0:
                    break
                ids, mask = ids[:room], mask[:room]
            keep = mask.any(dim=1)
            ids, mask = ids[keep], mask[keep]
            bar.update(ids.shape[0] if unit == "sentence" else 1)
            if ids.shape[0] == 0:
                continue
            seen += ids.shape[0]
            lengths = mask.sum(dim=1)
            width = int(lengths.max())
            ids, mask = ids[:, :width], mask[:, :width]

            vectors = model.encode(ids, mask)
            logits = model.teacher_forced_logits(ids, mask, vectors)
            targets = model.reconstruction_targets(ids, mask)
            valid = targets != -100
            safe = targets.clamp(min=0)
            log_probs = logits.float().log_softmax(dim=-1)
            nll = -log_probs.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
            tf_ok = (logits.argmax(dim=-1) == targets) & valid

            out = model.decode(vectors, max_new_tokens=cap)
            n, steps = targets.shape
            predicted = torch.full_like(targets, -1)
            written = out.sequences[:, :steps]
            columns = torch.arange(written.shape[1], device=device)
            predicted[:, : written.shape[1]] = torch.where(columns < out.lengths[:, None], written, -1)
            closed = out.ended | (out.lengths >= cap)
            rows = torch.nonzero(closed & (out.lengths < steps)).flatten()
            predicted[rows, out.lengths[rows]] = eos
            greedy_ok = (predicted == targets) & valid

            sums += torch.stack(
                [
                    torch.tensor(float(n), device=device, dtype=torch.float64),
                    lengths.sum().double(),
                    valid.sum().double(),
                    nll[valid].double().sum(),
                    tf_ok.sum().double(),
                    greedy_ok.sum().double(),
                ]
            )
            exact += (greedy_ok.sum(dim=1) == valid.sum(dim=1)).sum().double()
    finally:
        bar.close()
        model.train(was_training)
    totals = torch.cat([sums, exact.unsqueeze(0)])
    if accelerator is not None and accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    n_sent, n_tok, n_targets, nll_sum, tf_ok, greedy_ok, exact_n = totals.tolist()
    mean_nll = nll_sum / n_targets if n_targets else float("nan")
    return {
        "token_accuracy": greedy_ok / n_targets if n_targets else float("nan"),
        "exact_match": exact_n / n_sent if n_sent else float("nan"),
        "perplexity": math.exp(mean_nll) if n_targets else float("nan"),
        "nll": mean_nll,
        "teacher_forced_accuracy": tf_ok / n_targets if n_targets else float("nan"),
        "num_sentences": int(n_sent),
        "num_tokens": int(n_tok),
        "num_targets": int(n_targets),
    }


@torch.no_grad()
def reconstruct_sentences(
    model, sentences: Iterable, batch_size: int = 128, pad_token_id: int | None = None
) -> list[list[int]]:
    """Encode sentences and write them back greedily; returns the written ids of each one."""
    pad = model.config.pad_token_id if pad_token_id is None else pad_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rebuilt: list[list[int]] = []
    try:
        for batch in _batches(sentences, batch_size, pad):
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device).bool()
            out = model.decode(model.encode(ids, mask), max_new_tokens=model.config.max_sentence_len)
            rebuilt.extend(row[:n] for row, n in zip(out.sequences.tolist(), out.lengths.tolist()))
    finally:
        model.train(was_training)
    return rebuilt
