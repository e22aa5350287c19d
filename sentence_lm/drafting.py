"""Drafting a sentence in one pass and verifying it in one: the acceptance rule.

A SentenceLM's draft head (the SentenceVAE's ``parallel_readout``) reads every token of the next
sentence from its sentence vector at once; the Sentence Decoder checks the drafted tokens in one
forward pass and keeps the longest run it agrees with, plus a token of its own (blockwise parallel
decoding, Stern et al. 2018; speculative sampling, Leviathan et al. 2023 and Chen et al. 2023).
`generate(draft_tokens=k)` runs it (:func:`~sentence_lm.generation_runtime.generate_rows`).
"""

from __future__ import annotations

import torch


def verify_draft(
    scores: torch.Tensor, draft: torch.Tensor, draft_probs: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The token each row takes at one position, and whether it is the drafted one.

    Args:
        scores: ``(rows, vocab)`` the model's processed scores at this position (the token is
            drawn from their softmax, or is their argmax).
        draft: ``(rows,)`` the drafted tokens.
        draft_probs: ``(rows, vocab)`` the distribution each drafted token was sampled from;
            ``None`` for greedy decoding.

    Greedy (``draft_probs=None``): the argmax of ``scores``, accepted where it equals the draft;
    so the text is the one plain greedy decoding writes. Sampling: speculative sampling's rule,
    the drafted token ``d`` kept with probability ``min(1, p(d) / q(d))`` (``p``: softmax of
    ``scores``, ``q``: ``draft_probs``), otherwise a token drawn from ``max(0, p - q)``
    renormalised; each row's token is then distributed exactly as ``p``, whatever ``q`` is.

    Returns:
        ``(token, accepted)``: ``(rows,)`` ids and ``(rows,)`` booleans.
    """
    if draft_probs is None:
        token = scores.argmax(dim=-1)
        return token, token == draft
    probs = scores.softmax(dim=-1)
    p = probs.gather(1, draft[:, None]).squeeze(1)
    q = draft_probs.gather(1, draft[:, None]).squeeze(1)
    accepted = torch.rand_like(p) * q < p
    residual = (probs - draft_probs).clamp(min=0)
    # Where q >= p everywhere, p == q and nothing is rejected; p keeps multinomial well defined.
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, probs)
    token = torch.where(accepted, draft, torch.multinomial(residual, 1).squeeze(1))
    return token, accepted
