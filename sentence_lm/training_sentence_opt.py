"""Stage 2: train a SentenceLM (the sentence-level LLM) with the `transformers` Trainer.

The data pipeline is stage 1's (:func:`~sentence_lm.data.load_texts`,
:func:`~sentence_lm.data.tokenize_texts`): one example is one text of at most
``block_size`` tokens, and the model's loss is the whole-text negative log-likelihood per token
(sentence tokens, end-of-sentence tokens, stop decisions). The backbone comes from any
decoder-only checkpoint (``--backbone_name_or_path``: OPT, GPT-2, Llama, Qwen2, Mistral, ...,
or a GGUF file with ``--backbone_gguf_file``) or is built from scratch (a small OPT); the
SentenceVAE (and its tokenizer) from stage 1 (``--sentence_vae_name_or_path``), frozen or
fine-tuned, or is built new: from the backbone's token model (its tokenizer and embeddings) when
one is given, else with a new tokenizer, and trained jointly. Runs unchanged under ``accelerate launch`` on several processes.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import HfArgumentParser, TrainingArguments

from .configuration_sentence_lm import NEXT_VECTOR_OBJECTIVES
from .configuration_sentence_opt import SentenceOPTConfig
from .data import DataArguments, PaddingCollator, load_texts, tokenize_texts
from .distillation import DistillationTrainer, FrozenBackboneWarmup
from .trainer import SentenceLMTrainer, TimeBudgetCallback, loss_curve, start_run
from .training_sentence_vae import TINY_SENTENCE_VAE_CONFIG, parse_overrides

logger = logging.getLogger(__name__)

TINY_BACKBONE_CONFIG = {
    "hidden_size": TINY_SENTENCE_VAE_CONFIG["hidden_size"],
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "ffn_dim": 512,
    "max_position_embeddings": 258,
    "dropout": 0.0,
}
"""OPT backbone built when neither --model_name_or_path nor --backbone_name_or_path names one."""

STAGE2_TRAINING_DEFAULTS = {
    "output_dir": os.path.join("outputs", "sentence_opt"),
    "do_train": True,
    "do_eval": True,
    "max_steps": 300,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 16,
    "learning_rate": 1e-3,
    "weight_decay": 0.01,
    "warmup_steps": 0.05,
    "lr_scheduler_type": "cosine",
    "logging_steps": 25,
    "save_total_limit": 2,
    "remove_unused_columns": False,
    "prediction_loss_only": True,
    "dataloader_pin_memory": torch.cuda.is_available(),
}
"""TrainingArguments defaults of stage 2 (any of them can be given on the command line)."""


LM_CONFIG_ARGUMENTS = ("stop_loss_weight", "next_vector_weight", "next_vector_objective")
"""Stage-2 arguments that set the SentenceLM config's field of the same name (when given)."""


@dataclass
class SentenceOPTArguments:
    """Model and tokenizer of stage 2."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A SentenceOPT checkpoint to continue training (with its tokenizer)."}
    )
    sentence_vae_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The stage-1 SentenceVAE checkpoint (saved with its tokenizer). When not given, a new "
            "SentenceVAE and tokenizer are built and trained jointly with the backbone."
        },
    )
    backbone_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A decoder-only token model (path or Hub id, e.g. facebook/opt-125m, "
            "HuggingFaceTB/SmolLM2-135M) whose layers, norms and positions initialise the backbone; a "
            "SentenceVAE from stage 1 must have its width. Without --sentence_vae_name_or_path a new "
            "SentenceVAE starts from its embeddings and its tokenizer is used. Without it the backbone is a "
            "small OPT built from scratch (see --backbone_config)."
        },
    )
    backbone_gguf_file: str | None = field(
        default=None, metadata={"help": "A GGUF file in --backbone_name_or_path to load the token model from."}
    )
    backbone_config: str | None = field(
        default=None,
        metadata={
            "help": "Overrides `key=value,...` of the from-scratch backbone (e.g. "
            "`num_hidden_layers=4,ffn_dim=1024`) on top of the tiny default."
        },
    )
    freeze_sentence_vae: bool = field(
        default=False, metadata={"help": "Keep the SentenceVAE's weights fixed and train the backbone only."}
    )
    freeze_token_embeddings: bool = field(
        default=False,
        metadata={"help": "Keep the SentenceVAE's token embeddings and (tied) output layer fixed: a faster step."},
    )
    loss_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Compute the loss over the vocabulary this many rows at a time (less memory, a little slower)."},
    )
    stop_loss_weight: float | None = field(default=None, metadata={"help": "Weight of the stop head's loss."})
    next_vector_weight: float | None = field(
        default=None,
        metadata={"help": "Weight of the auxiliary loss that predicts each sentence's vector from the backbone's "
                  "state before it (SentenceLMConfig.next_vector_weight)."},
    )
    next_vector_objective: str | None = field(
        default=None,
        metadata={"help": "Form of that loss: mse (the default) or contrastive (InfoNCE over the batch's sentences; "
                  "SentenceLMConfig.next_vector_objective).", "choices": list(NEXT_VECTOR_OBJECTIVES)},
    )
    freeze_backbone_steps: int = field(
        default=0,
        metadata={"help": "Keep the backbone fixed for this many optimizer steps first (the SentenceVAE, start "
                  "state and stop head adapt to a pretrained backbone before it moves)."},
    )
    distill_from: str | None = field(
        default=None,
        metadata={"help": "A token model (path or Hub id; `backbone` for --backbone_name_or_path) whose next-token "
                  "distributions the SentenceLM's token scores are pulled towards (KL, on the fly); it must share "
                  "the SentenceLM's vocabulary."},
    )
    distill_gguf_file: str | None = field(
        default=None, metadata={"help": "A GGUF file in --distill_from (default: --backbone_gguf_file for `backbone`)."}
    )
    distill_weight: float = field(default=1.0, metadata={"help": "Weight of the distillation term."})
    distill_temperature: float = field(default=1.0, metadata={"help": "Temperature of both distributions in it."})
    vocab_size: int = field(default=2048, metadata={"help": "Vocabulary of a new tokenizer (no stage-1 model)."})
    max_sentence_len: int = field(default=32, metadata={"help": "Sentence cap of a new SentenceVAE."})
    max_train_minutes: float | None = field(
        default=None, metadata={"help": "Stop training (and save) after this many minutes of training."}
    )


def parse_sentence_opt_args(args: Sequence[str] | None = None):
    """Parse stage-2 arguments: ``(SentenceOPTArguments, DataArguments, TrainingArguments)``."""
    parser = HfArgumentParser((SentenceOPTArguments, DataArguments, TrainingArguments))
    parser.set_defaults(**STAGE2_TRAINING_DEFAULTS)
    return parser.parse_args_into_dataclasses(args=list(sys.argv[1:] if args is None else args))


@torch.no_grad()
def text_nll(model, dataset, batch_size: int = 16, show_progress: bool = True) -> dict[str, float]:
    """Whole-text negative log-likelihood of a SentenceOPT on text examples: sentence tokens,
    end-of-sentence tokens and stop decisions, summed, divided by the texts' original tokens.

    Returns ``{"nll_per_token", "perplexity", "num_tokens", "num_texts"}``.
    """
    was_training = model.training
    model.eval()
    collate = PaddingCollator(model.config.pad_token_id)
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    batches = range(0, len(dataset), batch_size)
    for start in tqdm(batches, desc="Text NLL", disable=not show_progress):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        out = model(
            batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            logits_to_keep=torch.empty(0, dtype=torch.long),  # the NLL needs no logits
        )
        total += float(out.nll.sum())
        tokens += int(out.num_tokens.sum())
    model.train(was_training)
    nll = total / max(tokens, 1)
    return {"nll_per_token": nll, "perplexity": math.exp(nll), "num_tokens": tokens, "num_texts": len(dataset)}


@torch.no_grad()
def conditioning_nll(model, dataset, batch_size: int = 16, seed: int = 0, show_progress: bool = True) -> dict:
    """How much a SentenceLM's Sentence Decoder draws from what it is given: the teacher-forced NLL
    per sentence target (every sentence token and its end-of-sentence token) of the texts in
    ``dataset`` when each sentence is written from

    * ``"predicted"``: the backbone's state of the slot before it (the model's own score);
    * ``"mean"``: the mean of those states over every sentence of ``dataset`` (no context at all);
    * ``"shuffled"``: the state predicted for another sentence, drawn at random (seeded);
    * ``"own_vector"``: the sentence's own vector from the encoder (reconstruction, an oracle);
    * ``"previous_vector"``: the encoder's vector of the sentence before it in its text (a text's
      first sentence: the mean of all encoder vectors), that is, the backbone's input at the slot
      whose state ``"predicted"`` reads. The decoder reads it as "write the previous sentence
      again": when it scores near ``"predicted"``, the backbone's context is mostly an echo of
      its last input rather than a prediction.

    ``"mean"`` minus ``"predicted"`` is what the context (the prompt) is worth to the decoder in
    nats per target; near 0, the model writes the same sentences whatever came before.

    With a ``context_window`` every condition reads its sentence's window too (what the model
    reads), so ``context_gain`` is what the backbone's state adds to the window; one more,
    ``"mean_no_window"``, writes each sentence from the mean state without its window (nothing of
    the text before), and ``"text_gain"`` (``"mean_no_window"`` minus ``"predicted"``) is what
    the text before is worth through both.

    Returns ``{"predicted", "mean", "shuffled", "own_vector", "previous_vector", "context_gain",
    "num_targets", "num_sentences"}``, and ``"mean_no_window"`` and ``"text_gain"`` with a window.
    """
    from .modeling_sentence_lm import states_before_sentences

    was_training = model.training
    model.eval()
    vae = model.sentence_vae
    collate = PaddingCollator(model.config.pad_token_id)
    device = next(model.parameters()).device
    batches = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="Backbone states", disable=not show_progress):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        out = model.model(ids, mask)
        memory = states_before_sentences(out.last_hidden_state, out.packed)
        batches.append((out.packed, memory, out.sentence_vectors, model.sentence_context(ids, mask, out.packed)))
    predicted = torch.cat([b[1] for b in batches])
    mean = predicted.mean(dim=0, keepdim=True)
    mean_vector = torch.cat([b[2] for b in batches]).mean(dim=0, keepdim=True)
    generator = torch.Generator().manual_seed(seed)
    shuffled = predicted[torch.randperm(len(predicted), generator=generator).to(device)]
    names = ["predicted", "mean", "shuffled", "own_vector", "previous_vector"]
    if vae.config.context_window:
        names.append("mean_no_window")
    totals = dict.fromkeys(names, 0.0)
    targets_seen = 0
    for packed, memory, vectors, context in tqdm(batches, desc="Conditioning NLL", disable=not show_progress):
        ids, mask = packed.input_ids, packed.attention_mask
        # Packed sentences are in text order, so a text's previous sentence is the row before.
        previous = vectors.roll(1, dims=0)
        previous[packed.sentence_index == 0] = mean_vector.to(vectors.dtype)
        targets = vae.reconstruction_targets(ids, mask)
        has_target = targets != -100
        given = {
            "predicted": memory,
            "mean": mean.expand_as(memory),
            "shuffled": shuffled[:len(memory)],
            "own_vector": vectors,
            "previous_vector": previous,
            "mean_no_window": mean.expand_as(memory),
        }
        shuffled = shuffled[len(memory):]
        for name in names:
            window = None if name == "mean_no_window" else context
            states = vae.teacher_forced_states(ids, mask, given[name].to(memory.dtype), context=window)
            totals[name] += float(vae.output_nll(states[has_target], targets[has_target]).double().sum())
        targets_seen += int(has_target.sum())
    model.train(was_training)
    result = {name: total / max(targets_seen, 1) for name, total in totals.items()}
    result["context_gain"] = result["mean"] - result["predicted"]
    if "mean_no_window" in result:
        result["text_gain"] = result["mean_no_window"] - result["predicted"]
    return {**result, "num_targets": targets_seen, "num_sentences": len(predicted)}


def build_sentence_opt(model_args: SentenceOPTArguments, train_texts: Sequence[str]):
    """The model and tokenizer to train: ``(SentenceLMForCausalLM, SentenceTokenizer)``."""
    from transformers import AutoModelForCausalLM

    from .configuration_sentence_vae import SentenceVAEConfig
    from .modeling_sentence_lm import SentenceLMForCausalLM
    from .modeling_sentence_opt import SentenceOPTForCausalLM
    from .modeling_sentence_vae import SentenceVAEModel
    from .tokenization_sentence_lm import SentenceTokenizer, train_sentence_tokenizer

    overrides = {
        name: getattr(model_args, name) for name in LM_CONFIG_ARGUMENTS if getattr(model_args, name) is not None
    }
    if model_args.model_name_or_path is not None:
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
        tokenizer = SentenceTokenizer.from_pretrained(model_args.model_name_or_path)
    elif model_args.backbone_name_or_path is not None and model_args.sentence_vae_name_or_path is None:
        model = SentenceLMForCausalLM.from_pretrained_backbone(
            model_args.backbone_name_or_path,
            gguf_file=model_args.backbone_gguf_file,
            sentence_vae_config=dict(max_sentence_len=model_args.max_sentence_len),
            **overrides,
        )
        if model.tokenizer is None:
            raise ValueError(
                f"{model_args.backbone_name_or_path} has no tokenizer; pass a stage-1 SentenceVAE saved with its "
                "tokenizer (--sentence_vae_name_or_path)."
            )
        tokenizer = model.tokenizer
    else:
        if model_args.sentence_vae_name_or_path is not None:
            vae = SentenceVAEModel.from_pretrained(model_args.sentence_vae_name_or_path)
            tokenizer = SentenceTokenizer.from_pretrained(model_args.sentence_vae_name_or_path)
        else:
            tokenizer = train_sentence_tokenizer(
                list(train_texts), vocab_size=model_args.vocab_size, max_sentence_len=model_args.max_sentence_len
            )
            vae_fields = dict(TINY_SENTENCE_VAE_CONFIG, max_sentence_len=model_args.max_sentence_len)
            vae = SentenceVAEModel(
                SentenceVAEConfig(
                    **vae_fields,
                    vocab_size=len(tokenizer),
                    pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            )
        if model_args.backbone_name_or_path is not None:
            model = SentenceLMForCausalLM.from_pretrained_backbone(
                model_args.backbone_name_or_path,
                sentence_vae=vae,
                tokenizer=tokenizer,
                gguf_file=model_args.backbone_gguf_file,
                **overrides,
            )
        else:
            fields = dict(TINY_BACKBONE_CONFIG, hidden_size=vae.config.hidden_size)
            fields.update(parse_overrides(model_args.backbone_config or ""))
            fields.update(overrides)
            model = SentenceOPTForCausalLM(SentenceOPTConfig(sentence_vae=vae.config, **fields))
            model.model.sentence_vae = vae
    model.sentence_vae.set_boundary_table(tokenizer)
    model.tokenizer = tokenizer
    if model_args.freeze_sentence_vae:
        model.sentence_vae.requires_grad_(False)
    if model_args.freeze_token_embeddings:
        model.sentence_vae.freeze_token_embeddings()
    if model_args.loss_chunk_size is not None:
        model.config.sentence_vae.loss_chunk_size = model_args.loss_chunk_size
    return model, tokenizer


def load_teacher(model_args: SentenceOPTArguments):
    """The token model of ``--distill_from`` (``backbone``: the one ``--backbone_name_or_path`` names)."""
    from transformers import AutoModelForCausalLM

    source, gguf_file = model_args.distill_from, model_args.distill_gguf_file
    if source == "backbone":
        if model_args.backbone_name_or_path is None:
            raise ValueError("--distill_from backbone needs --backbone_name_or_path (the token model to distil from).")
        source, gguf_file = model_args.backbone_name_or_path, gguf_file or model_args.backbone_gguf_file
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoModelForCausalLM.from_pretrained(source, **kwargs)


def train_sentence_opt(args: Sequence[str] | None = None, callbacks: Sequence | None = None) -> dict:
    """Stage 2: train a SentenceLM with the Trainer, save it (with tokenizer and model card) to
    ``output_dir``, and report the held-out whole-text NLL per token.

    Args:
        args: command-line arguments (``sys.argv[1:]`` when ``None``); ``--help`` lists them.
        callbacks: extra ``TrainerCallback`` objects.

    Returns:
        A dict with ``train`` and ``eval`` metrics, ``loss_curve``, ``output_dir`` and ``model``.
    """
    model_args, data_args, training_args = parse_sentence_opt_args(args)
    resume = start_run(training_args)

    raw = load_texts(data_args)
    model, tokenizer = build_sentence_opt(model_args, raw["train"]["text"])
    max_sentence_len = model.config.sentence_vae.max_sentence_len
    slots = model.config.max_position_embeddings
    if slots is not None and data_args.block_size > slots - 1:
        logger.warning(
            "block_size %d may hold more sentences than the backbone's %d sentence slots; texts with too many "
            "sentences will be refused.",
            data_args.block_size,
            slots - 1,
        )
    with training_args.main_process_first(desc="dataset preprocessing"):
        texts = {
            split: tokenize_texts(raw[split], tokenizer, data_args.block_size, max_sentence_len, desc=f"Tokenizing {split}")
            for split in raw
        }
    for split, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if limit is not None:
            texts[split] = texts[split].select(range(min(limit, len(texts[split]))))
    n_params = model.num_parameters()
    trainable = model.num_parameters(only_trainable=True)
    logger.info("SentenceLM with %.2fM parameters (%.2fM trainable)", n_params / 1e6, trainable / 1e6)

    trainer_class, levers = SentenceLMTrainer, {}
    if model_args.distill_from is not None:
        trainer_class = DistillationTrainer
        levers = dict(
            teacher=load_teacher(model_args),
            distill_weight=model_args.distill_weight,
            temperature=model_args.distill_temperature,
        )
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=texts["train"] if training_args.do_train else None,
        eval_dataset=texts["validation"] if training_args.do_eval else None,
        data_collator=PaddingCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=list(callbacks or []),
        **levers,
    )
    if model_args.freeze_backbone_steps:
        trainer.add_callback(FrozenBackboneWarmup(model_args.freeze_backbone_steps))
    if model_args.max_train_minutes is not None:
        trainer.add_callback(TimeBudgetCallback(60 * model_args.max_train_minutes))

    results: dict = {"output_dir": training_args.output_dir, "num_parameters": n_params}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=resume)
        results["train"] = dict(train_result.metrics)
        results["global_step"] = trainer.state.global_step
        results["loss_curve"] = loss_curve(trainer.state.log_history)
        trainer.log_metrics("train", results["train"])
        trainer.save_metrics("train", results["train"])
        trainer.save_state()
    model = trainer.accelerator.unwrap_model(trainer.model)
    if training_args.do_eval:
        metrics = text_nll(model, texts["validation"], training_args.per_device_eval_batch_size)
        results["eval"] = metrics
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        model.model_card_kwargs = {
            "results": {
                "held-out NLL per token (nats)": round(metrics["nll_per_token"], 4),
                "held-out perplexity per token": round(metrics["perplexity"], 2),
                "held-out tokens": metrics["num_tokens"],
                "training steps": trainer.state.global_step,
            },
            "datasets": [data_args.dataset_name or data_args.train_file or "pydoc_data.topics (Python standard library)"],
        }
    if training_args.do_train:
        trainer.save_model()
    results["model"] = model
    return results
