"""A draft head for a trained SentenceLM, trained on the frozen model (``generate(draft_tokens=k)``
then drafts each sentence with it; see :mod:`sentence_lm.drafting`).

The head is the SentenceVAE's ``parallel_readout``: every position of the next sentence read from
the backbone state at once. It is trained by self-distillation: for every sentence slot of the
training texts, the target is the sentence the model's own Sentence Decoder writes greedily from
that slot's backbone state (then its end-of-sentence marker), since drafted tokens are kept only
where the decoder would have chosen them. The targets are computed once (:func:`draft_targets`);
only the head trains (the `transformers` Trainer, under a wall-clock budget), everything else
stays frozen, so the model's own text and scores do not change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import TrainingArguments

from .data import PaddingCollator
from .trainer import SentenceLMTrainer, TimeBudgetCallback

__all__ = ["DraftHeadObjective", "add_draft_head", "draft_agreement", "draft_targets", "train_draft_head"]


def add_draft_head(model) -> None:
    """Give ``model``'s SentenceVAE a new draft head (its ``parallel_readout``) if it has none;
    its config's ``parallel_readout_weight`` becomes 1 so that the head is built again when the
    model is loaded (the weight only matters if the SentenceVAE is trained further)."""
    from .modeling_sentence_vae import DraftHead

    vae = model.sentence_vae
    if vae.parallel_readout is not None:
        return
    vae.config.parallel_readout_weight = 1.0
    head = DraftHead(vae.config)
    head.apply(vae._init_weights)
    vae.parallel_readout = head.to(device=vae.device, dtype=vae.lm_head.weight.dtype)


@torch.no_grad()
def draft_targets(model, texts, batch_size: int = 8, show_progress: bool = True) -> list[dict]:
    """For every sentence slot of ``texts`` (rows with ``input_ids``, as
    :func:`~sentence_lm.data.tokenize_texts` gives, BOS first): the backbone state ``states``
    ``(hidden,)`` the next sentence is written from, and ``labels`` ``(max_sentence_len + 1,)``:
    the sentence the Sentence Decoder writes from it greedily, its end-of-sentence marker (if it
    ended one), then ``-100``."""
    model.eval()
    vae = model.sentence_vae
    width = vae.config.max_sentence_len + 1
    collate = PaddingCollator(model.config.pad_token_id)
    examples = []
    for start in tqdm(range(0, len(texts), batch_size), desc="Draft targets", disable=not show_progress):
        batch = collate([texts[i] for i in range(start, min(start + batch_size, len(texts)))])
        out = model.model(**{k: v.to(model.device) for k, v in batch.items()})
        states = out.last_hidden_state[out.slot_mask]
        written = vae.decode(states)
        mask = torch.arange(written.sequences.shape[1], device=states.device) < written.lengths[:, None]
        labels = vae.reconstruction_targets(written.sequences, mask)
        cut = torch.nonzero(~written.ended).squeeze(1)  # cut by the length budget: no end-of-sentence marker
        labels[cut, written.lengths[cut]] = -100
        labels = F.pad(labels, (0, width - labels.shape[1]), value=-100)
        examples += [{"states": s, "labels": t} for s, t in zip(states.float().cpu(), labels.cpu())]
    return examples


class DraftHeadObjective(nn.Module):
    """What the Trainer optimises: the mean NLL of the draft head's tokens (``labels``, from
    :func:`draft_targets`) read from backbone states, through the SentenceVAE's memory and output
    layer. Only the head's parameters train."""

    def __init__(self, sentence_vae):
        super().__init__()
        self.sentence_vae = sentence_vae
        for name, parameter in sentence_vae.named_parameters():
            parameter.requires_grad_(name.startswith("parallel_readout."))

    def forward(self, states: torch.Tensor, labels: torch.Tensor) -> dict:
        states = states.to(self.sentence_vae.lm_head.weight.dtype)
        return {"loss": self.sentence_vae.draft_head_nll(states, labels).mean()}


@torch.no_grad()
def draft_agreement(sentence_vae, examples: list[dict], batch_size: int = 64) -> dict[str, float]:
    """How well the draft head matches its targets: ``token_accuracy`` (share of target tokens
    whose draft is the target) and ``first_run`` (mean number of tokens from the start of a
    sentence drafted right before the first miss: what one verification pass from the start
    would keep)."""
    hits = total = run = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        states = torch.stack([e["states"] for e in chunk]).to(sentence_vae.device, sentence_vae.lm_head.weight.dtype)
        labels = torch.stack([e["labels"] for e in chunk]).to(sentence_vae.device)
        memory = sentence_vae.decoder.memory(states)
        drafts = sentence_vae.lm_head(sentence_vae.parallel_readout(memory, labels.shape[1])).argmax(dim=-1)
        valid = labels != -100
        right = (drafts == labels) & valid
        hits += int(right.sum())
        total += int(valid.sum())
        run += int(right.long().cumprod(dim=1).sum())
    return {"token_accuracy": hits / max(total, 1), "first_run": run / max(len(examples), 1)}


def train_draft_head(
    model,
    train_texts,
    output_dir: str,
    eval_texts=None,
    minutes: float = 10.0,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    max_steps: int = -1,
    seed: int = 42,
    show_progress: bool = True,
) -> dict:
    """Add a draft head to ``model`` (a trained SentenceLM, :func:`add_draft_head`) and train it
    on the frozen model for ``minutes`` of wall time (or ``max_steps`` optimizer steps of
    ``batch_size`` sentences) on the sentences of ``train_texts``; the target computation is not
    charged to the budget. Returns a summary: steps, sentences, seconds and, on ``eval_texts``,
    the agreement before and after (:func:`draft_agreement`). The model is changed in place (save
    it with ``save_pretrained``)."""
    add_draft_head(model)
    train = draft_targets(model, train_texts, show_progress=show_progress)
    held_out = draft_targets(model, eval_texts, show_progress=show_progress) if eval_texts is not None else None
    vae = model.sentence_vae
    before = draft_agreement(vae, held_out) if held_out else None
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        num_train_epochs=1000 if max_steps < 0 else 1,
        max_steps=max_steps,
        warmup_steps=10,
        lr_scheduler_type="constant_with_warmup",
        logging_steps=25,
        save_strategy="no",
        report_to=[],
        seed=seed,
        use_cpu=model.device.type == "cpu",
        disable_tqdm=not show_progress,
        dataloader_num_workers=0,
    )
    callbacks = [TimeBudgetCallback(60 * minutes)] if max_steps < 0 else []
    trainer = SentenceLMTrainer(model=DraftHeadObjective(vae), args=args, train_dataset=train, callbacks=callbacks)
    result = trainer.train()
    for parameter in vae.parameters():
        parameter.requires_grad_(True)
    model.eval()
    return {
        "steps": trainer.state.global_step,
        "train_sentences": len(train),
        "train_seconds": round(result.metrics["train_runtime"], 1),
        "final_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
        "agreement_before": before,
        "agreement_after": draft_agreement(vae, held_out) if held_out else None,
        "eval_sentences": len(held_out) if held_out else 0,
    }
