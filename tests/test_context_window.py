"""The Sentence Decoder's context window (issue 30, lever 3): each sentence is written after the
last ``context_window`` tokens of the text before it. Teacher forcing and generation read the same
context, so generation's logits are the teacher-forced ones on the text it wrote."""

from __future__ import annotations

import pytest
import torch
from helpers import encode, tiny_sentence_opt
from transformers import LogitsProcessor, LogitsProcessorList

from sentence_lm import SentenceVAEConfig
from sentence_lm.decoding import context_before, context_start
from sentence_lm.modeling_sentence_lm import states_before_sentences
from sentence_lm.segmentation import ENDS, TRAILS



class NoSentenceEnds(LogitsProcessor):
    """Bans the end-of-sentence token and every token that ends or trails a sentence, so that each
    sentence runs to ``max_sentence_len`` and the written text segments where generation cut it."""

    def __init__(self, banned: torch.Tensor):
        self.banned = banned

    def __call__(self, input_ids, scores):
        return scores.masked_fill(self.banned, float("-inf"))


@pytest.fixture(scope="module", params=[("learned", 5), ("rotary", 5), ("learned", 1)], ids=lambda p: f"{p[0]}-{p[1]}")
def model(tokenizer, request):
    """Windows of 5 tokens (4 context columns and the first input) and of 1 (the first input only)."""
    positions, window = request.param
    vae = dict(context_window=window, num_decoder_layers=2, position_embedding=positions)
    return tiny_sentence_opt(tokenizer, sentence_vae=vae)


def test_context_before_takes_the_last_real_tokens():
    ids = torch.tensor([[9, 1, 2, 9, 3, 4], [5, 6, 7, 8, 9, 9]])
    mask = torch.tensor([[0, 1, 1, 0, 1, 1], [1, 1, 1, 1, 0, 0]])
    got, valid = context_before(ids, mask, torch.tensor([0, 0, 1, 1]), torch.tensor([5, 1, 3, 6]), 3)
    assert got.tolist() == [[1, 2, 3], [0, 0, 0], [5, 6, 7], [6, 7, 8]]
    assert valid.tolist() == [[True] * 3, [False] * 3, [True] * 3, [True] * 3]


def test_the_contexts_last_token_is_the_first_input():
    ids = torch.tensor([[0, 1, 2], [0, 0, 7], [0, 0, 0]])
    valid = torch.tensor([[False, True, True], [False, False, True], [False, False, False]])
    (columns, kept), start = context_start((ids, valid), bos_token_id=99)
    assert start.tolist() == [2, 7, 99]
    assert columns.tolist() == [[0, 1], [0, 0], [0, 0]]  # the tokens before the first input, no dead column
    assert kept.tolist() == [[False, True], [False, False], [False, False]]


def test_the_decoder_reads_the_context(model):
    vae = model.sentence_vae
    ids = torch.tensor([[20, 21, 22, 23]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    vector = torch.randn(1, model.config.hidden_size)
    window = vae.config.context_window
    context = (30 + torch.arange(window)[None, :], torch.ones(1, window, dtype=torch.bool))
    other = (torch.cat([context[0][:, :-1], torch.tensor([[40]])], dim=1), context[1])
    with torch.no_grad():
        states = vae.teacher_forced_states(ids, mask, vector, context=context)
        assert not torch.allclose(states, vae.teacher_forced_states(ids, mask, vector, context=other))
        assert not torch.allclose(states, vae.teacher_forced_states(ids, mask, vector))
        if window == 1:
            return
        # A context slot that is masked out is not read.
        hidden = (context[0], torch.arange(window)[None, :] > 0)
        changed = (torch.cat([torch.tensor([[40]]), context[0][:, 1:]], dim=1), hidden[1])
        torch.testing.assert_close(vae.teacher_forced_states(ids, mask, vector, context=hidden),
                                   vae.teacher_forced_states(ids, mask, vector, context=changed))  # fmt: skip


def assert_generation_is_teacher_forced(model, inputs, out, new: int) -> object:
    """Every new token's raw generation logits (``out.logits``) equal the teacher-forced decoder's
    on the generated text (the backbone's states and each sentence's context read from that
    text); the text's `PackedSentences`."""
    sequences, prompt_len = out.sequences, inputs["input_ids"].shape[1]
    mask = torch.cat([inputs["attention_mask"], torch.ones(len(sequences), new, dtype=torch.long)], dim=1).bool()
    with torch.no_grad():
        base = model.model(sequences, mask)
        packed = base.packed
        memory = states_before_sentences(base.last_hidden_state, packed)
        context = model.sentence_context(sequences, mask, packed)
        vae = model.sentence_vae
        forced = vae.lm_head(vae.teacher_forced_states(packed.input_ids, packed.attention_mask, memory, context=context))
    assert len(out.logits) == new
    for row in range(len(sequences)):
        for k in range(new):
            column = prompt_len + k
            sentence, position = packed.token_sentence[row, column], packed.token_position[row, column]
            torch.testing.assert_close(out.logits[k][row], forced[sentence, position], atol=2e-4, rtol=1e-4)
    return packed


def test_generation_writes_what_teacher_forcing_scores(model, tokenizer):
    """Greedy generation's raw logits at every new token equal the teacher-forced decoder's on the
    generated text (the backbone's states and each sentence's context read from that text), for
    a closed prompt and one whose last sentence the decoder continues."""
    table = model.sentence_vae.boundary_table
    banned = ((table & (ENDS | TRAILS)) > 0)[None, :].clone()
    banned[0, model.config.eos_token_id] = True
    inputs = encode(tokenizer, ["The value is returned.", "A list of"])
    with torch.no_grad():
        out = model.generate(
            inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=40, min_new_tokens=40,
            logits_processor=LogitsProcessorList([NoSentenceEnds(banned)]), return_dict_in_generate=True,
            output_logits=True,
        )  # fmt: skip
    assert_generation_is_teacher_forced(model, inputs, out, 40)


def test_the_window_is_checked_and_saved(model, tmp_path):
    with pytest.raises(ValueError, match="context_window"):
        SentenceVAEConfig(context_window=-1)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    window = model.config.sentence_vae.context_window
    assert loaded.config.sentence_vae.context_window == window
    saved = model.sentence_vae.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in loaded.sentence_vae.state_dict().items())
    # One learned row per context column (the last token is the first input); rotary positions need none.
    context_table = model.sentence_vae.decoder.embed_positions.context
    if model.config.sentence_vae.position_embedding == "rotary" or window == 1:
        assert context_table is None
    else:
        assert context_table.num_embeddings == window - 1
    with pytest.raises(ValueError, match="context_window"):
        model.generate(torch.tensor([[2, 20, 21]]), max_new_tokens=2, cache_implementation="static")


def test_causal_scores_read_the_same_context(model, tokenizer):
    """The token scores of a text that ends with a closed sentence and the EOS add up to its NLL:
    every sentence's first token is scored by the decoder's first step after the context that
    teacher forcing gives it (a text, and the same text after a turn end)."""
    text = "The value is returned. A list is kept here, and then. It ends."
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    eos = torch.tensor([[model.config.eos_token_id]])
    for sequence in (torch.cat([ids, eos], dim=1), torch.cat([ids, eos, ids[:, 1:], eos], dim=1)):
        with torch.no_grad():
            out = model(sequence)
        causal = -out.logits[0, :-1].gather(1, sequence[0, 1:, None]).sum()
        torch.testing.assert_close(causal, out.nll[0], atol=1e-3, rtol=1e-5)


def test_the_next_sentence_reads_the_prompts_unfinished_sentence(model, tokenizer):
    """A prompt that ends inside a sentence ("A list of"), which generation closes at once ("."):
    the next sentence's context holds the prompt's unfinished part and its ending, as teacher
    forcing reads them from the text."""
    table = model.sentence_vae.boundary_table
    banned = ((table & (ENDS | TRAILS)) > 0).clone()
    banned[model.config.eos_token_id] = True
    dot, eos = tokenizer.convert_tokens_to_ids("."), model.config.eos_token_id
    inputs = encode(tokenizer, ["The value is returned.", "A list of"])
    prompt_len = inputs["input_ids"].shape[1]

    class CloseAtOnce(LogitsProcessor):
        """Row 1 writes "." and ends its sentence; afterwards no row ends one (max_sentence_len cuts)."""

        def __call__(self, input_ids, scores):
            scores = scores.masked_fill(banned, float("-inf"))
            written = input_ids.shape[1] - prompt_len
            if written < 2:
                scores[1] = float("-inf")
                scores[1, dot if written == 0 else eos] = 0.0
            return scores

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, min_new_tokens=20, return_dict_in_generate=True,
                             output_logits=True, logits_processor=LogitsProcessorList([CloseAtOnce()]))  # fmt: skip
    assert out.sequences[1, prompt_len] == dot
    packed = assert_generation_is_teacher_forced(model, inputs, out, 20)
    assert int(packed.token_sentence[1, prompt_len + 1]) != int(packed.token_sentence[1, prompt_len])  # "." closed it


def test_the_rows_runtime_writes_the_reference_loops_text(model, tokenizer):
    """The row-scheduled runtime feeds each new sentence's context into the decoder cache as the
    row starts it: the text is the reference loop's (``use_cache=False``), row by row as alone,
    with sentences of different lengths ending at different steps."""
    prompts = ["The value is returned.", "A list of", "Each argument of the call is evaluated. It"]
    inputs = encode(tokenizer, prompts)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=30, return_dict_in_generate=True)
        reference = model.generate(**inputs, max_new_tokens=30, use_cache=False)
        assert torch.equal(out.sequences, reference)
        assert len(set(out.num_sentences.tolist())) > 1 or int(out.num_sentences.max()) > 1
        for row, prompt in enumerate(prompts):
            single = encode(tokenizer, [prompt])
            alone = model.generate(**single, max_new_tokens=30)[0, single["input_ids"].shape[1] :]
            in_batch = out.sequences[row, inputs["input_ids"].shape[1] :]
            assert torch.equal(in_batch[: len(alone)], alone)
    with pytest.raises(ValueError, match="context window"):
        model.generate(**inputs, max_new_tokens=4, draft_tokens=2)
