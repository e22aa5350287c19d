"""The `transformers` Trainer as both stages use it: :class:`SentenceVAETrainer` (for models that
compute their own loss), :class:`TimeBudgetCallback` (stop after a wall-clock budget),
:func:`start_run` (logging, seed, checkpoint to resume) and the loss curve of a run."""

from __future__ import annotations

import logging
import os
import sys
import time

import torch
import transformers
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

logger = logging.getLogger(__name__)

__all__ = ["SentenceVAETrainer", "TimeBudgetCallback", "start_run"]


class SentenceVAETrainer(Trainer):
    """``Trainer`` for models whose forward computes their own loss from ``input_ids`` alone (no
    ``labels``), like [`SentenceVAEModel`]: evaluation reports ``eval_loss``, and the loss (a
    per-batch mean) is divided by the gradient-accumulation steps as for any mean loss."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.can_return_loss = True
        if not hasattr(self.accelerator.unwrap_model(self.model), "accepts_loss_kwargs"):
            self.model_accepts_loss_kwargs = False

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """As the Trainer's; with ``prediction_loss_only`` the model computes no logits
        (``logits_to_keep`` empty: evaluation mode would otherwise build them for nothing)."""
        if prediction_loss_only:
            inputs = {**inputs, "logits_to_keep": torch.empty(0, dtype=torch.long)}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)


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


def start_run(training_args: TrainingArguments) -> str | None:
    """Set up logging (per process, as the Trainer's examples do) and the seed; return the
    checkpoint to resume from (``--resume_from_checkpoint latest`` finds the last one in
    ``output_dir``), or ``None``."""
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


def loss_curve(log_history: list[dict]) -> list[tuple[int, float]]:
    """The training loss curve ``[(step, loss)]`` of a Trainer's ``state.log_history``."""
    return [(int(e["step"]), float(e["loss"])) for e in log_history if "loss" in e and "step" in e]
