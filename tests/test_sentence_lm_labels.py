"""Labels mean what they mean for every causal LM: -100 keeps a token (and the sentence-level
decisions after it) out of the loss, `shift_labels` and `num_items_in_batch` work as in
`transformers` (the Trainer's gradient accumulation included), a trailing EOS is the end of the
text, and bad labels are refused by name."""

import pytest
import torch
from helpers import assert_same_weights
from transformers import LlamaConfig

from sentence_lm import SentenceLMConfig, SentenceLMForCausalLM
from sentence_lm.decoding import CONTINUE, STOP

VOCAB, PAD, BOS, EOS, PERIOD = 48, 0, 1, 2, 10


@pytest.fixture(scope="module")
def model():
    return build_model()


def build_model() -> SentenceLMForCausalLM:
    """A tiny random SentenceLM (BOS 1, EOS 2, PERIOD ends a sentence), in eval mode."""
    torch.manual_seed(0)
    config = SentenceLMConfig(
        backbone=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=16),
        sentence_vae=dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, ffn_dim=64, max_sentence_len=8,
                          pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, dropout=0.0),
    )  # fmt: skip
    model = SentenceLMForCausalLM(config).eval()
    table = torch.zeros(VOCAB, dtype=torch.uint8)
    table[PERIOD] = 1
    model.sentence_vae.set_boundary_table(table)
    return model


# Two texts, right-padded: [BOS, prompt sentence(s) | completion sentences].
IDS = torch.tensor(
    [
        [BOS, 5, 6, PERIOD, 7, 8, PERIOD, 9, PERIOD, PAD],
        [BOS, 11, PERIOD, 12, 13, 14, PERIOD, 15, 16, PERIOD],
    ]
)
MASK = (torch.arange(IDS.shape[1]) < torch.tensor([[9], [10]])).long()
PROMPT_END = [3, 2]  # index of the last prompt token per row (a sentence end)


def masked_labels() -> torch.Tensor:
    labels = IDS.masked_fill(MASK == 0, -100)
    for row, end in enumerate(PROMPT_END):
        labels[row, : end + 1] = -100
    return labels


def test_full_labels_give_the_whole_text_loss(model):
    plain = model(IDS, attention_mask=MASK)
    full = model(IDS, attention_mask=MASK, labels=IDS.masked_fill(MASK == 0, -100))
    torch.testing.assert_close(full.loss, plain.loss)
    torch.testing.assert_close(full.loss, plain.nll.sum() / plain.num_tokens.sum())


def test_shift_labels_equal_labels(model):
    labels = masked_labels()
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    a = model(IDS, attention_mask=MASK, labels=labels)
    b = model(IDS, attention_mask=MASK, shift_labels=shifted)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.lm_loss, b.lm_loss)


def test_a_masked_prompt_gets_no_gradient_and_the_completion_does(model):
    captured = {}

    def keep(name):
        def hook(module, args, output):  # the first call: the teacher-forced steps and the stop decisions
            if name not in captured:
                output.retain_grad()
                captured[name] = output

        return hook

    handles = [model.stop_head.register_forward_hook(keep("stop")), model.sentence_vae.lm_head.register_forward_hook(keep("steps"))]
    try:
        out = model(IDS, attention_mask=MASK, labels=masked_labels())
        out.loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    # Stop decisions: slots [start, after s0, after s1, after s2] (both rows have 3 sentences,
    # the first one the prompt).
    stop_grad = captured["stop"].grad.abs().sum(-1)
    assert torch.all(stop_grad[0, :2] == 0) and torch.all(stop_grad[0, 2:] > 0)  # start, after prompt: not counted
    assert torch.all(stop_grad[1, :2] == 0) and torch.all(stop_grad[1, 2:] > 0)
    # Decoder steps of packed sentences in order (row 0: s0..s2, row 1: s0..s2); a prompt sentence's
    # steps (tokens and end of sentence) get no gradient, a completion sentence's all do.
    step_grad = captured["steps"].grad.abs().sum(-1)
    steps_per_sentence = [4, 4, 3, 3, 5, 4]  # tokens + end of sentence
    prompt = [True, False, False, True, False, False]
    chunks = step_grad.split(steps_per_sentence)
    for chunk, is_prompt in zip(chunks, prompt):
        assert bool((chunk == 0).all()) if is_prompt else bool((chunk > 0).all())
    # The loss is normalised by the labelled tokens (completion tokens only).
    labelled = int((masked_labels()[:, 1:] != -100).sum())
    assert labelled == 5 + 7
    torch.testing.assert_close(out.loss * labelled, _counted_sum(model))
    assert out.nll.shape == (2,)  # nll stays the whole-text figure


def test_gradient_accumulation_normalises_like_the_full_batch(model):
    labels = masked_labels()
    items = int((labels[:, 1:] != -100).sum())
    full = model(IDS, attention_mask=MASK, labels=labels)
    parts = [
        model(IDS[i : i + 1], attention_mask=MASK[i : i + 1], labels=labels[i : i + 1], num_items_in_batch=items).loss
        for i in range(2)
    ]
    torch.testing.assert_close(sum(parts), full.loss)


def test_trainer_with_gradient_accumulation_takes_the_full_batch_step(tmp_path):
    """The Trainer over both texts in one batch, or one text at a time with two accumulation
    steps, logs the same loss and makes the same update (SGD: the step is the gradient)."""
    from transformers import Trainer, TrainingArguments

    labels = masked_labels()
    rows = [{"input_ids": IDS[i], "attention_mask": MASK[i], "labels": labels[i]} for i in range(2)]
    with torch.no_grad():
        expected_loss = build_model()(IDS, attention_mask=MASK, labels=labels).loss.item()
    runs = {}
    for batch_size, accumulation in ((2, 1), (1, 2)):
        model = build_model().train()
        args = TrainingArguments(
            output_dir=str(tmp_path / f"ga{accumulation}"), per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", learning_rate=1.0, logging_steps=1,
            report_to=[], save_strategy="no", use_cpu=True, seed=0,
        )  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        runs[accumulation] = ([log["loss"] for log in trainer.state.log_history if "loss" in log], model)
    (full_log, full), (accumulated_log, accumulated) = runs[1], runs[2]
    assert full_log == pytest.approx([expected_loss], rel=1e-4)
    assert accumulated_log == pytest.approx(full_log, rel=1e-4)
    assert_same_weights(dict(full.named_parameters()), dict(accumulated.named_parameters()), rtol=1e-4, atol=1e-5)
    start = dict(build_model().named_parameters())
    assert start.keys() == dict(full.named_parameters()).keys()
    assert any(not torch.equal(p, start[name]) for name, p in full.named_parameters())  # the step moved weights


TEXT = [BOS, 5, 6, PERIOD, 7, 8, PERIOD]


def test_a_trailing_eos_is_the_end_of_the_text(model):
    """TRL appends the EOS to every completion: read as the end of the text, not as a
    one-token sentence; its label keeps the end terms and counts as one item."""
    plain, with_eos = torch.tensor([TEXT]), torch.tensor([TEXT + [EOS]])
    with torch.no_grad():
        a, b = model(plain), model(with_eos)
        torch.testing.assert_close(b.nll, a.nll)
        assert b.num_tokens.tolist() == a.num_tokens.tolist() == [len(TEXT) - 1]
        torch.testing.assert_close(b.logits[:, : len(TEXT)], a.logits)
        # After the end, the scores of whatever follows (a next turn): the decoder's first step of a
        # next sentence, a distribution of its own (the stop decision was the EOS's).
        torch.testing.assert_close(b.logits[0, len(TEXT)].logsumexp(-1), torch.tensor(0.0))
        # Labelled: the same terms, one more item (the Trainer counts the EOS label too).
        n = len(TEXT) - 1
        torch.testing.assert_close(model(with_eos, labels=with_eos).loss * (n + 1), model(plain, labels=plain).loss * n)
        # Only the EOS labelled: the last sentence's end and the final stop, i.e. what labelling
        # the last token alone counts, less that token's own term (the decoder's step inside "7 8").
        only_eos = torch.full_like(with_eos, -100)
        only_eos[0, -1] = EOS
        only_last = torch.full_like(plain, -100)
        only_last[0, -1] = PERIOD
        token_term = -a.logits[0, -2, PERIOD]
        torch.testing.assert_close(
            model(with_eos, labels=only_eos).loss, model(plain, labels=only_last).loss - token_term
        )
        # Left and right padding: the text's last real token is the one read as its end.
        pad = [PAD, PAD]
        batch = torch.tensor([pad + TEXT + [EOS], TEXT + [EOS] + pad])
        mask = torch.tensor([[0, 0] + [1] * (len(TEXT) + 1), [1] * (len(TEXT) + 1) + [0, 0]])
        torch.testing.assert_close(model(batch, attention_mask=mask).nll, a.nll.repeat(2))


def test_an_eos_after_text_ends_a_turn_and_the_text_goes_on(model):
    """A chat's end of turn: the EOS closes the sentence before it (its stop decision is "stop"),
    the text goes on with the next turn, and the causal scores add up to ``nll``."""
    ids = torch.tensor([[BOS, 5, PERIOD, EOS, 6, PERIOD, EOS]])
    with torch.no_grad():
        out = model(ids)
        assert out.num_tokens.tolist() == [4] and out.num_sentences.tolist() == [2]
        # EOS after a closed sentence: its end and "stop"; the token after the EOS: the next sentence's
        # first step alone; the final EOS: the last end and the final stop. Together: nll.
        causal = -out.logits[0, :-1].gather(1, ids[0, 1:, None]).sum()
        torch.testing.assert_close(causal, out.nll[0])
        # The stop decision after "5 ." is charged as "stop": the same text without the first EOS
        # differs by exactly its two decisions there.
        merged = model(torch.tensor([[BOS, 5, PERIOD, 6, PERIOD, EOS]]))
        log_probs = torch.log_softmax(model.stop_head(model.model(ids).last_hidden_state[0, 1]).float(), dim=-1)
        torch.testing.assert_close(out.nll - merged.nll, (log_probs[CONTINUE] - log_probs[STOP])[None])
        # An EOS with no text before it (the text's only token, or right after another EOS) is a token.
        alone = model(torch.tensor([[BOS, EOS]]))
        twice = model(torch.tensor([[BOS, 5, EOS, EOS, 6, PERIOD]]))
    assert alone.num_tokens.tolist() == [1] and torch.isfinite(alone.nll).all()
    assert twice.num_tokens.tolist() == [4]


def test_bad_labels_are_refused(model):
    labels = masked_labels()
    with pytest.raises(ValueError, match="labels has shape"):
        model(IDS, attention_mask=MASK, labels=labels[:, :-1])
    with pytest.raises(TypeError, match="must hold integer token ids"):
        model(IDS, attention_mask=MASK, labels=labels.float())
    with pytest.raises(ValueError, match="not both"):
        model(IDS, attention_mask=MASK, labels=labels, shift_labels=labels)
    other = labels.clone()
    other[0, 5] = 30
    with pytest.raises(ValueError, match="differ from input_ids where they are not -100"):
        model(IDS, attention_mask=MASK, labels=other)


def _counted_sum(model):
    """The counted terms summed another way: the whole-text NLL of each row minus the NLL of its
    prompt sentence (tokens and end of sentence, from a one-sentence text scored alone) and its
    first two stop decisions (start, after the prompt), read from the stop head directly."""
    import torch.nn.functional as F

    total = 0.0
    for row, end in enumerate(PROMPT_END):
        n = int(MASK[row].sum())
        whole = model(IDS[row : row + 1, :n])
        prompt_only = model(IDS[row : row + 1, : end + 1])
        # prompt_only.nll = prompt tokens + EOS + start decision + final stop after the prompt
        stop_logits = model.stop_head(model.model(IDS[row : row + 1, :n]).last_hidden_state).float()
        start, after_prompt = F.log_softmax(stop_logits[0, :2], dim=-1)[:, 0]
        alone_states = model.model(IDS[row : row + 1, : end + 1]).last_hidden_state
        alone = F.log_softmax(model.stop_head(alone_states).float()[0], dim=-1)
        prompt_sentence = prompt_only.nll[0] + alone[0, 0] + alone[1, 1]  # minus its start and final stop
        total = total + whole.nll[0] - prompt_sentence + start + after_prompt
    return total


def test_per_text_sums_of_the_loss_parts_add_up_to_the_means_and_to_each_text_alone(model):
    """`sentence_nll`, `end_nll` and `stop_nll` are per-text sums whose totals over their counts
    are the batch means, whose parts add up to `nll`, and which each text gets scored alone."""
    with torch.no_grad():
        both = model(IDS, attention_mask=MASK, logits_to_keep=torch.empty(0, dtype=torch.long))
        alone = [model(IDS[r : r + 1, : int(MASK[r].sum())]) for r in range(len(IDS))]
    assert both.num_sentences.tolist() == [3, 3]
    torch.testing.assert_close(both.sentence_nll + both.stop_nll, both.nll)
    targets = (both.num_tokens + both.num_sentences).sum()
    torch.testing.assert_close(both.sentence_nll.sum() / targets, both.sentence_loss)
    torch.testing.assert_close(both.end_nll.sum() / both.num_sentences.sum(), both.end_loss)
    torch.testing.assert_close(both.stop_nll.sum() / (both.num_sentences + 1).sum(), both.stop_loss)
    assert bool((both.end_nll > 0).all()) and bool((both.end_nll < both.sentence_nll).all())
    for name in ("sentence_nll", "end_nll", "stop_nll", "nll"):
        torch.testing.assert_close(getattr(both, name), torch.cat([getattr(a, name) for a in alone]))


def test_per_text_sums_of_packed_texts_add_up_per_row(model):
    """With texts packed into one row (position_ids restarting at 0) each per-text sum is the sum
    over the row's texts, as `nll` is."""
    first, second = IDS[0, : int(MASK[0].sum())], IDS[1]
    row = torch.cat([first, second])[None]
    positions = torch.cat([torch.arange(len(first)), torch.arange(len(second))])[None]
    with torch.no_grad():
        packed = model(row, position_ids=positions)
        apart = model(IDS, attention_mask=MASK)
    for name in ("sentence_nll", "end_nll", "stop_nll", "nll", "num_tokens", "num_sentences"):
        torch.testing.assert_close(getattr(packed, name), getattr(apart, name).sum(0, keepdim=True))
