"""A conversion lever: the token model's hidden states as targets for the SentenceLM built from it.

A token model predicts the token after a sentence from its final hidden state at the sentence's
last token; a SentenceLM writes the next sentence from its backbone's state after that sentence.
:class:`HiddenStateDistillationTrainer` gives the backbone that state as a dense target (the
``hidden_state_loss`` of `SentenceLMForCausalLM.forward`, added to the loss with
``hidden_state_weight``), and can let the Sentence Decoder write from the teacher's states for
the first ``teacher_condition_steps`` optimizer steps (``condition_on_teacher``), so that it
learns to write from rich states before the backbone can produce them.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from .trainer import SentenceLMTrainer

__all__ = ["HiddenStateDistillationTrainer", "check_hidden_state_teacher", "teacher_final_states"]


def check_hidden_state_teacher(teacher: PreTrainedModel | None, student: PreTrainedModel) -> None:
    """Refuse a teacher whose states cannot be the student's targets: none, another width, or
    another vocabulary (its tokens would not be the student's)."""
    if teacher is None:
        raise ValueError(
            "Hidden-state distillation needs a teacher: pass teacher= (the token model the SentenceLM was built "
            "from), or train with SentenceLMTrainer."
        )
    width = teacher.config.get_text_config().hidden_size
    if width != student.config.hidden_size:
        raise ValueError(
            f"The teacher's hidden states are {width} wide but the SentenceLM's backbone is "
            f"{student.config.hidden_size}: distil from the token model of the backbone's width (the one it was "
            "built from)."
        )
    vocab = teacher.get_input_embeddings().weight.shape[0]
    if vocab != student.config.vocab_size:
        raise ValueError(
            f"The teacher reads {vocab} token ids but the SentenceLM {student.config.vocab_size}: its states "
            "would be of other texts. Distil from the token model the SentenceLM was built from (same tokenizer)."
        )


@torch.no_grad()
def teacher_final_states(teacher: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(batch, seq_len, hidden)``: the token model's final hidden states (after its last norm:
    what its output layer reads) on a batch of texts."""
    return teacher.base_model(input_ids=input_ids, attention_mask=attention_mask.long()).last_hidden_state


class HiddenStateDistillationTrainer(SentenceLMTrainer):
    """Stage 2 with a token model's hidden states: the SentenceLM's own loss plus
    ``hidden_state_weight`` times its ``hidden_state_loss`` against ``teacher`` (the token model
    the SentenceLM was built from, run in evaluation mode without gradients on the same ids), and
    for the first ``teacher_condition_steps`` optimizer steps the Sentence Decoder writes from the
    teacher's states (``condition_on_teacher``). ``hidden_state_loss`` is logged (mean since the
    last log, also with the closing summary)."""

    def __init__(
        self,
        *args,
        teacher: PreTrainedModel | None = None,
        hidden_state_weight: float = 1.0,
        teacher_condition_steps: int = 0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if isinstance(hidden_state_weight, bool) or not hidden_state_weight >= 0:
            raise ValueError(f"hidden_state_weight must be a number >= 0, got {hidden_state_weight!r}.")
        if isinstance(teacher_condition_steps, bool) or not isinstance(teacher_condition_steps, int) or teacher_condition_steps < 0:
            raise ValueError(f"teacher_condition_steps must be an integer >= 0, got {teacher_condition_steps!r}.")
        check_hidden_state_teacher(teacher, self.accelerator.unwrap_model(self.model))
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.hidden_state_weight, self.teacher_condition_steps = hidden_state_weight, teacher_condition_steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        states = teacher_final_states(self.teacher, ids, mask)
        outputs = model(
            **inputs,
            teacher_hidden_states=states,
            condition_on_teacher=self.state.global_step < self.teacher_condition_steps,
        )
        self.record_term("hidden_state_loss", outputs.hidden_state_loss)
        loss = outputs.loss + self.hidden_state_weight * outputs.hidden_state_loss
        return (loss, outputs) if return_outputs else loss
