"""generate(), the whole contract: logits processors and stopping criteria see the running text
(prompt + tokens written so far) as for any `transformers` model; ``stopping_criteria``,
``max_time``, ``stop_strings``, ``bad_words_ids``, ``prefix_allowed_tokens_fn``,
``no_repeat_ngram_size``, ``output_scores`` / ``output_logits`` are honoured; what
next-sentence decoding cannot do raises a ValueError naming the setting. Compared with a tiny
``OPTForCausalLM`` where the semantics match."""

from __future__ import annotations

import time

import pytest
import torch
from helpers import encode, tiny_sentence_opt
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    OPTConfig,
    OPTForCausalLM,
    StoppingCriteria,
    StoppingCriteriaList,
    WatermarkingConfig,
)

PROMPTS = ["Hello there. How are", "Fine."]


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_sentence_opt(tokenizer)


@pytest.fixture(scope="module")
def opt(tokenizer):
    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_attention_heads=4,
        ffn_dim=64,
        num_hidden_layers=1,
        max_position_embeddings=256,
        word_embed_proj_dim=32,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=2,
        eos_token_id=2,
    )
    return OPTForCausalLM(config).eval()


class Recorder(LogitsProcessor):
    """Records the ``input_ids`` each call sees; changes nothing."""

    def __init__(self):
        self.seen = []

    def __call__(self, input_ids, scores):
        self.seen.append(input_ids.clone())
        return scores


class StopAtLength(StoppingCriteria):
    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def token_inputs(enc: dict) -> dict:
    """The token model's inputs (OPT takes no ``sentence_ids``)."""
    return dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])


def new_part(out: torch.Tensor, enc: dict) -> torch.Tensor:
    return out[:, enc["input_ids"].shape[1] :]


def text_rows(out: torch.Tensor, enc: dict, pad: int) -> list[list[int]]:
    """Each row's prompt (without its left padding) and new tokens (without the right padding)."""
    rows = []
    for row, mask, new in zip(out, enc["attention_mask"], new_part(out, enc)):
        prompt = row[: enc["input_ids"].shape[1]][mask.bool()].tolist()
        tokens = new.tolist()
        while tokens and tokens[-1] == pad:
            tokens.pop()
        rows.append(prompt + tokens)
    return rows


def no_pad(tokenizer) -> dict:
    """Keeps the pad id out of the new tokens, so that right padding is unambiguous."""
    return dict(suppress_tokens=[tokenizer.pad_token_id])


# ---------------------------------------------------------------------------- running sequence
@pytest.mark.parametrize("prompt", ["Hello there. How are", "Hello there."], ids=["mid-sentence", "whole-sentences"])
def test_processors_see_the_prompt_and_the_tokens_written_so_far(tokenizer, model, opt, prompt):
    """As for OPT: every call's input_ids is the prompt followed by the new tokens so far, and
    the widths run from the prompt's length to the last token's (the sentence model calls again,
    with the same text, at the steps that end a sentence)."""
    enc = encode(tokenizer, [prompt])
    recorder = Recorder()
    out = model.generate(**enc, max_new_tokens=24, logits_processor=LogitsProcessorList([recorder]), **no_pad(tokenizer))
    prompt_len, total = enc["input_ids"].shape[1], out.shape[1]
    assert total > prompt_len + 16  # several sentences
    for seen in recorder.seen:
        assert seen.dtype == torch.long and seen.shape[0] == 1
        assert torch.equal(seen, out[:, : seen.shape[1]])
    widths = sorted({seen.shape[1] for seen in recorder.seen})
    assert widths == list(range(prompt_len, total))

    opt_recorder = Recorder()
    opt_out = opt.generate(**token_inputs(enc), max_new_tokens=24, min_new_tokens=24, logits_processor=LogitsProcessorList([opt_recorder]))
    assert [s.shape[1] for s in opt_recorder.seen] == list(range(prompt_len, opt_out.shape[1]))
    assert all(torch.equal(s, opt_out[:, : s.shape[1]]) for s in opt_recorder.seen)


def test_processors_see_the_whole_batch_left_padded(tokenizer, model):
    """Documented layout: (batch, cur_len), every row in order at every step; each row is its
    prompt as given, then its new tokens, left-padded to the longest; a row not writing at that
    step has pad in its newest columns."""
    enc = encode(tokenizer, PROMPTS)
    recorder = Recorder()
    out = model.generate(**enc, max_new_tokens=30, logits_processor=LogitsProcessorList([recorder]), **no_pad(tokenizer))
    pad = tokenizer.pad_token_id
    full = text_rows(out, enc, pad)
    for seen in recorder.seen:
        assert seen.shape[0] == 2 and seen.shape[1] >= enc["input_ids"].shape[1]
        for r in range(2):
            row = seen[r].tolist()
            start = next(i for i, t in enumerate(row) if t != pad)
            end = len(row)
            while row[end - 1] == pad:
                end -= 1
            assert row[start:end] == full[r][: end - start]
    # The first call sees the prompts exactly as given.
    assert torch.equal(recorder.seen[0], enc["input_ids"])


def texts_by_row(seen: list[torch.Tensor], pad: int) -> list[list[list[int]]]:
    """Each row's distinct running texts (padding stripped) in the order processors saw them."""
    rows = [[] for _ in range(seen[0].shape[0])]
    for input_ids in seen:
        for r, row in enumerate(input_ids.tolist()):
            start = next((i for i, t in enumerate(row) if t != pad), len(row))
            end = len(row)
            while end > start and row[end - 1] == pad:
                end -= 1
            if not rows[r] or rows[r][-1] != row[start:end]:
                rows[r].append(row[start:end])
    return rows


def test_cached_and_uncached_paths_see_the_same_and_score_the_same(tokenizer, model):
    enc = encode(tokenizer, PROMPTS)
    outs = {}
    for use_cache in (True, False):
        recorder = Recorder()
        out = model.generate(
            **enc,
            max_new_tokens=20,
            use_cache=use_cache,
            logits_processor=LogitsProcessorList([recorder]),
            no_repeat_ngram_size=2,
            return_dict_in_generate=True,
            output_scores=True,
        )
        outs[use_cache] = (out, recorder.seen)
    (cached, seen_cached), (plain, seen_plain) = outs[True], outs[False]
    assert torch.equal(cached.sequences, plain.sequences)
    # The cached runtime schedules rows independently, the uncached loop in lockstep: the calls
    # differ, but each row's running texts, one after the other, are the same.
    # (A call after a row's last token, while other rows write on, shows its whole text: not compared.)
    pad = tokenizer.pad_token_id
    whole = text_rows(cached.sequences, enc, pad)
    cached_texts, plain_texts = texts_by_row(seen_cached, pad), texts_by_row(seen_plain, pad)
    for r in range(len(whole)):
        assert [t for t in cached_texts[r] if t != whole[r]] == [t for t in plain_texts[r] if t != whole[r]]
    for a, b in zip(cached.scores, plain.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------- processors
def repeated_ngrams(tokens: list[int], n: int, start: int) -> list[tuple[int, ...]]:
    """n-grams that end at or after ``start`` and occurred before."""
    seen, repeats = set(), []
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i : i + n])
        if gram in seen and i + n - 1 >= start:
            repeats.append(gram)
        seen.add(gram)
    return repeats


def test_no_repeat_ngram_size_holds_across_sentences(tokenizer, model, opt):
    enc = encode(tokenizer, PROMPTS)
    prompt_len = enc["input_ids"].shape[1]
    plain = model.generate(**enc, max_new_tokens=40, **no_pad(tokenizer))
    out = model.generate(**enc, max_new_tokens=40, no_repeat_ngram_size=2, **no_pad(tokenizer))
    pad = tokenizer.pad_token_id
    plain_rows, rows = text_rows(plain, enc, pad), text_rows(out, enc, pad)
    assert any(repeated_ngrams(r, 2, 0) for r in plain_rows)  # the setting has something to prevent
    for r, row in enumerate(rows):
        prompt = int(enc["attention_mask"][r].sum())
        assert len(row) > prompt + 16  # more than one sentence
        assert repeated_ngrams(row, 2, prompt) == []
    opt_out = opt.generate(**token_inputs(enc), max_new_tokens=40, no_repeat_ngram_size=2)
    for r, row in enumerate(text_rows(opt_out, enc, pad)):
        assert repeated_ngrams(row, 2, int(enc["attention_mask"][r].sum())) == []
    assert out.shape[1] > prompt_len


def test_bad_words_ids_are_never_written(tokenizer, model):
    enc = encode(tokenizer, PROMPTS)
    plain = new_part(model.generate(**enc, max_new_tokens=40), enc)
    values, counts = plain.unique(return_counts=True)
    common = values[counts.argsort(descending=True)][:3].tolist()
    pair = plain[0, :2].tolist()
    out = new_part(model.generate(**enc, max_new_tokens=40, bad_words_ids=[[t] for t in common] + [pair]), enc)
    assert out.shape[1] > 16
    assert not bool(torch.isin(out, torch.tensor(common)).any())
    for row in out.tolist():
        assert all(row[i : i + 2] != pair for i in range(len(row) - 1))


def test_prefix_allowed_tokens_fn_is_respected(tokenizer, model):
    enc = encode(tokenizer, PROMPTS)
    allowed = list(range(40, 80))
    calls = []

    def allow(batch_id, input_ids):
        calls.append((batch_id, input_ids.clone()))
        return allowed

    out = new_part(model.generate(**enc, max_new_tokens=30, prefix_allowed_tokens_fn=allow), enc)
    assert out.shape[1] == 30
    assert bool(torch.isin(out, torch.tensor(allowed + [tokenizer.pad_token_id])).all())
    assert {b for b, _ in calls} == {0, 1}
    # batch_id is the row of the batch, and the fn gets that row's running text.
    first_per_row = {b: ids for b, ids in reversed(calls)}
    assert torch.equal(first_per_row[0], enc["input_ids"][0]) and torch.equal(first_per_row[1], enc["input_ids"][1])


def test_a_processor_that_returns_the_wrong_shape_is_named(tokenizer, model):
    class Broken(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores[:, :10]

    enc = encode(tokenizer, PROMPTS)
    with pytest.raises(ValueError, match=r"logits processor Broken returned \(2, 10\).*shape \(batch, vocab\)"):
        model.generate(**enc, max_new_tokens=4, logits_processor=LogitsProcessorList([Broken()]))


# ---------------------------------------------------------------------------- stopping
@pytest.mark.parametrize("stop_after", [1, 5, 20])
def test_stopping_criteria_stop_at_a_token_count_as_opt(tokenizer, model, opt, stop_after):
    enc = encode(tokenizer, [PROMPTS[0]])
    prompt_len = enc["input_ids"].shape[1]
    criteria = StoppingCriteriaList([StopAtLength(prompt_len + stop_after)])
    out = model.generate(**enc, max_new_tokens=40, stopping_criteria=criteria, **no_pad(tokenizer))
    opt_out = opt.generate(**token_inputs(enc), max_new_tokens=40, min_new_tokens=40, stopping_criteria=criteria)
    assert out.shape[1] == opt_out.shape[1] == prompt_len + stop_after
    # Stopping changes nothing before the stop: a prefix of the unstopped text.
    plain = model.generate(**enc, max_new_tokens=40, **no_pad(tokenizer))
    assert torch.equal(out, plain[:, : out.shape[1]])


def test_a_stopped_row_is_finished_and_the_others_go_on(tokenizer, model):
    enc = encode(tokenizer, PROMPTS)
    first_token = int(new_part(model.generate(**enc, max_new_tokens=1), enc)[0, 0])

    def stop_row_0(input_ids, scores):  # a plain callable works too
        halt = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        halt[0] = True
        return halt

    out = new_part(model.generate(**enc, max_new_tokens=20, stopping_criteria=[stop_row_0], **no_pad(tokenizer)), enc)
    assert out[0, 0] == first_token and bool((out[0, 1:] == tokenizer.pad_token_id).all())
    assert out.shape[1] == 20 and bool((out[1] != tokenizer.pad_token_id).all())


def test_max_time_zero_writes_one_token_per_row_as_opt(tokenizer, model, opt):
    enc = encode(tokenizer, PROMPTS)
    out = model.generate(**enc, max_new_tokens=40, max_time=0.0)
    opt_out = opt.generate(**token_inputs(enc), max_new_tokens=40, max_time=0.0)
    assert out.shape[1] == opt_out.shape[1] == enc["input_ids"].shape[1] + 1


def test_max_time_stops_early(tokenizer, model):
    class Slow(LogitsProcessor):
        def __call__(self, input_ids, scores):
            time.sleep(0.01)
            return scores

    enc = encode(tokenizer, [PROMPTS[0]])
    start = time.perf_counter()
    out = model.generate(**enc, max_new_tokens=300, max_time=0.1, logits_processor=LogitsProcessorList([Slow()]))
    assert time.perf_counter() - start < 1.0
    assert 1 <= new_part(out, enc).shape[1] < 60


def test_stop_strings_with_the_tokenizer(tokenizer, model):
    enc = encode(tokenizer, [PROMPTS[0]])
    plain = new_part(model.generate(**enc, max_new_tokens=30), enc)
    stop = tokenizer.decode(plain[0, 2:4])
    out = new_part(model.generate(**enc, max_new_tokens=30, stop_strings=[stop], tokenizer=tokenizer), enc)
    assert 1 <= out.shape[1] <= 4 and tokenizer.decode(out[0]).endswith(stop)


@pytest.mark.parametrize(
    "criteria, error, pattern",
    [
        ([5], TypeError, r"stopping_criteria holds 5 \(int\), which is not a StoppingCriteria; pass a transformers.StoppingCriteria"),
        ([lambda: True], TypeError, r"cannot be called as \(input_ids, scores\); pass a transformers.StoppingCriteria"),
        ("stop", TypeError, r"stopping_criteria must be a StoppingCriteriaList"),
        ([lambda ids, scores: torch.ones(3, 3)], ValueError, r"returned \(3, 3\); a StoppingCriteria must return a bool tensor of shape \(batch,\)"),
    ],
    ids=["int", "wrong-signature", "string", "wrong-shape"],
)
def test_bad_stopping_criteria_are_refused(tokenizer, model, criteria, error, pattern):
    enc = encode(tokenizer, PROMPTS)
    with pytest.raises(error, match=pattern):
        model.generate(**enc, max_new_tokens=4, stopping_criteria=criteria)


# ---------------------------------------------------------------------------- scores
@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
def test_output_scores_and_logits(tokenizer, model, opt, use_cache):
    enc = encode(tokenizer, PROMPTS)
    out = model.generate(
        **enc,
        max_new_tokens=25,
        use_cache=use_cache,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        repetition_penalty=1.5,
    )
    new = new_part(out.sequences, enc)
    vocab, pad = model.config.vocab_size, tokenizer.pad_token_id
    for name in ("scores", "logits"):
        values = getattr(out, name)
        assert isinstance(values, tuple) and len(values) == new.shape[1]
        assert all(v.shape == (2, vocab) and v.dtype == torch.float32 for v in values)
    chosen = torch.stack(out.scores, dim=1).argmax(dim=-1)
    assert torch.equal(chosen, new)  # greedy: argmax of the processed scores is the token written
    stacked = torch.stack(out.scores, dim=1)
    written = new != pad
    assert bool(torch.isfinite(stacked[written].max(dim=-1).values).all())
    # A row with no token at a column: -inf but 0 at pad.
    blank = stacked[~written]
    if blank.numel():
        assert bool((blank[:, pad] == 0).all()) and bool(torch.isinf(blank[:, :pad]).all())
    # logits are the raw decoder outputs: the repetition penalty changes scores, not logits.
    assert not torch.equal(torch.stack(out.logits, 1)[written], stacked[written])
    # As OPT: one (batch, vocab) tensor per new column.
    opt_out = opt.generate(**token_inputs(enc), max_new_tokens=6, return_dict_in_generate=True, output_scores=True, output_logits=True)
    assert len(opt_out.scores) == len(opt_out.logits) == opt_out.sequences.shape[1] - enc["input_ids"].shape[1]


def test_without_return_dict_no_scores_are_kept(tokenizer, model):
    enc = encode(tokenizer, PROMPTS)
    out = model.generate(**enc, max_new_tokens=6, output_scores=True)
    assert isinstance(out, torch.Tensor)
    out = model.generate(**enc, max_new_tokens=6, return_dict_in_generate=True)
    assert out.scores is None and out.logits is None


@pytest.mark.parametrize("name", ["output_hidden_states", "output_attentions"])
def test_per_token_states_in_dict_outputs_are_refused_by_name_and_the_model_gives_them(tokenizer, model, opt, name):
    enc = encode(tokenizer, PROMPTS)
    # OPT returns a tuple of per-layer states per generated token; a SentenceLM has none per token.
    opt_out = opt.generate(**token_inputs(enc), max_new_tokens=3, return_dict_in_generate=True, **{name: True})
    per_token = opt_out.hidden_states if name == "output_hidden_states" else opt_out.attentions
    assert isinstance(per_token, tuple) and len(per_token) == 3
    with pytest.raises(ValueError, match=f"{name}=True with return_dict_in_generate=True is not supported.*model\\(output.sequences"):
        model.generate(**enc, max_new_tokens=3, return_dict_in_generate=True, **{name: True})
    # Without the dict output the setting changes nothing, as for a token model.
    plain = model.generate(**enc, max_new_tokens=6)
    assert torch.equal(model.generate(**enc, max_new_tokens=6, **{name: True}), plain)
    if name == "output_hidden_states":  # what the message points at works
        new = plain[:, enc["input_ids"].shape[1]:]
        mask = torch.cat([enc["attention_mask"], (new != tokenizer.pad_token_id).long()], dim=1)
        out = model(plain, attention_mask=mask, output_hidden_states=True)
        assert out.hidden_states is not None and out.slot_mask is not None


# ---------------------------------------------------------------------------- unsupported
UNSUPPORTED = [
    ("num_beams", 2),
    ("num_beam_groups", 2),
    ("diversity_penalty", 0.5),
    ("constraints", ["a constraint"]),
    ("force_words_ids", [[5]]),
    ("penalty_alpha", 0.6),
    ("low_memory", True),
    ("dola_layers", "high"),
    ("guidance_scale", 1.5),
    ("prompt_lookup_num_tokens", 3),
    ("assistant_early_exit", 2),
    ("watermarking_config", WatermarkingConfig()),
    ("exponential_decay_length_penalty", (5, 1.5)),
    ("forced_eos_token_id", 7),
    ("token_healing", True),
    ("prefill_chunk_size", 4),
    ("encoder_repetition_penalty", 1.2),
    ("encoder_no_repeat_ngram_size", 2),
    ("synced_gpus", True),
    ("custom_generate", "someone/some-loop"),
]


@pytest.mark.parametrize("name, value", UNSUPPORTED, ids=[n for n, _ in UNSUPPORTED])
def test_unsupported_settings_are_refused_by_name(tokenizer, model, name, value):
    enc = encode(tokenizer, [PROMPTS[0]])
    with pytest.raises(ValueError, match=rf"^{name}\b.*not supported by sentence-level generation.*; \w+") as info:
        model.generate(**enc, max_new_tokens=4, **{name: value})
    assert "spelling" not in str(info.value)


@pytest.mark.parametrize("name", ["assistant_model", "negative_prompt_ids"])
def test_unsupported_arguments_are_refused_by_name(tokenizer, model, name):
    enc = encode(tokenizer, [PROMPTS[0]])
    value = model if name == "assistant_model" else enc["input_ids"]
    with pytest.raises(ValueError, match=rf"^{name} .*not supported by sentence-level generation.*; \w+") as info:
        model.generate(**enc, max_new_tokens=4, **{name: value})
    assert "spelling" not in str(info.value)


def test_unsupported_settings_in_a_generation_config_are_refused(tokenizer, model):
    from transformers import GenerationConfig

    enc = encode(tokenizer, [PROMPTS[0]])
    with pytest.raises(ValueError, match=r"num_beams=3 \(beam search\) is not supported.*do_sample=True"):
        model.generate(**enc, generation_config=GenerationConfig(num_beams=3, max_new_tokens=4))


def test_misspelt_arguments_are_still_refused_as_misspellings(tokenizer, model):
    enc = encode(tokenizer, [PROMPTS[0]])
    with pytest.raises(ValueError, match=r"unknown arguments \['assistant_modle'\].*spelling"):
        model.generate(**enc, max_new_tokens=4, assistant_modle=model)


def test_supported_defaults_change_nothing(tokenizer, model):
    """num_beams=1, guidance_scale=1, penalty_alpha=0, synced_gpus=False ask for nothing."""
    enc = encode(tokenizer, PROMPTS)
    plain = model.generate(**enc, max_new_tokens=8)
    same = model.generate(
        **enc, max_new_tokens=8, num_beams=1, guidance_scale=1.0, penalty_alpha=0.0, synced_gpus=False, length_penalty=2.0
    )
    assert torch.equal(plain, same)


def test_scores_are_sized_by_the_tokens_written_not_the_budget(tokenizer, model):
    """A huge max_new_tokens sizes nothing: the scores hold one tensor per column written."""
    enc = encode(tokenizer, PROMPTS)
    out = model.generate(
        **enc, max_new_tokens=10**9, max_time=0.0, return_dict_in_generate=True, output_scores=True, output_logits=True
    )
    assert len(out.scores) == len(out.logits) == out.sequences.shape[1] - enc["input_ids"].shape[1] == 1


def test_prefix_allowed_tokens_fn_batch_id_with_several_sequences(tokenizer, model):
    """As transformers: with num_return_sequences, batch_id is the prompt's index."""
    enc = encode(tokenizer, PROMPTS)
    ids = []

    def allow(batch_id, input_ids):
        ids.append(batch_id)
        return list(range(40, 80))

    torch.manual_seed(0)
    out = model.generate(
        **enc, max_new_tokens=6, do_sample=True, num_return_sequences=3, prefix_allowed_tokens_fn=allow
    )
    assert out.shape[0] == 6 and set(ids) == {0, 1} and ids[:6] == [0, 0, 0, 1, 1, 1]
