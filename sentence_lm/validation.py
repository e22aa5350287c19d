"""Checks of the inputs every model entry point takes (token ids, attention masks, token
budgets): a wrong input raises a ``TypeError`` or ``ValueError`` that names it and the fix."""

from __future__ import annotations

import numpy as np
import torch


def check_token_ids(input_ids: torch.Tensor, vocab_size: int, name: str = "input_ids") -> None:
    """Raise a clear error unless ``input_ids`` is a 2-D integer tensor of ids below ``vocab_size``."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(
            f"`{name}` must be a torch.LongTensor, got {type(input_ids).__name__}; call the tokenizer with "
            "return_tensors='pt'."
        )
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise TypeError(
            f"`{name}` must hold integer token ids, got dtype {input_ids.dtype}; pass the tokenizer's ids "
            "(or convert them with `.long()`)."
        )
    if input_ids.dim() != 2:
        raise ValueError(
            f"`{name}` must be 2-D (batch, seq_len), got shape {tuple(input_ids.shape)}; "
            "add a batch dimension with `.unsqueeze(0)`."
        )
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(
            f"`{name}` holds ids outside the vocabulary [0, {vocab_size}) (min {int(input_ids.min())}, "
            f"max {int(input_ids.max())}); encode text with the model's own tokenizer."
        )


def check_attention_mask(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
    """Return ``attention_mask`` as a bool tensor (all ones when ``None``), checking its shape."""
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has shape "
            f"{tuple(input_ids.shape)}; they must match: pass the attention_mask the tokenizer returned "
            "with these ids."
        )
    return attention_mask.to(device=input_ids.device, dtype=torch.bool)


def check_budget(max_new_tokens, n: int, name: str = "max_new_tokens") -> None:
    """Raise a clear error unless ``max_new_tokens`` is ``None``, an integer >= 0, or an integer
    tensor of shape ``()`` or ``(n,)`` with no negative entry (one budget per row)."""
    if max_new_tokens is None:
        return
    if isinstance(max_new_tokens, torch.Tensor):
        if max_new_tokens.is_floating_point() or max_new_tokens.is_complex() or max_new_tokens.dtype == torch.bool:
            raise TypeError(f"`{name}` must hold integers, got dtype {max_new_tokens.dtype}.")
        if max_new_tokens.shape not in ((), (n,)):
            raise ValueError(
                f"`{name}` has shape {tuple(max_new_tokens.shape)}; pass one int for all rows or a tensor of "
                f"shape ({n},), one budget per sentence vector."
            )
        if max_new_tokens.numel() and int(max_new_tokens.min()) < 0:
            raise ValueError(f"`{name}` must be >= 0 in every row, got min {int(max_new_tokens.min())}.")
        return
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int or an integer tensor of shape ({n},), got {max_new_tokens!r}.")
    if max_new_tokens < 0:
        raise ValueError(f"`{name}` must be >= 0, got {max_new_tokens}.")


def logit_positions(
    logits_to_keep, training: bool, seq_len: int, positions_supported: bool = True
) -> torch.Tensor | slice | None:
    """Which positions' logits a forward returns, from its ``logits_to_keep`` argument:
    ``slice(None)`` for all, a 1-D tensor of positions (in ``[0, seq_len)``, in the order asked), or
    ``None`` for none.

    ``None`` (the default): all positions in evaluation mode, none in training mode (the loss does
    not need them); ``0``: all (as in `transformers`); an int ``n > 0``: the last ``n``; a 1-D
    integer tensor: those positions (negative ones count from the end; an empty tensor: none).
    Without ``positions_supported`` only ``None``, ``0`` and an empty tensor are accepted."""
    supported = (
        "None (all logits in evaluation mode, none in training mode), 0 (all), an int n > 0 (the last n "
        "positions) or a 1-D integer tensor of positions (empty: none)"
        if positions_supported
        else "None (all logits in evaluation mode, none in training mode), 0 (all) or an empty tensor (none)"
    )
    if logits_to_keep is None:
        return None if training else slice(None)
    if isinstance(logits_to_keep, torch.Tensor):
        if logits_to_keep.dim() != 1 or logits_to_keep.is_floating_point() or logits_to_keep.dtype == torch.bool:
            raise ValueError(
                f"logits_to_keep as a tensor must be 1-D and hold integer positions, got shape "
                f"{tuple(logits_to_keep.shape)} and dtype {logits_to_keep.dtype}; pass {supported}."
            )
        if logits_to_keep.numel() == 0:
            return None
        if not positions_supported:
            raise ValueError(f"This model cannot return the logits of chosen positions; pass {supported}.")
        if int(logits_to_keep.min()) < -seq_len or int(logits_to_keep.max()) >= seq_len:
            raise ValueError(
                f"logits_to_keep holds positions outside the {seq_len} positions of input_ids "
                f"(min {int(logits_to_keep.min())}, max {int(logits_to_keep.max())})."
            )
        return logits_to_keep.long() % seq_len
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, (int, np.integer)) or logits_to_keep < 0:
        raise ValueError(f"logits_to_keep={logits_to_keep!r} is not supported; pass {supported}.")
    if logits_to_keep == 0 or logits_to_keep >= seq_len:
        return slice(None)
    if not positions_supported:
        raise ValueError(f"logits_to_keep={logits_to_keep} is not supported by this model; pass {supported}.")
    return torch.arange(seq_len - int(logits_to_keep), seq_len)


FORWARD_IGNORED = ("use_cache", "cache_position", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
"""Keyword arguments `transformers` tools hand every causal LM's ``forward`` that a SentenceLM's
``forward`` may ignore: the cache settings (whole texts are scored; the cache lives in
``generate()``) and the flash-attention offsets of padding-free packing collators
(`DataCollatorWithFlattening`, TRL's ``packing=True``), whose ``position_ids`` mark the same texts."""


def check_forward_extras(kwargs: dict, model_name: str) -> None:
    """Refuse what a SentenceLM's ``forward`` cannot honour instead of ignoring it: token
    embeddings in place of ids, a key/value cache with content, and any unknown keyword (a typo)."""
    if kwargs.get("inputs_embeds") is not None:
        raise ValueError(
            f"{model_name}.forward takes input_ids, not inputs_embeds: a SentenceLM cuts the token ids into "
            "sentences and embeds each sentence with its own encoder. Pass input_ids (the embeddings of a "
            "SentenceLM's backbone are sentence vectors: see SentenceLMModel.run_backbone)."
        )
    for name in ("past_key_values", "cache"):
        cache = kwargs.get(name)
        if cache is not None and (not hasattr(cache, "get_seq_length") or cache.get_seq_length() > 0):
            raise ValueError(
                f"{model_name}.forward scores whole texts and takes no {name}: a SentenceLM's cache is over "
                "sentence slots and lives in generate(). Pass the whole text as input_ids, or call generate() to "
                "continue it."
            )
    unknown = sorted(set(kwargs) - {"inputs_embeds", "past_key_values", "cache", *FORWARD_IGNORED})
    if unknown:
        raise TypeError(
            f"{model_name}.forward got unexpected keyword argument(s) {unknown}; check the spelling (it takes "
            "input_ids, attention_mask, labels, shift_labels, position_ids, num_items_in_batch, logits_to_keep, "
            "output_hidden_states, output_attentions, return_dict and sentence_ids)."
        )


def check_teacher_inputs(
    hidden_states, condition_on_teacher: bool, top_k, packed: bool, input_ids: torch.Tensor, config
) -> None:
    """Refuse a token model's training signals that `SentenceLMForCausalLM.forward` cannot read:
    with rows that pack several texts, ``teacher_hidden_states`` that are not one backbone-wide
    vector per token, ``condition_on_teacher`` without them, a ``teacher_top_k`` that is not
    ``(ids, log_probs)`` of shape ``(batch, seq_len, k)`` over the model's vocabulary."""
    given = [name for name, value in (("teacher_hidden_states", hidden_states), ("teacher_top_k", top_k)) if value is not None]
    if given and packed:
        raise ValueError(
            f"{given[0]} with rows that pack several texts (position_ids restarting at 0) is not supported; train "
            "with one text per row (packing=False)."
        )
    if hidden_states is None and condition_on_teacher:
        raise ValueError("condition_on_teacher=True needs teacher_hidden_states (the token model's states).")
    if hidden_states is not None:
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3 or hidden_states.shape[:2] != input_ids.shape:
            raise ValueError(
                f"teacher_hidden_states has shape {tuple(getattr(hidden_states, 'shape', ()))} but input_ids has "
                f"{tuple(input_ids.shape)}; pass the token model's final hidden states on the same ids, "
                "(batch, seq_len, hidden_size)."
            )
        if hidden_states.shape[-1] != config.hidden_size:
            raise ValueError(
                f"teacher_hidden_states are {hidden_states.shape[-1]} wide but this SentenceLM's backbone is "
                f"{config.hidden_size}: distil the hidden states of a token model of the backbone's width (the one it "
                "was built from)."
            )
    if top_k is not None:
        if not (isinstance(top_k, (tuple, list)) and len(top_k) == 2):
            raise ValueError("teacher_top_k must be a pair (ids, log_probs), each (batch, seq_len, k).")
        ids, log_probs = top_k
        if ids.dim() != 3 or ids.shape[:2] != input_ids.shape or log_probs.shape != ids.shape:
            raise ValueError(
                f"teacher_top_k holds ids of shape {tuple(ids.shape)} and log-probabilities of shape "
                f"{tuple(log_probs.shape)} but input_ids has {tuple(input_ids.shape)}; pass (batch, seq_len, k) each."
            )
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= config.vocab_size):
            raise ValueError(
                f"teacher_top_k holds token ids outside [0, {config.vocab_size}): distil from a token model on this "
                "model's vocabulary (the one it was built from)."
            )
