"""SentenceOPTForCausalLM: training loss, causal logits, generate() and its fast paths."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_weights
from transformers import LogitsProcessorList, OPTConfig, OPTForCausalLM, TemperatureLogitsWarper

from sentence_lm import SentenceOPTConfig, SentenceOPTForCausalLM, SentenceVAEConfig, SentenceVAEModel
from sentence_lm.segmentation import ENDS

VOCAB, PAD, BOS, PERIOD = 64, 1, 2, 10


def tiny_config(**overrides) -> SentenceOPTConfig:
    vae = dict(
        vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, ffn_dim=64, max_sentence_len=6, dropout=0.0
    )
    fields = dict(
        hidden_size=32, num_attention_heads=4, ffn_dim=64, num_hidden_layers=2, max_position_embeddings=12, dropout=0.0
    )
    fields.update(overrides)
    return SentenceOPTConfig(sentence_vae=vae, **fields)


def tiny_model(**overrides) -> SentenceOPTForCausalLM:
    torch.manual_seed(0)
    model = SentenceOPTForCausalLM(tiny_config(**overrides)).eval()
    table = torch.zeros(VOCAB, dtype=torch.uint8)
    table[PERIOD] = ENDS
    model.sentence_vae.set_boundary_table(table)
    with torch.no_grad():  # random weights would often stop at once; make texts run on
        model.stop_head.bias.copy_(torch.tensor([4.0, -4.0]))
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


PROMPTS = [
    [BOS, 5, 6, PERIOD, 7, 8, 9, PERIOD],
    [BOS, 11, PERIOD],
    [BOS, 12, 13, 14, PERIOD, 15, 16],  # ends mid-sentence
]


# ---------------------------------------------------------------------------------- forward
def test_forward_loss_is_whole_text_nll_per_token(model):
    ids, mask = left_pad(PROMPTS)
    out = model(ids, attention_mask=mask, labels=ids)
    assert out.logits.shape == (3, ids.shape[1], VOCAB)
    assert torch.equal(out.num_tokens, torch.tensor([len(p) - 1 for p in PROMPTS]))
    torch.testing.assert_close(out.loss, out.nll.sum() / out.num_tokens.sum())
    labels = torch.where(mask.bool(), ids, -100)
    expected = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    out = model(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.lm_loss, expected)
    assert out.lm_loss < out.loss  # aligned CE leaves out end-of-sentence and stop terms


def test_forward_rows_are_independent_of_batch_and_padding_side(model):
    ids, mask = left_pad(PROMPTS)
    batched = model(ids, attention_mask=mask)
    right = torch.stack([torch.roll(r, -int((m == 0).sum())) for r, m in zip(ids, mask)])
    right_mask = torch.stack([torch.roll(m, -int((m == 0).sum())) for m in mask])
    torch.testing.assert_close(model(right, attention_mask=right_mask).nll, batched.nll)
    for i, prompt in enumerate(PROMPTS):
        alone = model(torch.tensor([prompt]))
        torch.testing.assert_close(alone.nll[0], batched.nll[i], rtol=1e-5, atol=1e-5)


def test_causal_logits_match_a_reference_built_sentence_by_sentence(model):
    """The scores of [BOS, 5, 6, ., 7, 8, 9, .] (every token after `.` starts a new sentence here)
    assembled from the model's parts: the decoder's steps inside a sentence; after a sentence
    end, end-of-sentence x continue x the next sentence's first step, and for the EOS id
    end-of-sentence x stop (tests/test_causal_scores.py checks the general properties)."""
    prompt = torch.tensor([PROMPTS[0]])
    out = model(prompt)
    vae = model.sentence_vae
    sentences = [[5, 6, PERIOD], [7, 8, 9, PERIOD]]
    hidden = model.model(prompt).last_hidden_state[0]  # slots: start, s0, s1
    steps = [
        F.log_softmax(
            vae.teacher_forced_logits(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.bool), hidden[i : i + 1])[0], -1
        )
        for i, s in enumerate(sentences)
    ]
    first = F.log_softmax(vae.teacher_forced_logits(torch.tensor([[PAD]]), torch.zeros(1, 1, dtype=torch.bool), hidden[2:3])[0, 0], -1)
    cont, stop = F.log_softmax(model.stop_head(hidden), -1).unbind(-1)
    eos = model.config.eos_token_id

    def after_end(sentence_end, slot, next_first):
        """After a sentence end: it ends and the text goes on with the next sentence's first
        token, or (the EOS id) it ends and the text ends there."""
        scores = sentence_end + cont[slot] + next_first
        scores[eos] = sentence_end + stop[slot]
        return scores

    expected = [
        cont[0] + steps[0][0],  # BOS: a sentence follows, and its first token
        steps[0][1],
        steps[0][2],
        after_end(steps[0][3, eos], 1, steps[1][0]),  # after "."
        steps[1][1],
        steps[1][2],
        steps[1][3],
        after_end(steps[1][4, eos], 2, first),  # after the last ".": the same, from the last slot
    ]
    torch.testing.assert_close(out.logits[0], torch.stack(expected), rtol=1e-5, atol=1e-5)


def test_training_steps_lower_the_loss():
    model = tiny_model().train()
    ids, mask = left_pad(PROMPTS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(ids, attention_mask=mask).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_bf16_forward_and_generate_run():
    model = tiny_model().to(torch.bfloat16)
    ids, mask = left_pad(PROMPTS)
    assert torch.isfinite(model(ids, attention_mask=mask).loss)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8)
    assert out.shape[0] == 3


# ---------------------------------------------------------------------------------- generate
def new_tokens(model, prompts, **kwargs):
    ids, mask = left_pad(prompts)
    out = model.generate(ids, attention_mask=mask, **kwargs)
    copies = kwargs.get("num_return_sequences", 1)
    assert torch.equal(out[:, : ids.shape[1]], ids.repeat_interleave(copies, 0))  # prompts come back unchanged
    return out[:, ids.shape[1] :]


def test_cached_generation_equals_no_cache_reference(model):
    fast = new_tokens(model, PROMPTS, max_new_tokens=20)
    slow = new_tokens(model, PROMPTS, max_new_tokens=20, use_cache=False)
    assert fast.shape[1] > 0
    assert torch.equal(fast, slow)


def test_greedy_batch_equals_each_prompt_alone(model):
    batched = new_tokens(model, PROMPTS, max_new_tokens=20)
    for i, prompt in enumerate(PROMPTS):
        alone = new_tokens(model, [prompt], max_new_tokens=20)[0]
        row = batched[i, : alone.shape[0]]
        assert torch.equal(row, alone)
        assert bool((batched[i, alone.shape[0] :] == PAD).all())


def test_sampling_is_reproducible_with_a_seed(model):
    torch.manual_seed(123)
    a = new_tokens(model, PROMPTS, max_new_tokens=16, do_sample=True, top_k=20, temperature=0.8)
    torch.manual_seed(123)
    b = new_tokens(model, PROMPTS, max_new_tokens=16, do_sample=True, top_k=20, temperature=0.8)
    assert torch.equal(a, b)
    c = new_tokens(model, PROMPTS[:1], max_new_tokens=16, do_sample=True, num_return_sequences=4)
    assert c.shape[0] == 4


def test_max_new_tokens_is_an_exact_budget_and_eos_never_returned(model):
    for budget in (1, 5, 13):
        out = new_tokens(model, PROMPTS, max_new_tokens=budget, min_new_tokens=budget)
        assert out.shape[1] == budget
        assert bool((out != PAD).all())
    out = new_tokens(model, PROMPTS, max_new_tokens=30)
    assert not bool((out == model.config.eos_token_id).any())
    assert bool((out < VOCAB).all()) and bool((out >= 0).all())


def test_open_prompt_is_continued_by_the_sentence_decoder(model):
    prompt = PROMPTS[2]  # its last sentence [15, 16] is unfinished
    out = new_tokens(model, [prompt], max_new_tokens=20)[0]
    closed = torch.tensor([prompt[:5]])
    state = model.model(closed).last_hidden_state[:, -1]
    expected = model.sentence_vae.decode(state, prefix_ids=torch.tensor([[15, 16]]))
    first = expected.sequences[0, : int(expected.lengths[0])]
    assert first.numel() > 0
    assert torch.equal(out[: first.numel()], first)


def test_empty_prompt_generates_from_the_start_state(model):
    out = model.generate(max_new_tokens=6, min_new_tokens=6)
    assert out.shape == (1, 6)
    empty = model.generate(torch.zeros(2, 0, dtype=torch.long), max_new_tokens=4, min_new_tokens=4)
    assert empty.shape == (2, 4)


def test_streamer_sees_the_text_as_it_is_produced(model):
    class Recorder:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.ended = True

    streamer = Recorder()
    out = model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=15, min_new_tokens=15, streamer=streamer)
    assert streamer.ended and len(streamer.chunks) >= 2
    assert sum(streamer.chunks, []) == out[0].tolist()


def test_logits_processor_is_applied(model):
    ids, mask = left_pad(PROMPTS)
    hot = LogitsProcessorList([TemperatureLogitsWarper(1e-4)])
    torch.manual_seed(0)
    sampled = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, logits_processor=hot)
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=10)
    assert torch.equal(sampled, greedy)  # near-zero temperature sampling is greedy


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(max_new_tokens=0), "max_new_tokens"),  # as transformers' own generate()
        (dict(max_new_tokens=4, num_return_sequences=2), "do_sample"),
        (dict(max_new_tokens=4, do_sample=True, temperature=-1.0), "temperature"),
        (dict(max_new_tokens=4, do_sample=True, top_p=1.5), "top_p"),
        (dict(max_new_tokens=4, attention_mask=torch.ones(2, 3)), "attention_mask"),
        (dict(max_new_tokens=4, bogus_argument=1), "bogus_argument"),
    ],
)
def test_bad_generation_arguments_are_named(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.generate(torch.tensor([PROMPTS[0]]), **kwargs)


def test_streamer_with_a_batch_is_refused(model):
    ids, mask = left_pad(PROMPTS)
    with pytest.raises(ValueError, match="streamer"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, streamer=object())


def test_prompt_longer_than_the_sentence_positions_is_refused(model):
    prompt = [BOS] + [5, PERIOD] * model.config.max_position_embeddings
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(torch.tensor([prompt]), max_new_tokens=4)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.tensor([prompt]))


def test_generation_stops_when_sentence_slots_are_full(model):
    prompt = [BOS] + [5, PERIOD] * (model.config.max_position_embeddings - 3)
    out = new_tokens(model, [prompt], max_new_tokens=100)
    assert 0 < out.shape[1] < 100


def test_forward_rejects_rows_without_text(model):
    ids = torch.tensor([[PAD, PAD, BOS], [BOS, 5, PERIOD]])
    with pytest.raises(ValueError, match="no text token"):
        model(ids, attention_mask=(ids != PAD).long())


# ---------------------------------------------------------------------------------- from_opt
def tiny_opt(hidden=32) -> OPTForCausalLM:
    torch.manual_seed(1)
    config = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=64,
        max_position_embeddings=12,
        word_embed_proj_dim=hidden,
    )
    return OPTForCausalLM(config)


def test_from_opt_copies_backbone_and_embeddings(tmp_path):
    opt = tiny_opt()
    opt.save_pretrained(tmp_path / "opt")
    model = SentenceOPTForCausalLM.from_opt(tmp_path / "opt")
    decoder = opt.model.decoder
    def backbone_part(state):
        return {k: v for k, v in state.items() if k.startswith(("layers.", "embed_positions.", "final_layer_norm."))}

    assert_same_weights(backbone_part(model.model.backbone.decoder.state_dict()), backbone_part(decoder.state_dict()), close=True)
    torch.testing.assert_close(model.get_input_embeddings().weight, decoder.embed_tokens.weight)
    assert model.config.backbone.num_hidden_layers == 2 and model.config.sentence_vae.vocab_size == VOCAB


def test_from_opt_with_a_trained_vae_of_another_width_is_refused():
    vae = SentenceVAEModel(SentenceVAEConfig(vocab_size=VOCAB, hidden_size=16, num_attention_heads=4, ffn_dim=32))
    with pytest.raises(ValueError, match="hidden_size"):
        SentenceOPTForCausalLM.from_opt(tiny_opt(), sentence_vae=vae)


def test_config_refuses_a_vae_of_another_width():
    with pytest.raises(ValueError, match="hidden_size"):
        SentenceOPTConfig(hidden_size=32, num_attention_heads=4, sentence_vae=dict(hidden_size=16, num_attention_heads=4))
