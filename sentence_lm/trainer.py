"""The `transformers` Trainer as both stages use it: :class:`SentenceLMTrainer` (for models that
compute their own loss), :class:`TimeBudgetCallback` (stop after a budget of wall-clock or CPU seconds),
:class:`LearningCurveCallback` (the same, scoring the model as it trains), :func:`start_run`
(logging, seed, checkpoint to resume) and the loss curve of a run."""

from __future__ import annotations

import logging
import os
import sys
import time

import torch
import transformers
from tqdm.auto import tqdm
from transformers import ProgressCallback, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

logger = logging.getLogger(__name__)

__all__ = [
    "BudgetProgressCallback",
    "LearningCurveCallback",
    "SentenceLMTrainer",
    "TimeBudgetCallback",
    "show_time_budget",
    "start_run",
]


class SentenceLMTrainer(Trainer):
    """The ``Trainer`` of both stages: for models whose forward computes their own loss from
    ``input_ids`` alone (no ``labels``), the [`SentenceVAEModel`] of stage 1 and the
    [`SentenceLMForCausalLM`] of stage 2: evaluation reports ``eval_loss``, and the loss (a
    per-batch mean) is divided by the gradient-accumulation steps as for any mean loss."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.can_return_loss = True
        if not hasattr(self.accelerator.unwrap_model(self.model), "accepts_loss_kwargs"):
            self.model_accepts_loss_kwargs = False
        self._terms: dict[str, list[float]] = {}

    def record_term(self, name: str, value: torch.Tensor) -> None:
        """Note an auxiliary loss term of this step; :meth:`log` adds each term's mean since the
        last log to the logs (those of the steps and the closing summary)."""
        self._terms.setdefault(name, []).append(float(value.detach()))

    def log(self, logs: dict, *args, **kwargs) -> None:
        if self._terms and ("loss" in logs or "train_loss" in logs):
            logs.update({name: round(sum(values) / len(values), 4) for name, values in self._terms.items()})
            self._terms = {}
        super().log(logs, *args, **kwargs)

    def train(self, *args, **kwargs):
        """As the Trainer's; under a :class:`TimeBudgetCallback` the progress bar counts the
        budget's seconds (see :func:`show_time_budget`)."""
        show_time_budget(self)
        return super().train(*args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """As the Trainer's; with ``prediction_loss_only`` the model computes no logits
        (``logits_to_keep`` empty: evaluation mode would otherwise build them for nothing)."""
        if prediction_loss_only:
            inputs = {**inputs, "logits_to_keep": torch.empty(0, dtype=torch.long)}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)


CLOCKS = {"wall": time.monotonic, "cpu": time.process_time}


class TimeBudgetCallback(TrainerCallback):
    """Stop training once ``max_seconds`` have passed since training began (checked after every
    optimizer step; the Trainer then saves, unless its ``save_strategy`` is ``"no"``, and returns
    as at ``max_steps``).

    ``clock="wall"`` counts wall-clock seconds; ``clock="cpu"`` counts the CPU seconds of this
    process (all its threads), so that runs sharing a machine with other work get the same
    compute whatever else runs beside them (on CPU only: time spent waiting for a GPU is not
    CPU time)."""

    def __init__(self, max_seconds: float, clock: str = "wall"):
        if clock not in CLOCKS:
            raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}.")
        self.max_seconds = max_seconds
        self.clock = clock
        self.now = CLOCKS[clock]
        self.start = None
        self.stopped_at_step = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.now()

    def on_step_end(self, args, state, control, **kwargs):
        if self.start is not None and self.now() - self.start > self.max_seconds:
            if self.stopped_at_step is None:
                logger.warning("Time budget of %.0f s reached: stopping at step %d.", self.max_seconds, state.global_step)
            self.stopped_at_step = state.global_step
            control.should_training_stop = True
            control.should_save = args.save_strategy != "no"
        return control


class LearningCurveCallback(TimeBudgetCallback):
    """A :class:`TimeBudgetCallback` that also scores the model as it trains: at the start, every
    ``every_steps`` optimizer steps or every ``every_seconds`` seconds of training (give one), and
    at the end, with ``evaluate(model) -> {name: score}``. The time spent evaluating is not charged
    to the budget.

    Each point is ``{"step", "tokens", "seconds", "eval_seconds", **scores}``: the optimizer step,
    the Trainer's ``num_input_tokens_seen`` (the text's tokens, not its padding: the callback sets
    ``include_num_input_tokens_seen="non_padding"``), the training seconds so far (on the
    budget's clock, evaluations not counted) and the seconds this evaluation took. The points are
    appended to the Trainer's ``state.log_history`` too, so they are saved with its checkpoints;
    after a resume :attr:`points` holds the earlier ones as well, and a step already scored is not
    scored again. The model is put back in the training mode it had before each evaluation."""

    def __init__(self, max_seconds: float, evaluate, every_steps: int | None = None, every_seconds: float | None = None,
                 clock: str = "wall"):  # fmt: skip
        if (every_steps is None) == (every_seconds is None):
            raise ValueError("LearningCurveCallback: give every_steps or every_seconds (one of them).")
        super().__init__(max_seconds, clock)
        self.evaluate, self.every_steps, self.every_seconds = evaluate, every_steps, every_seconds
        self.points: list[dict] = []
        self.next_mark = 0.0

    def _score(self, state, model) -> None:
        if any(point["step"] == state.global_step for point in self.points):
            return
        began = self.now()
        trained = 0.0 if self.start is None else began - self.start
        was_training = model.training
        scores = self.evaluate(model)
        model.train(was_training)
        spent = self.now() - began
        point = {"step": state.global_step, "tokens": int(state.num_input_tokens_seen), "seconds": round(trained, 1),
                 "eval_seconds": round(spent, 1), **scores}  # fmt: skip
        self.points.append(point)
        state.log_history.append(point)
        print(f"\n[step {point['step']}, {point['tokens']} tokens, {point['seconds']:.0f} s] "
              + ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float)))  # fmt: skip
        if self.start is not None:
            self.start += spent  # evaluation time is not charged to the training budget
        if self.every_seconds is not None:
            self.next_mark = trained + self.every_seconds

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        args.include_num_input_tokens_seen = "non_padding"
        super().on_train_begin(args, state, control, **kwargs)
        self.points = [entry for entry in state.log_history if "eval_seconds" in entry and "tokens" in entry]
        self._score(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every_steps is not None:
            due = state.global_step % self.every_steps == 0
        else:
            due = self.now() - self.start >= self.next_mark
        if due:
            self._score(state, model)
        return super().on_step_end(args, state, control, **kwargs)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._score(state, model)


class BudgetProgressCallback(ProgressCallback):
    """The Trainer's progress display (evaluation bars and logs as usual) whose training bar
    counts the seconds of ``budget``, a :class:`TimeBudgetCallback`, with the step reached beside
    it: when a time budget ends training, ``max_steps`` is only a ceiling (often 10**7) and a bar
    towards it would show a meaningless total and ETA."""

    def __init__(self, budget: TimeBudgetCallback):
        super().__init__()
        self.budget = budget

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            minutes = self.budget.max_seconds / 60
            self.training_bar = tqdm(
                total=round(self.budget.max_seconds), unit="s", dynamic_ncols=True, desc=f"training ({minutes:g} min)"
            )
        self.current_step = 0

    def on_step_end(self, args, state, control, **kwargs):
        if self.training_bar is not None and self.budget.start is not None:
            elapsed = min(round(self.budget.now() - self.budget.start), self.training_bar.total)
            self.training_bar.set_postfix(step=state.global_step, refresh=False)
            self.training_bar.update(elapsed - self.training_bar.n)


def show_time_budget(trainer: Trainer) -> None:
    """When ``trainer`` has a :class:`TimeBudgetCallback` (the tightest, if several) and shows
    progress bars, replace its step bar by a :class:`BudgetProgressCallback`."""
    callbacks = trainer.callback_handler.callbacks
    budgets = [cb for cb in callbacks if isinstance(cb, TimeBudgetCallback)]
    if not budgets or any(isinstance(cb, BudgetProgressCallback) for cb in callbacks):
        return
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(BudgetProgressCallback(min(budgets, key=lambda cb: cb.max_seconds)))


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
