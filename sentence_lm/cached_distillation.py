"""A conversion lever: a token model's next-token distributions, computed once and cached as its
top k, distilled into the SentenceLM's Sentence Decoder.

:class:`~sentence_lm.distillation.DistillationTrainer` runs the teacher at every step and compares
its distributions with the SentenceLM's causal token scores, which cost a backbone pass per
partial sentence and a full-vocabulary tensor per position. Here the teacher runs once over the
training texts (:func:`cache_teacher_top_k`, its ``k`` most likely next tokens after each token and
their log-probabilities, stored with the texts), and the student side is the Sentence Decoder's own
step at each sentence token, which the loss computes anyway (``teacher_top_k`` of
`SentenceLMForCausalLM.forward`). :class:`TopKCollator` pads the cached columns with the texts and
:class:`TopKDistillationTrainer` adds ``distill_weight`` times the ``teacher_top_k_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from .data import PaddingCollator, pad_sequences
from .trainer import SentenceLMTrainer

__all__ = ["TOP_K_COLUMNS", "TopKCollator", "TopKDistillationTrainer", "cache_teacher_top_k"]

TOP_K_COLUMNS = ("teacher_top_k_ids", "teacher_top_k_log_probs")
"""The dataset columns :func:`cache_teacher_top_k` adds: ``(length, k)`` ids and log-probabilities."""


@torch.no_grad()
def cache_teacher_top_k(teacher: PreTrainedModel, texts, k: int = 16, batch_size: int = 8):
    """``texts`` (a `datasets.Dataset` of rows with ``input_ids``) with :data:`TOP_K_COLUMNS` added:
    after each token, the teacher's ``k`` most likely next tokens (int32) and their log-probabilities
    (float16, sorted, most likely first: about ``6 * k`` bytes per token; the last token's row predicts
    past the text and is kept for shape). The teacher runs in evaluation mode on right-padded batches
    of ``batch_size`` rows, under `datasets`' own progress bar (``datasets.disable_progress_bars()``
    hides it)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}.")
    vocab = teacher.get_output_embeddings().weight.shape[0]
    if k > vocab:
        raise ValueError(f"k={k} is more than the teacher's {vocab} tokens.")
    was_training = teacher.training
    teacher.eval()
    device = next(teacher.parameters()).device

    def top_k_of(batch):
        rows = batch["input_ids"]
        padded = pad_sequences(rows, 0)
        logits = teacher(input_ids=padded["input_ids"].to(device), attention_mask=padded["attention_mask"].to(device)).logits
        top = F.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
        ids, log_probs = top.indices.cpu().numpy().astype(np.int32), top.values.cpu().numpy().astype(np.float16)
        lengths = [len(row) for row in rows]  # one (length, k) array per row: Arrow takes them without Python objects
        return {TOP_K_COLUMNS[0]: [ids[i, :n] for i, n in enumerate(lengths)],
                TOP_K_COLUMNS[1]: [log_probs[i, :n] for i, n in enumerate(lengths)]}  # fmt: skip

    try:
        return texts.map(top_k_of, batched=True, batch_size=batch_size, load_from_cache_file=False, keep_in_memory=True,
                         desc="Caching the teacher's top k")  # fmt: skip
    finally:
        teacher.train(was_training)


@dataclass
class TopKCollator(PaddingCollator):
    """:class:`~sentence_lm.data.PaddingCollator` for texts with :data:`TOP_K_COLUMNS`: also
    ``teacher_top_k_ids`` and ``teacher_top_k_log_probs``, ``(b, L, k)``, right-padded as the ids."""

    def __call__(self, features) -> dict[str, torch.Tensor]:
        batch = super().__call__(features)
        b, width = batch["input_ids"].shape
        k = len(features[0][TOP_K_COLUMNS[0]][0])
        ids = torch.zeros(b, width, k, dtype=torch.long)
        log_probs = torch.zeros(b, width, k, dtype=torch.float32)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            ids[row, :n] = torch.tensor(feature[TOP_K_COLUMNS[0]], dtype=torch.long)
            log_probs[row, :n] = torch.tensor(feature[TOP_K_COLUMNS[1]], dtype=torch.float32)
        return {**batch, TOP_K_COLUMNS[0]: ids, TOP_K_COLUMNS[1]: log_probs}


class TopKDistillationTrainer(SentenceLMTrainer):
    """Stage 2 with cached teacher distributions: the SentenceLM's own loss plus
    ``distill_weight`` times its ``teacher_top_k_loss`` on the batch's :data:`TOP_K_COLUMNS` (train
    on :func:`cache_teacher_top_k`'s dataset with a :class:`TopKCollator`). ``teacher_top_k_loss``
    is logged (mean since the last log, also with the closing summary)."""

    def __init__(self, *args, distill_weight: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        if isinstance(distill_weight, bool) or not distill_weight >= 0:
            raise ValueError(f"distill_weight must be a number >= 0, got {distill_weight!r}.")
        missing = [c for c in TOP_K_COLUMNS if self.train_dataset is not None and c not in self.train_dataset.column_names]
        if missing:
            raise ValueError(
                f"The training dataset has no {missing} columns: cache the teacher's distributions first, "
                "train_dataset = cache_teacher_top_k(token_model, train_dataset)."
            )
        if not isinstance(self.data_collator, TopKCollator):
            raise ValueError("TopKDistillationTrainer needs a TopKCollator (it pads the teacher's top-k columns).")
        self.distill_weight = distill_weight

    def _set_signature_columns_if_needed(self) -> None:
        # The Trainer keeps the dataset columns that `forward` names; the cached ones go in as one pair.
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, *TOP_K_COLUMNS]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        top_k = tuple(inputs.pop(column) for column in TOP_K_COLUMNS)
        outputs = model(**inputs, teacher_top_k=top_k)
        self.record_term("teacher_top_k_loss", outputs.teacher_top_k_loss)
        loss = outputs.loss + self.distill_weight * outputs.teacher_top_k_loss
        return (loss, outputs) if return_outputs else loss
