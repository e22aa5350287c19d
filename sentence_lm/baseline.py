"""The token-level baseline: the token model of a SentenceLM's backbone family and shape (an
`OPTForCausalLM` for SentenceOPT, a `LlamaForCausalLM` for a Llama backbone...), trained on the
same text examples, so that speed and quality are compared like with like."""

from __future__ import annotations

import copy

import torch
from transformers import (
    AutoModelForCausalLM,
    DataCollatorForLanguageModeling,
    PreTrainedConfig,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
)

from .configuration_sentence_lm import SentenceLMConfig


def token_config_like(config: SentenceLMConfig, max_position_embeddings: int = 2048) -> PreTrainedConfig:
    """The config of the token model with a SentenceLM's backbone (family, shape, every setting)
    and its vocabulary and special tokens; its positions count tokens, so it gets its own
    ``max_position_embeddings``."""
    token_config = copy.deepcopy(config.backbone)
    token_config.vocab_size = config.vocab_size
    token_config.pad_token_id = config.pad_token_id
    token_config.bos_token_id = config.bos_token_id
    token_config.eos_token_id = config.eos_token_id
    token_config.max_position_embeddings = max_position_embeddings
    return token_config


def token_baseline_trainer(
    config: PreTrainedConfig, tokenizer, train_dataset, training_args: TrainingArguments, eval_dataset=None
) -> Trainer:
    """A Trainer for a fresh token model of ``config`` (see :func:`token_config_like`) on text
    examples (rows with ``input_ids``, as made by :func:`sentence_lm.data.tokenize_texts`), with
    the library's causal-LM collator; add callbacks or read its state before or after training."""
    torch.manual_seed(training_args.seed)
    model = AutoModelForCausalLM.from_config(config)
    columns = [c for c in train_dataset.column_names if c not in ("input_ids", "attention_mask")]
    return Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset.remove_columns(columns),
        eval_dataset=eval_dataset.remove_columns(columns) if eval_dataset is not None else None,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
    )


def train_token_baseline(
    config: PreTrainedConfig, tokenizer, train_dataset, training_args: TrainingArguments, eval_dataset=None
) -> PreTrainedModel:
    """Train :func:`token_baseline_trainer`'s model and return it."""
    trainer = token_baseline_trainer(config, tokenizer, train_dataset, training_args, eval_dataset)
    trainer.train()
    return trainer.accelerator.unwrap_model(trainer.model)
