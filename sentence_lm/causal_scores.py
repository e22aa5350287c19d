"""Causal token scores of a SentenceLM: what a token model's logits are, from a model that writes
whole sentences. ``logits[:, t]`` scores token ``t + 1`` from tokens ``0..t`` only, so that tools
built for token models (``lm_loss``, lm-evaluation-harness, perplexity scripts) read a SentenceLM
as they read a token model. `SentenceLMForCausalLM.forward` computes them in evaluation mode
(see its ``logits_to_keep`` for their cost)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .decoding import CONTINUE, STOP, context_before
from .segmentation import boundary_states, trails_after


def causal_scores(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    out,
    step_log_probs: torch.Tensor,
    step_index: torch.Tensor,
    positions: torch.Tensor | slice = slice(None),
) -> torch.Tensor:
    """Causal next-token scores ``(batch, seq_len, vocab)`` of a `SentenceLMForCausalLM`
    ``model`` on the texts of ``out`` (its base model's output on ``input_ids`` and
    ``attention_mask``): ``logits[:, t]`` are the
    log-probabilities of token ``t + 1`` given tokens ``0..t`` only, with the sentence-boundary
    decision marginalised rather than read off token ``t + 1``.

    ``step_log_probs`` are the Sentence Decoder's log-probabilities at its teacher-forced steps
    and ``step_index`` ``(num_sentences, max_len + 1)`` the row of each step in them. With a
    tensor of ``positions`` only those are computed: ``(batch, len(positions), vocab)``.

    What they cost beyond the loss: the log-softmax of the output layer at every decoder step
    (kept), the decoder's first step after each sentence end (and after a leading BOS), and, for
    each position where a sentence has ended but tokens that trail it follow (``."`` or ``.)``:
    the state after the ended sentence is not the state of any slot), one more backbone pass over
    that text with the partial sentence encoded in its slot.

    After token ``t`` of the current sentence ``S`` (the sentence so far), ``P_dec`` the
    Sentence Decoder's next step after ``S``, ``P(continue)`` the stop head's and ``P_next``
    the decoder's first step after ``S`` closed and appended to the backbone:

    * ``S`` not ended (no sentence end since its start) and shorter than ``max_sentence_len``:
      every token continues ``S``: ``P(v) = P_dec(v | S)``;
    * ``S`` ended (a sentence-end token, then only trailing tokens): a token that would trail
      it (closing quotes, brackets, punctuation, whitespace; see `trails_after`) continues
      ``S``: ``P(v) = P_dec(v | S)``; any other token starts the next sentence:
      ``P(v) = P_dec(end-of-sentence | S) * P(continue) * P_next(v)``;
    * ``S`` holds ``max_sentence_len`` tokens: every token starts the next sentence (the
      second form);
    * at a leading BOS (the start state): ``P(v) = P(continue) * P_next(v)``;
    * at a turn end (an EOS after text, see `SentenceLMModel.sentence_tokens`), the stop
      decision already taken: ``P(v) = P_next(v)`` from the state after the sentence it closed.

    The EOS id stands for the end of the turn or text (as `forward` reads it): once ``S`` has
    ended (or is full) it gets ``P_dec(end-of-sentence | S) * P(stop)``, the turn ending
    there, which is what ``nll`` charges for it; inside a sentence that has not ended it gets
    ``P_dec(end-of-sentence | S)`` (the stop decision after an unfinished sentence would need the
    backbone run on every prefix, so an EOS there leaves that decision out of the sum below).
    The scores are *not* renormalised:
    ``exp(logsumexp(logits[:, t]))`` is 1 inside a sentence and ``1`` minus the mass no next
    token can express after a sentence end: continuations the segmentation rules out (a word
    that would glue onto the ended sentence) and an empty next sentence. So the sum of
    ``-logits[t, token t + 1]`` over a text plus its end terms (the last sentence's end and
    the stop decision; the EOS score when the text ends with a closed sentence and an EOS)
    is ``nll`` (short of the stop decisions of EOS tokens after unfinished sentences); tools that ``log_softmax`` the logits (``lm_loss``, lm-evaluation-harness) get
    the distribution renormalised over the next tokens.
    """
    vae, base = model.sentence_vae, model.model
    packed, hidden = out.packed, out.last_hidden_state
    batch, seq_len = input_ids.shape
    device, eos = hidden.device, model.config.eos_token_id
    mask = attention_mask.bool()
    content, turn_ends = base.sentence_tokens(input_ids, mask)
    pending, full = boundary_states(input_ids, vae.boundary_table, vae.config.max_sentence_len, content, turn_ends)
    sentence, position = packed.token_sentence, packed.token_position
    in_text = sentence >= 0
    first_slot = packed.first_slots(hidden.shape[1])
    safe_sentence = sentence.clamp(min=0)
    # The positions computed (sorted, each once) and, per position, its column in `scores`.
    inverse = None
    if isinstance(positions, slice):
        columns = torch.arange(seq_len, device=device)
    else:
        columns, inverse = torch.unique(positions.to(device), sorted=True, return_inverse=True)
    wanted = torch.zeros(seq_len, dtype=torch.bool, device=device)
    wanted[columns] = True
    column_of = torch.full((seq_len,), -1, dtype=torch.long, device=device)
    column_of[columns] = torch.arange(len(columns), device=device)

    # P_dec(. | S): the decoder's step after token t in its sentence (its end step after the last).
    step_rows = step_index[safe_sentence, position + 1][:, columns]
    scores = step_log_probs[step_rows]  # a new tensor: edited in place below

    # The states after a closed S: at the sentence's own slot when S is a whole sentence of the
    # text, else (S ended but the text trails it) from S's tokens encoded and put in that slot.
    closing = in_text & (pending | full) & wanted
    whole = closing & (position + 1 == packed.lengths[safe_sentence])
    rows, cols = torch.nonzero(closing, as_tuple=True)
    sentences = sentence[rows, cols]
    slots = packed.sentence_slots(hidden.shape[1])[sentences]
    states = hidden[rows, slots]
    partial = ~whole[rows, cols]
    if bool(partial.any()):
        prefix_len = position[rows, cols][partial] + 1
        ids = packed.input_ids[sentences[partial]]
        prefix_mask = torch.arange(ids.shape[1], device=device) < prefix_len[:, None]
        vectors = vae.encode(ids, prefix_mask)
        inputs, slot_mask = base.slot_inputs(out.sentence_vectors, packed)
        hyp_rows, hyp_slots = rows[partial], slots[partial]
        hyp_inputs = inputs[hyp_rows].clone()
        hyp_inputs[torch.arange(len(hyp_rows), device=device), hyp_slots] = vectors.to(hyp_inputs.dtype)
        hyp_hidden = base.run_backbone(hyp_inputs, slot_mask[hyp_rows]).last_hidden_state
        states = states.clone()
        states[partial] = hyp_hidden[torch.arange(len(hyp_rows), device=device), hyp_slots]

    # The start state predicts the first token after a leading BOS; after a turn end, the state
    # after the sentence it closed (whose stop decision the EOS was) predicts the next sentence.
    first = torch.argmax(mask.long(), dim=1)
    batch_rows = torch.arange(batch, device=device)
    has_bos = mask[batch_rows, first] & ~content[batch_rows, first] & wanted[first]
    start_rows = batch_rows[has_bos]
    turn_rows, turn_cols = torch.nonzero(turn_ends & wanted, as_tuple=True)
    turn_sentences = sentence.cummax(dim=1).values[turn_rows, turn_cols]
    turn_states = hidden[turn_rows, packed.sentence_slots(hidden.shape[1])[turn_sentences]]
    all_states = torch.cat([states, hidden[start_rows, first_slot[start_rows]], turn_states])
    context = None
    window = vae.config.context_window
    if window:  # the next sentence reads the text up to and including the token scored from
        query_rows = torch.cat([rows, start_rows, turn_rows])
        query_ends = torch.cat([cols, first[start_rows], turn_cols]) + 1
        context = context_before(input_ids, mask, query_rows, query_ends, window)
    cont, first_step = next_sentence_scores(model, all_states, context)
    new_sentence = cont[:, None] + first_step
    at = column_of[cols]
    sentence_end = scores[rows, at, eos]
    keep = trails_after(vae.boundary_table, input_ids[rows, cols]) & ~full[rows, cols][:, None]
    closed = torch.where(keep, scores[rows, at], sentence_end[:, None] + new_sentence[: len(rows)])
    # The EOS id after a closed sentence is the turn (or text) ending there, as `forward` reads it.
    closed[:, eos] = sentence_end + F.log_softmax(model.stop_head(states).float(), dim=-1)[:, STOP]
    scores[rows, at] = closed
    scores[start_rows, column_of[first[start_rows]]] = new_sentence[len(rows) : len(rows) + len(start_rows)]
    scores[turn_rows, column_of[turn_cols]] = first_step[len(rows) + len(start_rows) :]
    scored = in_text | turn_ends
    scored[start_rows, first[start_rows]] = True
    scores[~scored[:, columns]] = 0.0  # padding: no prediction
    return scores if inverse is None else scores[:, inverse]

def next_sentence_scores(
    model, states: torch.Tensor, context: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log P(continue), log P_next(v))`` from backbone states ``(n, hidden)``: ``(n,)`` the
    stop head's decision to go on and ``(n, vocab)`` the Sentence Decoder's first step of the
    next sentence (after ``context``, the text before it, with a context window)."""
    cont = F.log_softmax(model.stop_head(states).float(), dim=-1)[:, CONTINUE]
    # One masked padding token after BOS: the decoder's step at BOS is causal, so it is the first step.
    pad = torch.full((states.shape[0], 1), model.config.pad_token_id, dtype=torch.long, device=states.device)
    vae = model.sentence_vae
    first_step = vae.teacher_forced_states(pad, torch.zeros_like(pad, dtype=torch.bool), states, context=context)[:, 0]
    return cont, F.log_softmax(vae.lm_head(first_step).float(), dim=-1)
