"""TRL's supervised fine-tuning for SentenceLMs: `SentenceLMSFTTrainer`, `trl.SFTTrainer` with the
model's own loss.

Plain `SFTTrainer` replaces the model's ``forward`` with a fused LM head that multiplies one
backbone state per *token* by the output layer; a SentenceLM's backbone has one state per
*sentence* (its tokens come from the Sentence Decoder), so a SentenceLM refuses that head when the
trainer is built, naming this class. Everything else is TRL's own: datasets, chat templates,
``completion_only_loss`` and ``assistant_only_loss`` (their ``-100`` labels keep the prompt out of
the model's loss), padding-free ``packing`` (the model scores each packed text on its own from
``position_ids``), PEFT, saving."""

from __future__ import annotations

from trl import SFTTrainer
from trl.trainer import sft_trainer

MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "position_ids")
"""What the trainer hands the model of a collated batch (TRL's collators add flash-attention
offsets and token counts that a SentenceLM does not read)."""


class SentenceLMSFTTrainer(SFTTrainer):
    """`trl.SFTTrainer` for a SentenceLM (or a PEFT model around one): the same arguments, the
    model's own training loss (sentence tokens, sentence ends and stop decisions of the labelled
    tokens, divided by ``num_items_in_batch`` under gradient accumulation, as `transformers`' causal
    LMs do). TRL's ``entropy`` and ``mean_token_accuracy`` metrics come from its fused LM head and
    are not logged."""

    def __init__(self, *args, **kwargs):
        fused_head = sft_trainer.add_fused_lm_head
        sft_trainer.add_fused_lm_head = _keep_the_models_forward
        try:
            super().__init__(*args, **kwargs)
        finally:
            sft_trainer.add_fused_lm_head = fused_head

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**{k: v for k, v in inputs.items() if k in MODEL_INPUTS}, num_items_in_batch=num_items_in_batch)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


def _keep_the_models_forward(model, *args, **kwargs) -> None:
    """Stands in for TRL's ``add_fused_lm_head`` while `SentenceLMSFTTrainer` is built: the loss
    is the model's own, so its ``forward`` stays as it is."""
