"""Causal token scores: `logits[:, t]` depend on tokens 0..t only, marginalise the sentence
boundary instead of peeking at token t + 1, add up (with the end-of-text terms) to the model's
whole-text NLL, and do not change with padding or batch size."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig

from sentence_lm import SentenceLMConfig, SentenceLMForCausalLM
from sentence_lm.decoding import STOP
from sentence_lm.segmentation import ENDS, TRAILS

VOCAB, PAD, BOS, EOS = 48, 0, 1, 2
PERIOD, QUOTE, SPACE = 10, 11, 12  # a sentence end; a closing quote and a blank that trail it
MAX_LEN = 5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = SentenceLMConfig(
        backbone=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32),
        sentence_vae=dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, ffn_dim=64, max_sentence_len=MAX_LEN,
                          pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, dropout=0.0, init_std=0.2),
    )  # fmt: skip
    model = SentenceLMForCausalLM(config).eval()
    table = torch.zeros(VOCAB, dtype=torch.uint8)
    table[PERIOD] = ENDS | TRAILS
    table[QUOTE] = TRAILS
    table[SPACE] = TRAILS | 4 | 8  # BLANK | SPACE_END
    model.sentence_vae.set_boundary_table(table)
    return model


# Sentences end after PERIOD (and the QUOTE / SPACE trailing it), or after MAX_LEN tokens.
TEXT = [BOS, 5, 6, PERIOD, QUOTE, 7, 8, 9, 13, 14, 15, PERIOD, SPACE, 16, PERIOD]


def scores(model, ids, mask=None):
    with torch.no_grad():
        return model(torch.tensor(ids) if not torch.is_tensor(ids) else ids, attention_mask=mask)


def test_scores_at_t_do_not_depend_on_what_follows(model):
    full = scores(model, [TEXT]).logits[0]
    for t in range(1, len(TEXT) - 1):  # every prefix that holds a token after BOS
        prefix = scores(model, [TEXT[: t + 1]]).logits[0]
        torch.testing.assert_close(prefix, full[: t + 1], rtol=1e-5, atol=1e-5)
    # The same prefix followed by a trailing quote or by a new word scores position 3 the same.
    a = scores(model, [TEXT[:4] + [QUOTE]]).logits[0, 3]
    b = scores(model, [TEXT[:4] + [20]]).logits[0, 3]
    torch.testing.assert_close(a, b)


def test_token_scores_plus_end_terms_are_the_whole_text_nll(model):
    out = scores(model, [TEXT])
    token_nll = -out.logits[0, :-1].gather(1, torch.tensor(TEXT[1:])[:, None]).sum()
    # End terms, from the model's parts: the decoder's end of the last sentence, then stop.
    with torch.no_grad():
        base = model.model(torch.tensor([TEXT]))
        last = base.packed.input_ids[-1:, : int(base.packed.lengths[-1])]
        memory = base.last_hidden_state[:, -2]
        steps = model.sentence_vae.teacher_forced_logits(last, torch.ones_like(last, dtype=torch.bool), memory)
        end = -F.log_softmax(steps[0, -1].float(), dim=-1)[EOS]
        stop = -F.log_softmax(model.stop_head(base.last_hidden_state[:, -1]).float(), dim=-1)[0, STOP]
    torch.testing.assert_close(token_nll + end + stop, out.nll[0], rtol=1e-5, atol=1e-4)


def test_scores_are_subnormalised_and_mass_is_lost_only_after_a_sentence_end(model):
    logits = scores(model, [TEXT]).logits[0]
    mass = logits.logsumexp(-1).exp()
    assert torch.all(mass <= 1 + 1e-5) and torch.all(mass > 0)
    # Inside a sentence (after 5, 7, 8, 9, 13, 15, 16: nothing ended, not full) nothing is lost.
    inside = [1, 5, 6, 7, 8, 10, 13]
    torch.testing.assert_close(mass[inside], torch.ones(len(inside)), rtol=1e-5, atol=1e-5)
    # After a sentence end, a word can no longer join the sentence: mass is lost there.
    assert torch.all(mass[[3, 4, 11, 12]] < 1 - 1e-3)


def test_padding_and_batch_change_no_score(model):
    texts = [TEXT, [BOS, 7, PERIOD, QUOTE, 8], [BOS, 9, 13, 14, 15, 16, 17, 18]]
    width = max(map(len, texts))
    alone = [scores(model, [t]).logits[0] for t in texts]
    for side in ("left", "right"):
        ids, mask = [], []
        for t in texts:
            gap = width - len(t)
            ids.append([PAD] * gap + t if side == "left" else t + [PAD] * gap)
            mask.append([0] * gap + [1] * len(t) if side == "left" else [1] * len(t) + [0] * gap)
        batch = scores(model, torch.tensor(ids), torch.tensor(mask)).logits
        for row, (t, single) in enumerate(zip(texts, alone)):
            cols = slice(width - len(t), width) if side == "left" else slice(0, len(t))
            torch.testing.assert_close(batch[row, cols], single, rtol=1e-5, atol=1e-5)


def test_eos_after_a_closed_sentence_is_the_text_ending_there(model):
    """A trailing EOS (TRL's completions) is read as the end of the text; its score after a closed
    sentence is the end of that sentence times the stop decision, so the token scores of a text
    with its EOS add up to the text's whole NLL and `lm_loss` is its mean."""
    ids = torch.tensor([TEXT + [EOS]])
    with torch.no_grad():
        out = model(ids, labels=ids)
    next_tokens = ids[0, 1:]
    token_nll = -out.logits[0, :-1].gather(1, next_tokens[:, None]).squeeze(1)
    torch.testing.assert_close(token_nll.sum(), out.nll[0], rtol=1e-5, atol=1e-4)
    assert out.num_tokens[0] == len(TEXT) - 1  # the EOS is not a token of the text
    renormalised = -F.log_softmax(out.logits[0, :-1], dim=-1).gather(1, next_tokens[:, None]).mean()
    torch.testing.assert_close(out.lm_loss, renormalised)
    # The EOS score at a closed sentence's end is P(end of sentence) * P(stop), at every such position
    # (here after "5 6 ." and after its trailing quote), and depends on nothing that follows.
    with torch.no_grad():
        base = model.model(torch.tensor([TEXT[:5]]))
        first = base.packed.input_ids[:1, :4]  # 5 6 . "
        steps = model.sentence_vae.teacher_forced_logits(first, torch.ones_like(first, dtype=torch.bool), base.last_hidden_state[:, -2])
        stop = F.log_softmax(model.stop_head(base.last_hidden_state[:, -1]).float(), dim=-1)[0, STOP]
        end_after_quote = F.log_softmax(steps[0, 4].float(), dim=-1)[EOS]
    torch.testing.assert_close(out.logits[0, 4, EOS], end_after_quote + stop, rtol=1e-5, atol=1e-5)
    # Inside a sentence that has not ended, EOS keeps the decoder's end-of-sentence score.
    inside = scores(model, [TEXT]).logits[0]
    assert torch.equal(out.logits[0, 1], inside[1])


def test_texts_packed_with_position_ids_are_scored_each_on_its_own(model):
    """Padding-free packing (`DataCollatorWithFlattening`, TRL's packing=True): position_ids that
    restart at 0 start a new text, scored from the start state as if it were a row of its own."""
    from transformers import DataCollatorWithFlattening

    first, second = TEXT + [EOS], [BOS, 7, 8, PERIOD, QUOTE, 9, EOS]
    packed = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": first}, {"input_ids": second}])
    assert packed["position_ids"][0, len(first)] == 0  # the collator marks where the second text starts
    with torch.no_grad():
        out = model(packed["input_ids"], labels=packed["labels"], position_ids=packed["position_ids"])
        alone = [model(torch.tensor([t]), labels=torch.tensor([[-100] + t[1:]])) for t in (first, second)]
        ignored = model(packed["input_ids"])  # without position_ids: one text, EOS a token inside it
    torch.testing.assert_close(out.nll[0], alone[0].nll[0] + alone[1].nll[0])
    assert out.num_tokens[0] == alone[0].num_tokens[0] + alone[1].num_tokens[0]
    torch.testing.assert_close(out.logits[0, : len(first)], alone[0].logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits[0, len(first) :], alone[1].logits[0], rtol=1e-5, atol=1e-5)
    items = sum(len(t) - 1 for t in (first, second))  # labelled tokens, as the Trainer counts them
    sums = sum(a.loss * (len(t) - 1) for a, t in zip(alone, (first, second)))
    torch.testing.assert_close(out.loss, sums / items, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ignored.nll[0], out.nll[0])
    # Counting positions (no restart) change nothing; padding inside a packed row is refused.
    counting = torch.arange(len(first))[None]
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([first]), position_ids=counting).nll, alone[0].nll * 0 + model(torch.tensor([first])).nll)
    holes = torch.ones(1, len(first) + len(second), dtype=torch.long)
    holes[0, 3] = 0
    with pytest.raises(ValueError, match="padding between its tokens"):
        model(packed["input_ids"], attention_mask=holes, position_ids=packed["position_ids"])
    with pytest.raises(ValueError, match="packs several texts, which SentenceLMModel does not split"):
        model.model(packed["input_ids"], position_ids=packed["position_ids"])
    with pytest.raises(ValueError, match="position_ids has shape"):
        model(packed["input_ids"], position_ids=packed["position_ids"][:, 1:])
