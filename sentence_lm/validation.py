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
