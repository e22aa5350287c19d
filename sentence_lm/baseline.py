"""The token-level baseline: an `OPTForCausalLM` of a SentenceOPT's backbone shape, trained on
the same text examples, so that speed and quality are compared like with like."""

from __future__ import annotations

import torch
from transformers import DataCollatorForLanguageModeling, OPTConfig, OPTForCausalLM, Trainer, TrainingArguments

from .configuration_sentence_opt import SentenceOPTConfig

BACKBONE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "ffn_dim",
    "do_layer_norm_before",
    "dropout",
    "attention_dropout",
    "activation_function",
    "enable_bias",
    "layer_norm_elementwise_affine",
    "init_std",
)


def opt_config_like(config: SentenceOPTConfig, max_position_embeddings: int = 2048) -> OPTConfig:
    """An `OPTConfig` with the SentenceOPT backbone's shape, vocabulary and special tokens (its
    positions count tokens, so it gets its own ``max_position_embeddings``)."""
    return OPTConfig(
        **{name: getattr(config, name) for name in BACKBONE_FIELDS},
        vocab_size=config.vocab_size,
        max_position_embeddings=max_position_embeddings,
        word_embed_proj_dim=config.hidden_size,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
    )


def train_opt_baseline(
    config: OPTConfig, tokenizer, train_dataset, training_args: TrainingArguments, eval_dataset=None
) -> OPTForCausalLM:
    """Train a fresh `OPTForCausalLM` with the Trainer on text examples (rows with ``input_ids``,
    as made by :func:`sentence_lm.data.tokenize_texts`) and return it."""
    torch.manual_seed(training_args.seed)
    model = OPTForCausalLM(config)
    columns = [c for c in train_dataset.column_names if c not in ("input_ids", "attention_mask")]
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset.remove_columns(columns),
        eval_dataset=eval_dataset.remove_columns(columns) if eval_dataset is not None else None,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    trainer.train()
    return trainer.accelerator.unwrap_model(trainer.model)
