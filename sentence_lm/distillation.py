"""Stage-2 levers around the Trainer: distilling a token model's next-token distributions into a
SentenceLM (:class:`DistillationTrainer`), and a warm-up with the backbone frozen
(:class:`FrozenBackboneWarmup`)."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, TrainerCallback

from .trainer import SentenceLMTrainer

logger = logging.getLogger(__name__)

__all__ = ["DistillationTrainer", "FrozenBackboneWarmup", "check_teacher", "token_distillation_loss"]


def token_distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Mean over the positions of ``mask`` ``(batch, seq_len)`` of ``KL(teacher || student)``
    between next-token distributions (``softmax(logits / temperature)`` of ``(batch, seq_len,
    vocab)`` logits each, the student's renormalised as ``lm_loss`` reads them), times
    ``temperature ** 2`` so that its gradient keeps its scale (Hinton et al.)."""
    rows = mask.nonzero(as_tuple=True)
    if len(rows[0]) == 0:
        return student_logits.sum() * 0.0
    student = F.log_softmax(student_logits[rows].float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits[rows].float() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)
    return kl.mean() * temperature**2


def check_teacher(teacher: PreTrainedModel, student: PreTrainedModel) -> None:
    """Refuse a teacher whose next-token distributions do not live on the student's vocabulary."""
    teacher_vocab = teacher.get_output_embeddings().weight.shape[0]
    if teacher_vocab != student.config.vocab_size:
        raise ValueError(
            f"Cannot distil from a token model with {teacher_vocab} output tokens into a SentenceLM with "
            f"vocab_size={student.config.vocab_size}: the two distributions must be over the same token ids. "
            "Distil from the token model the SentenceLM was built from (same tokenizer), or leave distillation out."
        )


class DistillationTrainer(SentenceLMTrainer):
    """Stage 2 with a teacher: the SentenceLM's own loss plus ``distill_weight`` times the KL
    divergence from ``teacher``'s next-token distribution (a token model on the same token ids,
    e.g. the one the backbone came from) to the SentenceLM's causal token scores, at every
    position whose next token is a token of the text (:func:`token_distillation_loss`).

    The teacher runs in evaluation mode without gradients, on the same ``input_ids`` and
    ``attention_mask``; the student computes its token scores for all positions
    (``logits_to_keep=0``), which costs more than its plain loss. The loss logged is the sum; the
    KL is logged as ``distill_loss``.
    """

    def __init__(self, *args, teacher: PreTrainedModel, distill_weight: float = 1.0, temperature: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        if not distill_weight >= 0 or not temperature > 0:
            raise ValueError(f"distill_weight must be >= 0 and temperature > 0, got {distill_weight} and {temperature}.")
        check_teacher(teacher, self.model)
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.distill_weight, self.temperature = distill_weight, temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        outputs = model(**inputs, logits_to_keep=0)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=ids, attention_mask=mask.long()).logits
        scored = torch.zeros_like(mask)
        scored[:, :-1] = mask[:, :-1] & mask[:, 1:]  # the next token is a token of the text
        distill = token_distillation_loss(outputs.logits, teacher_logits, scored, self.temperature)
        self.record_term("distill_loss", distill)
        loss = outputs.loss + self.distill_weight * distill
        return (loss, outputs) if return_outputs else loss



class FrozenBackboneWarmup(TrainerCallback):
    """Keep a SentenceLM's backbone fixed for the first ``steps`` optimizer steps, so that the
    SentenceVAE, the start state and the stop head adapt to a pretrained backbone before its
    weights move. The backbone's parameters stay in the optimizer (created with them) and get no
    gradient while frozen (no weight-gradient work, no update); training resumed past ``steps``
    trains them at once."""

    def __init__(self, steps: int):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"The frozen-backbone warm-up takes a number of steps >= 0, got {steps!r}.")
        self.steps = steps
        self.frozen: list[torch.nn.Parameter] = []

    @staticmethod
    def _backbone(model) -> torch.nn.Module:
        inner = getattr(model, "model", None)
        backbone = getattr(inner, "backbone", None)
        if backbone is None:
            raise ValueError(f"{type(model).__name__} has no backbone (model.model.backbone) to freeze.")
        return backbone

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.frozen = []
        if state.global_step < self.steps:
            # Only what trains: weights kept fixed on purpose (a PEFT model's base) stay fixed after.
            self.frozen = [p for p in self._backbone(model).parameters() if p.requires_grad]
            for parameter in self.frozen:
                parameter.requires_grad_(False)
            logger.info("Backbone frozen for the first %d steps.", self.steps)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.frozen and state.global_step >= self.steps:
            for parameter in self.frozen:
                parameter.requires_grad_(True)
            self.frozen = []
            logger.info("Backbone unfrozen at step %d.", state.global_step)
