"""The rules every next-sentence decoding loop follows, in one place: the SentenceVAE's
`decode`, the reference loop of `generate()` and the row-scheduled runtime (drafting included)
call these. It imports nothing of the package, so that every module may import it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

CONTINUE, STOP = 0, 1
"""The stop head's two classes: the text goes on with another sentence, or ends here."""


def pick_next_token(scores: torch.Tensor, do_sample: bool) -> torch.Tensor:
    """The next choice of each row from ``(rows, choices)`` processed scores: sampled from their
    softmax when ``do_sample``, else the argmax (greedy)."""
    return torch.multinomial(scores.softmax(dim=-1), 1).squeeze(1) if do_sample else scores.argmax(dim=-1)


def stop_decision(
    stop_logits: torch.Tensor, do_sample: bool, may_stop: torch.Tensor | None = None
) -> torch.Tensor:
    """``(rows,)`` whether each text ends here, from the stop head's ``(rows, 2)`` logits (greedy,
    or sampled when ``do_sample``), only where ``may_stop`` allows it: between sentences (not
    while a prompt's unfinished sentence waits to be continued) and after ``min_new_tokens``."""
    stop = pick_next_token(stop_logits.float(), do_sample) == STOP
    return stop if may_stop is None else stop & may_stop


def ban_empty_sentence(logits: torch.Tensor, sentence_len: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """A sentence holds at least one token: ``logits`` ``(rows, vocab)`` with the end-of-sentence
    token banned (``-inf``) in the rows whose sentence holds no token yet (``sentence_len`` 0, the
    prefix counted). A new tensor; ``logits`` is left as it is (its raw values may be returned)."""
    banned = logits.clone()
    banned[:, eos_token_id] = torch.where(sentence_len == 0, float("-inf"), banned[:, eos_token_id])
    return banned


def causal_key_mask(query_columns: torch.Tensor, key_len: int, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """The Sentence Decoder's boolean self-attention mask ``(rows, 1, q, key_len)`` (``rows`` 1
    when ``query_columns`` is 1-D): the query at column ``c`` (``query_columns`` ``(q,)`` or
    ``(rows, q)``) sees the keys at columns ``<= c`` that ``key_valid`` ``(rows, key_len)`` marks
    (all when ``None``), and always itself, so that a padding query never attends to nothing."""
    key_index = torch.arange(key_len, device=query_columns.device)
    columns = query_columns[..., None]
    visible = key_index <= columns
    if key_valid is not None:
        visible = visible & key_valid[:, None, :]
    mask = visible | (key_index == columns)
    return mask[:, None] if mask.dim() == 3 else mask[None, None]


def blank_token_scores(rows: int, width: int, vocab: int, pad: int, device) -> torch.Tensor:
    """``(rows, width, vocab)`` scores of positions that hold no token: ``-inf`` everywhere but
    ``0`` at ``pad``, so that their argmax is the padding returned there."""
    blank = torch.full((rows, width, vocab), float("-inf"), device=device)
    blank[..., pad] = 0.0
    return blank


def left_align(input_ids: torch.Tensor, keep: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens of each row where ``keep`` holds, left-padded into ``(batch, max_kept)``, and
    their mask."""
    counts = keep.sum(dim=1)
    width = int(counts.max()) if counts.numel() else 0
    out = torch.full((input_ids.shape[0], width), pad, dtype=input_ids.dtype, device=input_ids.device)
    out_mask = torch.zeros(out.shape, dtype=torch.bool, device=input_ids.device)
    if width:
        # Column of each kept token: (width - count) + its rank among the row's kept tokens.
        column = (width - counts)[:, None] + keep.long().cumsum(dim=1) - 1
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(keep)
        out[rows[keep], column[keep]] = input_ids[keep]
        out_mask[rows[keep], column[keep]] = True
    return out, out_mask


def running_text(input_ids: torch.Tensor, written: torch.Tensor, count: torch.Tensor, pad: int) -> torch.Tensor:
    """What logits processors and stopping criteria see: each row's prompt as given, then its new
    tokens so far (``written``, ``-1`` where none; ``count`` per row), left-padded with ``pad``."""
    so_far = written[:, : int(count.max())]
    text, _ = left_align(
        torch.cat([input_ids, so_far.clamp(min=0)], dim=1),
        torch.cat([torch.ones_like(input_ids, dtype=torch.bool), so_far >= 0], dim=1),
        pad,
    )
    return text


def context_before(
    input_ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, ends: torch.Tensor, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Sentence Decoder's context (``SentenceVAEConfig.context_window``): for each query ``i``,
    the last ``window`` real tokens (``mask``) of row ``rows[i]`` of ``input_ids`` before column
    ``ends[i]``, left-padded: ``(ids, valid)``, both ``(len(rows), window)`` (ids 0 where not valid)."""
    real = mask.bool()
    counted = real.long().cumsum(dim=1)
    before = torch.where(ends > 0, counted[rows, (ends - 1).clamp(min=0)], 0)  # real tokens before each end
    columns = torch.sort((~real).to(torch.int8), dim=1, stable=True).indices  # each row's real columns first
    ranks = before[:, None] - window + torch.arange(window, device=input_ids.device)
    valid = ranks >= 0
    taken = columns[rows[:, None], ranks.clamp(min=0)]
    return torch.where(valid, input_ids[rows[:, None], taken], 0), valid



def context_start(
    context: tuple[torch.Tensor, torch.Tensor], bos_token_id: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Where a context (from :func:`context_before`) goes in the Sentence Decoder: its last token
    is the decoder's first input, in place of BOS (which stays where the text before holds no
    token), and the tokens before it fill the context columns. The sentence thus continues the
    text as a token model reads it (a BOS between the two tells a copied token model that a new
    text starts). Returns ``((ids, valid), start)``: the columns, both ``(n, window - 1)``, and
    the first inputs ``(n,)``."""
    ids, valid = context
    start = torch.where(valid[:, -1], ids[:, -1], bos_token_id)
    return (ids[:, :-1], valid[:, :-1].bool()), start


@dataclass
class DecodingResult:
    """What a next-sentence loop returns to `generate()`.

    Attributes:
        new_tokens: ``(batch, written)`` new tokens, ``-1`` where a row wrote none.
        cache: the backbone's key/value cache over sentence slots.
        num_sentences: ``(batch,)`` sentences written per row.
        stopped: ``(batch,)`` rows whose text the stop head ended (`generate()` writes their EOS).
        decoder_cache: the Sentence Decoder's last key/value cache (``None`` without a cache).
        scores: ``(batch, written, vocab)`` processed scores of the new tokens, when asked for.
        logits: ``(batch, written, vocab)`` raw logits of the new tokens, when asked for.
        decoder_passes: ``(batch,)`` Sentence Decoder passes per row (row-scheduled runtime only).
    """

    new_tokens: torch.Tensor
    cache: object | None
    num_sentences: torch.Tensor
    stopped: torch.Tensor
    decoder_cache: object | None = None
    scores: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    decoder_passes: torch.Tensor | None = None

    def with_text_ends(self, eos_token_id: int, pad_token_id: int, max_new: int) -> DecodingResult:
        """The result with the EOS written after the new tokens of every row the stop head
        ended, as a token model writes it when it ends its text (within ``max_new`` tokens: a
        row whose budget is spent gets none). Its scores and logits column is ``-inf`` but ``0``
        at the EOS (the stop head chose it, not a distribution over the vocabulary); a column
        added for it is blank in the other rows (see :func:`blank_token_scores`)."""
        count = (self.new_tokens >= 0).sum(dim=1)
        ends = self.stopped & (count < max_new)
        if not bool(ends.any()):
            return self
        rows = torch.nonzero(ends).squeeze(1)
        extra = max(0, int(count[rows].max()) + 1 - self.new_tokens.shape[1])
        new_tokens = torch.cat([self.new_tokens, self.new_tokens.new_full((len(count), extra), -1)], dim=1)
        new_tokens[rows, count[rows]] = eos_token_id
        marked = []
        for values in (self.scores, self.logits):
            if values is not None:
                blank = blank_token_scores(len(count), extra, values.shape[2], pad_token_id, values.device)
                values = torch.cat([values, blank.to(values.dtype)], dim=1)
                values[rows, count[rows]] = blank_token_scores(len(rows), 1, values.shape[2], eos_token_id, values.device)[:, 0]
            marked.append(values)
        return dataclasses.replace(self, new_tokens=new_tokens, scores=marked[0], logits=marked[1])
