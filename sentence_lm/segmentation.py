"""Sentence segmentation on token ids.

A text is cut into sentences *after* its token ids, never by re-tokenising strings, so that
concatenating the sentences of a text gives back exactly its ids. A table over the vocabulary,
built once per tokenizer by :func:`build_boundary_table` from the text each token stands for
inside a text (``Ġ.`` and ``▁.`` both read " ."; a byte-fallback ``<0x0A>`` reads "\\n"),
holds flags for every token:

* ``ENDS``: the token ends a sentence (its text, trailing whitespace and closing quotes and
  brackets removed, ends with one of :data:`SENTENCE_END_CHARS`, or it holds a newline);
* ``TRAILS``: the token may still belong to a sentence that has just ended: it is made of
  punctuation, closing quotes and brackets, and whitespace only, and does not start with a
  space before a non-space character (a space before a quote opens the next sentence);
* ``BLANK``: the token is whitespace only; ``SPACE_END``: its text ends with whitespace.

A sentence ends after the last token of a run "ending token, then trailing tokens" (a quote
or bracket right after whitespace opens the next sentence instead), after ``max_sentence_len``
tokens, and at an end of turn (see :func:`sentence_tokens`). Everything is vectorised over the
batch with ``torch``.

Special tokens inside a text are read as the text's own tokens, as a chat template writes them
(:func:`sentence_tokens`): a role marker such as ``<|im_start|>`` is an ordinary token of its
sentence (no boundary flags), and an EOS after text ends a turn: it closes the sentence before
it, which a SentenceLM reads as that sentence's stop decision rather than as a token. Only the
leading BOS (the start state stands for it) and padding belong to no sentence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SENTENCE_END_CHARS = frozenset(",.!?;:，。！？；：…\n")
"""Characters after which a sentence ends (ASCII and CJK forms, the ellipsis, the newline)."""

CLOSING_CHARS = frozenset("\"'”’»›)]}」』】〕）〉》")
"""Closing quotes and brackets that stay with the sentence they close."""


ENDS, TRAILS, BLANK, SPACE_END = 1, 2, 4, 8
"""Bit flags of the boundary table (see the module docstring)."""


def build_boundary_table(tokenizer) -> torch.Tensor:
    """Build the boundary table over ``tokenizer``'s vocabulary.

    Args:
        tokenizer: any ``transformers`` tokenizer: byte-level BPE (GPT-2, OPT, Llama-3, Qwen2)
            or SentencePiece-style (``▁`` for a space, byte-fallback tokens such as ``<0x0A>``:
            Llama-2, Mistral, Gemma). Each id is read as it decodes inside a text (see
            :func:`token_texts`). A multi-byte punctuation mark (``。``) split over several byte
            tokens is not recognised as a boundary: each byte alone decodes to ``"�"``.

    Returns:
        A ``torch.uint8`` tensor of shape ``(len(tokenizer),)`` of :data:`ENDS`,
        :data:`TRAILS`, :data:`BLANK` and :data:`SPACE_END` flags. Special tokens have none.
    """
    texts = token_texts(tokenizer)
    table = torch.zeros(len(texts), dtype=torch.uint8)
    special = set(tokenizer.all_special_ids)
    trail_chars = SENTENCE_END_CHARS | CLOSING_CHARS
    for i, text in enumerate(texts):
        if i in special or not text:
            continue
        stripped = text.rstrip()
        # Closing quotes/brackets merged into the token after the mark (`."`, `?)`, `.”`) do not
        # hide it: such a token ends a sentence like the split pair `.` + `"` does.
        core = stripped
        while core and (core[-1] in CLOSING_CHARS or core[-1].isspace()):
            core = core[:-1]
        ends = "\n" in text or (bool(core) and core[-1] in SENTENCE_END_CHARS)
        only_trailing = all(c in trail_chars or c.isspace() for c in text)
        opens_next = text[0].isspace() and bool(stripped)
        table[i] = (
            ENDS * ends
            + TRAILS * (only_trailing and not opens_next)
            + BLANK * (not stripped)
            + SPACE_END * text[-1].isspace()
        )
    return table


def token_texts(tokenizer) -> list[str]:
    """The text of every vocabulary id as it reads inside a text, for :func:`build_boundary_table`.

    Decoding an id alone is not enough: SentencePiece-style decoders (``Metaspace``, or the
    ``Strip`` step of Llama's) drop the space of a ``▁`` at the start of the decoded text, so
    ``▁.`` alone would read ``.`` and ``▁`` nothing. Each id is therefore decoded after the ids
    of ``"a"`` and the text of those is cut off; an id whose decoding does not start with it is
    decoded alone. Byte-fallback tokens of partial UTF-8 characters read ``"�"``.
    """
    # The `tokenizers` backend encodes without the wrapper's own outputs (a SentenceTokenizer's
    # `encode` needs the table being built here).
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        prefix = backend.encode("a", add_special_tokens=False).ids
    else:
        prefix = tokenizer.encode("a", add_special_tokens=False)
    head = tokenizer.decode(prefix, clean_up_tokenization_spaces=False)
    ids = range(len(tokenizer))
    texts = tokenizer.batch_decode([prefix + [i] for i in ids], clean_up_tokenization_spaces=False)
    return [
        text[len(head) :] if text.startswith(head) else tokenizer.decode([i], clean_up_tokenization_spaces=False)
        for i, text in zip(ids, texts)
    ]


def sentence_tokens(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, bos_token_id: int | None, eos_token_id: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which tokens of a batch of texts are sentence tokens, and which end a turn.

    Args:
        input_ids: ``(batch, seq_len)`` token ids.
        attention_mask: ``(batch, seq_len)``, 1 on real tokens (padding on either side).
        bos_token_id, eos_token_id: the model's (``None``: it has none).

    Returns:
        ``(content, turn_ends)``, both ``(batch, seq_len)`` bool. ``turn_ends``: every EOS token
        that follows a text token other than an EOS (since the start: a leading BOS is not text),
        i.e. the first EOS after text: the end of a chat turn (``<|im_end|>``), of a
        document in packed text, or of the whole text (the EOS that TRL and some tokenizers
        append). It closes the sentence before it. ``content``: the real tokens but each row's
        leading BOS (the start state stands for it) and the turn ends; every other token,
        special or not (role markers, a BOS inside the text, an EOS with no text before it), is
        a token of a sentence.
    """
    mask = attention_mask.bool()
    content = mask.clone()
    batch, length = input_ids.shape
    if length == 0:
        return content, torch.zeros_like(mask)
    rows = torch.arange(batch, device=input_ids.device)
    if bos_token_id is not None:
        first = torch.argmax(mask.long(), dim=1)
        leading = mask[rows, first] & (input_ids[rows, first] == bos_token_id)
        content[rows[leading], first[leading]] = False
    if eos_token_id is None:
        return content, torch.zeros_like(mask)
    is_eos = content & (input_ids == eos_token_id)
    pos = torch.arange(length, device=input_ids.device).expand(batch, length)
    last_content = torch.where(content, pos, -1).cummax(dim=1).values
    previous = torch.full_like(last_content, -1)
    previous[:, 1:] = last_content[:, :-1]
    after_text = (previous >= 0) & ~is_eos.gather(1, previous.clamp(min=0))
    turn_ends = is_eos & after_text
    return content & ~turn_ends, turn_ends


def segment_sentences(
    input_ids: torch.Tensor,
    boundary_table: torch.Tensor,
    max_sentence_len: int,
    attention_mask: torch.Tensor | None = None,
    return_closed: bool = False,
    breaks: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Give every token the index of its sentence within its text.

    Args:
        input_ids: ``(batch, seq_len)`` or ``(seq_len,)`` integer token ids.
        boundary_table: the table from :func:`build_boundary_table`.
        max_sentence_len: a sentence is cut after this many tokens.
        attention_mask: ``1`` for tokens of the text, ``0`` for padding (either side). Masked
            tokens are skipped and get sentence index ``-1``.
        return_closed: also return, per text, whether its last sentence is closed (it ends
            with a boundary, holds ``max_sentence_len`` tokens or is followed by a break)
            rather than open, i.e. still waiting for more tokens. A text with no tokens counts
            as closed.
        breaks: ``(batch, seq_len)`` bool, masked positions after which a sentence ends
            whatever the rules say (the turn ends of :func:`sentence_tokens`): the next unmasked
            token starts a new sentence.

    Returns:
        A ``torch.long`` tensor shaped like ``input_ids``: ``0, 0, 0, 1, 1, 2, ...`` for each
        text, ``-1`` for masked tokens; with ``return_closed``, also a ``(batch,)`` bool tensor.
    """
    if max_sentence_len < 1:
        raise ValueError(f"max_sentence_len must be at least 1, got {max_sentence_len}.")
    if input_ids.dtype in (torch.bool,) or input_ids.is_floating_point():
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}.")
    squeeze = input_ids.dim() == 1
    ids = input_ids.unsqueeze(0) if squeeze else input_ids
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be 1-D or 2-D (batch, seq_len), got shape {tuple(input_ids.shape)}.")
    if attention_mask is None:
        mask = torch.ones_like(ids, dtype=torch.bool)
    else:
        mask = attention_mask.reshape(ids.shape) if attention_mask.numel() == ids.numel() else None
        if mask is None:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has shape "
                f"{tuple(input_ids.shape)}; pass one mask value per token."
            )
        mask = mask.bool()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= boundary_table.numel()):
        raise ValueError(
            f"input_ids holds ids outside the vocabulary [0, {boundary_table.numel()}): "
            f"min {int(ids.min())}, max {int(ids.max())}. Use ids from the model's tokenizer."
        )
    batch, length = ids.shape
    sentence_ids = torch.full_like(ids, -1, dtype=torch.long)
    if length == 0:
        closed = torch.ones(batch, dtype=torch.bool, device=ids.device)
        return _finish(sentence_ids, closed, squeeze, return_closed)
    scan = _scan(ids, mask, boundary_table, max_sentence_len, None if breaks is None else breaks.reshape(ids.shape))
    sentence_ids.scatter_(1, scan.order, torch.where(scan.valid, scan.starts.long().cumsum(dim=1) - 1, -1))
    last = (scan.valid.sum(dim=1, keepdim=True) - 1).clamp(min=0)
    closed = (scan.pending | scan.full | scan.broken).gather(1, last).squeeze(1) | ~scan.valid.any(dim=1)
    return _finish(sentence_ids, closed, squeeze, return_closed)


@dataclass
class _Scan:
    """The segmentation of a batch, on each row's unmasked tokens packed to the left."""

    order: torch.Tensor  # (batch, seq_len): original column of each packed token
    valid: torch.Tensor  # packed token is a real (unmasked) token
    starts: torch.Tensor  # packed token starts a sentence
    pending: torch.Tensor  # packed token closes its sentence unless the next token trails
    full: torch.Tensor  # packed token is the max_sentence_len-th of its sentence (a forced cut)
    broken: torch.Tensor  # packed token is followed by a break (a forced cut)


def _scan(
    ids: torch.Tensor,
    mask: torch.Tensor,
    boundary_table: torch.Tensor,
    max_sentence_len: int,
    breaks: torch.Tensor | None = None,
) -> _Scan:
    # Work on the unmasked tokens of each row, packed to the left, so that padding on either
    # side (or in between) never splits or joins a sentence.
    batch, length = ids.shape
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    packed = ids.gather(1, order)
    valid = mask.gather(1, order)
    pos = torch.arange(length, device=ids.device).expand(batch, length)

    # A break between two real tokens: more breaks at or before the later one's column than at
    # or before the earlier one's (the last real token of a row compares with the row's total).
    broken = torch.zeros_like(valid)
    if breaks is not None:
        seen = breaks.long().cumsum(dim=1)
        here = seen.gather(1, order)
        next_valid = torch.cat([valid[:, 1:], torch.zeros_like(valid[:, :1])], dim=1)
        after = torch.where(next_valid, torch.cat([here[:, 1:], here[:, -1:]], dim=1), seen[:, -1:])
        broken = valid & (after > here)
    after_break = torch.zeros_like(valid)
    after_break[:, 1:] = broken[:, :-1]

    flags = boundary_table.to(ids.device)[packed]
    is_end = (flags & ENDS).bool() & valid
    after_space = torch.zeros_like(valid)
    after_space[:, 1:] = (flags[:, :-1] & SPACE_END).bool()
    is_trail = (flags & TRAILS).bool() & valid & ((flags & BLANK).bool() | ~after_space) & ~after_break
    last_end = torch.where(is_end, pos, -1).cummax(dim=1).values
    last_non_trail = torch.where(is_trail, -1, pos).cummax(dim=1).values
    pending = (last_end >= 0) & (last_end >= last_non_trail)
    next_trails = torch.zeros_like(is_trail)
    next_trails[:, :-1] = is_trail[:, 1:]
    boundary_after = pending & ~next_trails
    starts = torch.zeros_like(valid)
    starts[:, 0] = True
    starts[:, 1:] = boundary_after[:, :-1] | after_break[:, 1:]

    # Cut sentences longer than max_sentence_len into pieces of that length.
    start_pos = torch.where(starts, pos, 0).cummax(dim=1).values
    offset = pos - start_pos
    starts = starts | ((offset % max_sentence_len) == 0)
    full = (offset % max_sentence_len) == max_sentence_len - 1
    return _Scan(order=order, valid=valid, starts=starts, pending=pending & valid, full=full & valid, broken=broken)


def boundary_states(
    input_ids: torch.Tensor,
    boundary_table: torch.Tensor,
    max_sentence_len: int,
    attention_mask: torch.Tensor,
    breaks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the segmentation knows after each token, from that token and the ones before it
    (``breaks`` before it included, see :func:`segment_sentences`; a break after it is not
    known there): ``(pending, full)``, both ``(batch, seq_len)`` bools. ``pending``: the token
    closes its sentence unless the next token trails (see the module docstring); ``full``: the
    token is the ``max_sentence_len``-th of its sentence, so the next token starts a new one
    whatever it is. Masked positions are ``False``."""
    scan = _scan(input_ids, attention_mask.bool(), boundary_table, max_sentence_len, breaks)
    pending = torch.zeros_like(scan.pending).scatter_(1, scan.order, scan.pending)
    full = torch.zeros_like(scan.full).scatter_(1, scan.order, scan.full)
    return pending, full


def trails_after(boundary_table: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """``(batch, vocab)``: which tokens would stay with a sentence that has just ended (trail it)
    after the token ids ``previous`` ``(batch,)``: trailing punctuation and quotes, except a quote
    or bracket right after whitespace (it opens the next sentence)."""
    table = boundary_table
    after_space = (table[previous] & SPACE_END).bool()
    trailing = (table & TRAILS).bool()[None, :]
    blank = (table & BLANK).bool()[None, :]
    return trailing & (blank | ~after_space[:, None])


def _finish(sentence_ids: torch.Tensor, closed: torch.Tensor, squeeze: bool, return_closed: bool):
    if squeeze:
        sentence_ids, closed = sentence_ids.squeeze(0), closed.squeeze(0)
    return (sentence_ids, closed) if return_closed else sentence_ids


@dataclass
class PackedSentences:
    """All sentences of a batch of texts in one right-padded tensor.

    Attributes:
        input_ids: ``(num_sentences, max_len)`` token ids of each sentence, right-padded.
        lengths: ``(num_sentences,)`` number of tokens of each sentence.
        batch_index: ``(num_sentences,)`` which text each sentence comes from.
        sentence_index: ``(num_sentences,)`` position of each sentence within its text.
        num_sentences: ``(batch,)`` sentences per text.
        token_sentence: ``(batch, seq_len)`` global sentence index of every token, ``-1`` for
            skipped tokens.
        token_position: ``(batch, seq_len)`` position of every token within its sentence.
    """

    input_ids: torch.Tensor
    lengths: torch.Tensor
    batch_index: torch.Tensor
    sentence_index: torch.Tensor
    num_sentences: torch.Tensor
    token_sentence: torch.Tensor
    token_position: torch.Tensor

    @property
    def attention_mask(self) -> torch.Tensor:
        """``(num_sentences, max_len)`` mask of the real tokens of each sentence."""
        width = self.input_ids.shape[1]
        return torch.arange(width, device=self.lengths.device) < self.lengths[:, None]

    def first_slots(self, slots: int) -> torch.Tensor:
        """``(batch,)`` the slot of each text's start state when its sentences sit left-padded in
        ``slots`` backbone slots (``[padding.., start, s_0, s_1, ..]``, the SentenceLM's layout):
        sentence ``i`` of text ``b`` is at ``first_slots[b] + 1 + i``."""
        return slots - 1 - self.num_sentences

    def closed_by(self, marks: torch.Tensor) -> torch.Tensor:
        """``(num_sentences,)`` which sentences a marked token (``marks`` ``(batch, seq_len)``, on
        tokens that belong to no sentence, such as the turn ends of :func:`sentence_tokens`)
        follows directly: the sentence of the last sentence token before each mark."""
        so_far = self.token_sentence.cummax(dim=1).values
        closed = torch.zeros(self.lengths.shape[0], dtype=torch.bool, device=self.lengths.device)
        after = so_far[marks & (so_far >= 0)]
        closed[after] = True
        return closed

    def sentence_slots(self, slots: int) -> torch.Tensor:
        """``(num_sentences,)`` the slot of each packed sentence in that layout (see :meth:`first_slots`)."""
        return self.first_slots(slots)[self.batch_index] + 1 + self.sentence_index


def pack_sentences(input_ids: torch.Tensor, sentence_ids: torch.Tensor, pad_token_id: int) -> PackedSentences:
    """Gather the sentences given by ``sentence_ids`` (from :func:`segment_sentences`) into
    one ``(num_sentences, max_len)`` tensor, with no Python loop over texts or sentences."""
    batch, length = input_ids.shape
    device = input_ids.device
    valid = sentence_ids >= 0
    num_sentences = torch.where(valid, sentence_ids + 1, 0).amax(dim=1) if length else torch.zeros(
        batch, dtype=torch.long, device=device
    )
    offsets = num_sentences.cumsum(0) - num_sentences
    total = int(num_sentences.sum())
    token_sentence = torch.where(valid, sentence_ids + offsets[:, None], -1)
    flat_sentence = token_sentence[valid]
    lengths = torch.bincount(flat_sentence, minlength=total)
    # Position of each token within its sentence: rank among the valid tokens of the sentence.
    starts = torch.zeros(total, dtype=torch.long, device=device)
    flat_rank = torch.arange(flat_sentence.numel(), device=device)
    starts.scatter_reduce_(0, flat_sentence, flat_rank, reduce="amin", include_self=False)
    flat_position = flat_rank - starts[flat_sentence]
    token_position = torch.zeros_like(sentence_ids)
    token_position[valid] = flat_position
    width = int(lengths.max()) if total else 0
    packed = torch.full((total, width), pad_token_id, dtype=input_ids.dtype, device=device)
    packed[flat_sentence, flat_position] = input_ids[valid]
    batch_index = torch.repeat_interleave(torch.arange(batch, device=device), num_sentences)
    sentence_index = torch.arange(total, device=device) - offsets[batch_index]
    return PackedSentences(
        input_ids=packed,
        lengths=lengths,
        batch_index=batch_index,
        sentence_index=sentence_index,
        num_sentences=num_sentences,
        token_sentence=token_sentence,
        token_position=token_position,
    )
