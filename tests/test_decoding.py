"""The rules every decoding loop shares (sentence_lm.decoding) and the pieces the loops read
(the prompt split, the decoder's conditioning), against written-out references."""

import torch
from helpers import encode, tiny_sentence_opt

from sentence_lm.decoding import (
    CONTINUE,
    STOP,
    ban_empty_sentence,
    causal_key_mask,
    left_align,
    running_text,
    stop_decision,
)


def test_causal_key_mask_is_the_written_out_mask():
    key_valid = torch.tensor([[True, True, True, True, True], [False, False, True, True, True]])
    columns = torch.tensor([[3, 4], [2, 4]])
    mask = causal_key_mask(columns, 5, key_valid)
    assert mask.shape == (2, 1, 2, 5)
    for row in range(2):
        for q, column in enumerate(columns[row].tolist()):
            expected = [(k <= column and bool(key_valid[row, k])) or k == column for k in range(5)]
            assert mask[row, 0, q].tolist() == expected
    # 1-D query columns: one mask for every row; a query on a padding key still sees itself.
    shared = causal_key_mask(torch.arange(3), 3)
    assert shared.shape == (1, 1, 3, 3) and torch.equal(shared[0, 0], torch.ones(3, 3, dtype=torch.bool).tril())
    padded = causal_key_mask(torch.arange(3), 3, torch.tensor([[False, True, True]]))
    assert padded[0, 0, 0].tolist() == [True, False, False]


def test_ban_empty_sentence_bans_the_end_only_in_empty_sentences_and_keeps_its_input():
    logits = torch.zeros(3, 6)
    banned = ban_empty_sentence(logits, torch.tensor([0, 2, 0]), eos_token_id=4)
    assert torch.equal(logits, torch.zeros(3, 6))  # the raw logits stay as they were
    assert banned[:, 4].tolist() == [float("-inf"), 0.0, float("-inf")]
    assert torch.equal(banned[:, :4], logits[:, :4]) and torch.equal(banned[:, 5], logits[:, 5])


def test_stop_decision_stops_only_where_allowed():
    logits = torch.zeros(3, 2)
    logits[[0, 1], STOP] = 5.0  # stop, stop, go on
    logits[2, CONTINUE] = 5.0
    assert stop_decision(logits, do_sample=False).tolist() == [True, True, False]
    assert stop_decision(logits, False, torch.tensor([True, False, True])).tolist() == [True, False, False]


def test_running_text_left_aligns_prompts_and_new_tokens():
    prompts = torch.tensor([[0, 5, 6], [7, 8, 9]])
    written = torch.tensor([[3, -1, -1], [4, 5, -1]])
    text = running_text(prompts, written, torch.tensor([1, 2]), pad=0)
    assert text.tolist() == [[0, 0, 5, 6, 3], [7, 8, 9, 4, 5]]
    ids, mask = left_align(torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[True, False, True], [False, False, True]]), 0)
    assert ids.tolist() == [[1, 3], [0, 6]] and mask.tolist() == [[True, True], [False, True]]


def test_prompt_slots_split_closed_sentences_from_the_unfinished_one(tokenizer):
    model = tiny_sentence_opt(tokenizer)
    inputs = encode(tokenizer, ["The cat sat. It was warm", "A dog ran.", ""])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        prompt = model.model.prompt_slots(ids, mask.bool())
        closed = model.model(*[t[:1] for t in encode(tokenizer, ["The cat sat."]).values()][:2])
    assert prompt.is_open.tolist() == [True, False, False]
    prefix = ids[0][prompt.in_prefix[0]]
    assert tokenizer.decode(prefix).strip() == "It was warm"
    assert prompt.slot_mask.sum(1).tolist() == [2, 2, 1]  # the start state, then each closed sentence
    torch.testing.assert_close(prompt.inputs[0, -1], closed.sentence_vectors[0])


def test_decoder_conditioning_select_and_assign_move_rows(tokenizer):
    vae = tiny_sentence_opt(tokenizer, sentence_vae=dict(condition_inputs=True, num_memory_vectors=2)).sentence_vae
    vectors = torch.randn(4, vae.config.hidden_size)
    with torch.no_grad():
        full = vae.decoder.conditioning(vectors)
        rows = torch.tensor([2, 0])
        picked = full.select(rows)
        assert picked.memory.shape[0] == 2 and all(c.shape[0] == 2 for c in picked.cross)
        target = vae.decoder.conditioning(torch.zeros_like(vectors))
        before = target.select(torch.arange(4))  # a copy (index tensors copy)
        target.assign(rows, picked)
    for mine, theirs, own in zip(
        [target.memory, target.inputs, *target.cross], [full.memory, full.inputs, *full.cross],
        [before.memory, before.inputs, *before.cross], strict=True,
    ):  # fmt: skip
        assert torch.equal(mine[rows], theirs[rows])
        assert torch.equal(mine[[1, 3]], own[[1, 3]])  # rows not assigned keep their own
    assert not torch.equal(target.memory[1], full.memory[1])
