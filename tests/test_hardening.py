"""Hardening: every bad input a user can hand the public API (text, token ids, attention masks,
forward, generate and its arguments, the pipeline, SentenceVAEModel.decode budgets, configs and
setup) ends in a named error whose message says what is wrong and what to do, or in the
documented behaviour (README, "Limits and errors"); a property test checks generate() over random
prompts and settings. No case may end in a raw traceback (IndexError, KeyError, torch's
RuntimeError...).

The tables are end to end: text goes through the session tokenizer (tests/conftest.py) into the
shared tiny SentenceOPTForCausalLM (helpers.tiny_sentence_opt). Bad checkpoints
(from_pretrained / save_pretrained) are in test_checkpointing.py; lower-level checks
(SentenceVAEModel.encode/decode inputs, the segmentation rules, lossless segmentation over random
text) live in test_sentence_vae.py and test_segmentation.py. None is repeated here.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import transformers
from helpers import TINY_HIDDEN, encode, tiny_sentence_opt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_segmentation import TEXT  # random text: control characters, CJK, RTL, emoji, punctuation runs
from transformers import pipeline

from sentence_lm import SentenceOPTConfig, SentenceOPTForCausalLM, SentenceVAEConfig, SentenceVAEModel
from sentence_lm.tokenization_sentence_lm import train_sentence_tokenizer

HIDDEN, MSL, MPE = TINY_HIDDEN, 16, 24  # MSL equals the session tokenizer's max_sentence_len


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_sentence_opt(tokenizer, max_position_embeddings=MPE)


def sentence_count(tokenizer, text: str) -> int:
    return max(tokenizer(text)["sentence_ids"], default=-1) + 1


def new_part(out: torch.Tensor, inputs: dict) -> torch.Tensor:
    """The generated tokens, after checking that the prompts come back unchanged."""
    width = inputs["input_ids"].shape[1]
    copies = out.shape[0] // inputs["input_ids"].shape[0]
    assert torch.equal(out[:, :width], inputs["input_ids"].repeat_interleave(copies, 0))
    return out[:, width:]


# ====================================================================================== text
# Unusual but valid texts: each is segmented losslessly, scored by forward() (except the empty
# text, which holds no token to score) and continued by generate() and the pipeline.
ODD_TEXTS = {
    "empty-string": "",
    "whitespace-only": "  \t \n ",
    "single-character": "a",
    "only-punctuation": "?!?!...,,,",
    "cjk-punctuation": "他说：“你好。”然后他走了！你呢？好。",
    "mixed-rtl-scripts": "مرحبا بالعالم. שלום עולם! hello (عربي) and עברית.",
    "emoji-and-combining": "😀👩‍💻 cafe\u0301 n\u0303o. Ok 🇫🇷!",
    "control-chars-and-nul": "\x00\x01 nul\x00 inside. ctrl\x1b[0m\x7f end",
    "crlf-line-ends": "line one\r\nline two\r\n\r\nline three",
}


@pytest.mark.parametrize("text", list(ODD_TEXTS.values()), ids=list(ODD_TEXTS))
def test_odd_text_end_to_end(tokenizer, model, text):
    enc = encode(tokenizer, [text])
    ids = enc["input_ids"][0]
    sentence_ids = enc["sentence_ids"][0]
    # Lossless: the sentences' tokens, in order, are the text's tokens, and decode to the text.
    assert tokenizer.decode(ids[sentence_ids >= 0], clean_up_tokenization_spaces=False) == text
    if text:
        out = model(**enc)
        assert torch.isfinite(out.loss) and out.logits.shape == (1, ids.numel(), len(tokenizer))
    else:
        # The documented refusal: nothing to score. The message names the problem and the fix.
        with pytest.raises(ValueError, match=r"no text token.*at least one token.*generate\(\)"):
            model(**enc)
    new = new_part(model.generate(**enc, max_new_tokens=6), enc)
    assert new.shape[1] <= 6 and bool(((new >= 0) & (new < len(tokenizer))).all())


def test_empty_prompt_generates_from_the_start_state(tokenizer, model):
    """``generate()`` with no prompt, a BOS-only prompt and the pipeline's "" all start from the
    learned start-of-text state, so they write the same text."""
    reference = model.generate(max_new_tokens=8, min_new_tokens=8)[0]
    enc = encode(tokenizer, [""])
    assert torch.equal(new_part(model.generate(**enc, max_new_tokens=8, min_new_tokens=8), enc)[0], reference)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = generator("", max_new_tokens=8, min_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text == tokenizer.decode(reference, skip_special_tokens=True)


@pytest.mark.slow
def test_100k_characters_without_punctuation(tokenizer, model):
    """Cut into pieces of exactly max_sentence_len tokens, losslessly; then more sentences than
    the backbone has positions, which forward, generate and the pipeline refuse by name."""
    text = ("abcdefghij klmnopqrst uvwxyz " * 3500)[:100_000]
    enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    ids, sentence_ids = enc["input_ids"][0], enc["sentence_ids"][0]
    assert torch.equal(sentence_ids, torch.arange(ids.numel()) // MSL)
    assert tokenizer.decode(ids, clean_up_tokenization_spaces=False) == text
    full = encode(tokenizer, [text])
    fix = r"max_position_embeddings.*shorten the text or split it"
    with pytest.raises(ValueError, match=fix):
        model(**full)
    with pytest.raises(ValueError, match=fix):
        model.generate(**full, max_new_tokens=4)


@pytest.mark.parametrize("entry", ["forward", "generate", "pipeline"])
def test_more_sentences_than_positions(tokenizer, model, entry):
    text = "Hi. " * MPE  # MPE sentences; the backbone holds MPE - 1 (slot 0 is the start state)
    assert sentence_count(tokenizer, text) == MPE
    enc = encode(tokenizer, [text])
    pattern = rf"{MPE} sentences but the backbone holds at most {MPE - 1}.*max_position_embeddings.*split it"
    with pytest.raises(ValueError, match=pattern):
        if entry == "forward":
            model(**enc)
        elif entry == "generate":
            model.generate(**enc, max_new_tokens=4)
        else:
            pipeline("text-generation", model=model, tokenizer=tokenizer)(text, max_new_tokens=4)
    # One sentence fewer fits, and generation stops when the slots are full.
    enc = encode(tokenizer, ["Hi. " * (MPE - 1)])
    assert torch.isfinite(model(**enc).loss)
    new = new_part(model.generate(**enc, max_new_tokens=200), enc)
    assert 0 < new.shape[1] <= MSL


# ====================================================================================== token ids
IDS = [[2, 300, 301, 12, 400]]  # BOS + a few ordinary tokens


def _bad_ids(case: str, vocab: int) -> dict:
    ids = torch.tensor(IDS)
    return {
        "negative-id": dict(input_ids=ids - 10),
        "id-equal-to-vocab-size": dict(input_ids=torch.tensor([[2, vocab]])),
        "id-above-vocab-size": dict(input_ids=ids + 10 * vocab),
        "float-dtype": dict(input_ids=ids.float()),
        "bool-dtype": dict(input_ids=ids.bool()),
        "1d-ids": dict(input_ids=ids[0]),
        "3d-ids": dict(input_ids=ids[None]),
        "python-list": dict(input_ids=IDS),
        "mask-of-other-shape": dict(input_ids=ids, attention_mask=torch.ones(1, 3)),
        "mask-transposed": dict(input_ids=ids, attention_mask=torch.ones(5, 1)),
        "empty-batch": dict(input_ids=torch.zeros(0, 5, dtype=torch.long)),
    }[case]


BAD_IDS = [
    ("negative-id", ValueError, r"outside the vocabulary \[0, 1024\).*min -8.*model's own tokenizer"),
    ("id-equal-to-vocab-size", ValueError, r"outside the vocabulary \[0, 1024\).*max 1024.*model's own tokenizer"),
    ("id-above-vocab-size", ValueError, r"outside the vocabulary.*model's own tokenizer"),
    ("float-dtype", TypeError, r"integer token ids, got dtype torch.float32.*\.long\(\)"),
    ("bool-dtype", TypeError, r"integer token ids, got dtype torch.bool.*\.long\(\)"),
    ("1d-ids", ValueError, r"must be 2-D \(batch, seq_len\), got shape \(5,\).*unsqueeze\(0\)"),
    ("3d-ids", ValueError, r"must be 2-D \(batch, seq_len\), got shape \(1, 1, 5\)"),
    ("python-list", TypeError, r"must be a torch.LongTensor, got list.*return_tensors='pt'"),
    (
        "mask-of-other-shape",
        ValueError,
        r"attention_mask has shape \(1, 3\) but input_ids.*\(1, 5\).*tokenizer returned",
    ),
    ("mask-transposed", ValueError, r"attention_mask has shape \(5, 1\).*tokenizer returned"),
    ("empty-batch", ValueError, r"input_ids holds no (text|prompt) \(batch size 0\); pass at least one row"),
]


@pytest.mark.parametrize("entry", ["forward", "generate"])
@pytest.mark.parametrize("case, error, pattern", BAD_IDS, ids=[c[0] for c in BAD_IDS])
def test_bad_token_ids(tokenizer, model, entry, case, error, pattern):
    inputs = _bad_ids(case, len(tokenizer))
    with pytest.raises(error, match=pattern):
        if entry == "forward":
            model(**inputs)
        else:
            model.generate(**inputs, max_new_tokens=3)


def test_int32_ids_are_accepted(tokenizer, model):
    enc = encode(tokenizer, ["One. Two"])
    narrow = dict(enc, input_ids=enc["input_ids"].int())
    torch.testing.assert_close(model(**narrow).loss, model(**enc).loss)
    assert torch.equal(model.generate(**narrow, max_new_tokens=5), model.generate(**enc, max_new_tokens=5))


def test_all_padding_row_in_forward_is_refused(tokenizer, model):
    enc = encode(tokenizer, ["Some text.", ""], add_special_tokens=False)  # "" becomes a row of padding
    assert not bool(enc["attention_mask"][1].any())
    with pytest.raises(ValueError, match=r"Row\(s\) \[1\].*no text token.*drop such rows"):
        model(**enc)


def test_all_padding_row_in_generate_is_an_empty_prompt(tokenizer, model, caplog):
    """Documented choice: generate() treats a row of padding as an empty prompt (it starts from
    the start-of-text state), writes the same tokens as ``generate()`` with no prompt, and does
    not take the row for a right-padded one."""
    transformers.utils.logging.warning_once.cache_clear()
    enc = encode(tokenizer, ["Some text.", ""], add_special_tokens=False)
    with caplog.at_level(logging.WARNING):
        new = new_part(model.generate(**enc, max_new_tokens=7, min_new_tokens=7), enc)
    assert "right-padded" not in caplog.text
    assert torch.equal(new[1], model.generate(max_new_tokens=7, min_new_tokens=7)[0])


def test_right_padding_warns_and_continues_correctly(tokenizer, model, caplog):
    texts = ["A first prompt. And more", "Short."]
    left, right = encode(tokenizer, texts, side="left"), encode(tokenizer, texts, side="right")
    expected = new_part(model.generate(**left, max_new_tokens=10), left)
    transformers.utils.logging.warning_once.cache_clear()
    with caplog.at_level(logging.WARNING):
        got = new_part(model.generate(**right, max_new_tokens=10), right)
    assert "right-padded" in caplog.text and "padding_side = 'left'" in caplog.text
    # The continuation is the same; only the padding sits between the prompt and the new tokens.
    assert torch.equal(got, expected)


# ====================================================================================== generation arguments
class NullStreamer:
    def put(self, value):
        pass

    def end(self):
        pass


BAD_GENERATION = [
    (
        "max-new-tokens-0",
        dict(max_new_tokens=0),
        ValueError,
        r"max_new_tokens must be an integer >= 1, got 0.*tokens to add",
    ),
    ("max-new-tokens-negative", dict(max_new_tokens=-5), ValueError, r"max_new_tokens must be an integer >= 1, got -5"),
    ("max-new-tokens-float", dict(max_new_tokens=2.5), TypeError, r"max_new_tokens must be an integer, got 2.5"),
    ("max-new-tokens-string", dict(max_new_tokens="8"), TypeError, r"max_new_tokens must be an integer, got '8'"),
    ("max-new-tokens-bool", dict(max_new_tokens=True), TypeError, r"max_new_tokens must be an integer, got True"),
    (
        "min-new-tokens-negative",
        dict(max_new_tokens=4, min_new_tokens=-1),
        ValueError,
        r"min_new_tokens must be an integer >= 0",
    ),
    (
        "temperature-0-sampling",
        dict(max_new_tokens=4, do_sample=True, temperature=0.0),
        ValueError,
        r"temperature must be > 0 when sampling, got 0.0.*do_sample=False for greedy",
    ),
    (
        "temperature-negative-sampling",
        dict(max_new_tokens=4, do_sample=True, temperature=-0.5),
        ValueError,
        r"temperature must be > 0 when sampling, got -0.5.*do_sample=False",
    ),
    ("temperature-negative-greedy", dict(max_new_tokens=4, temperature=-1.0), ValueError, r"temperature must be > 0"),
    (
        "temperature-nan",
        dict(max_new_tokens=4, do_sample=True, temperature=math.nan),
        TypeError,
        r"temperature must be a finite number, got nan",
    ),
    (
        "temperature-string",
        dict(max_new_tokens=4, do_sample=True, temperature="hot"),
        TypeError,
        r"temperature must be a finite number, got 'hot'",
    ),
    (
        "top-p-0",
        dict(max_new_tokens=4, do_sample=True, top_p=0.0),
        ValueError,
        r"top_p must lie in \(0, 1\], got 0.0.*1.0",
    ),
    (
        "top-p-above-1",
        dict(max_new_tokens=4, do_sample=True, top_p=1.5),
        ValueError,
        r"top_p must lie in \(0, 1\], got 1.5",
    ),
    ("top-p-negative", dict(max_new_tokens=4, do_sample=True, top_p=-0.1), ValueError, r"top_p must lie in \(0, 1\]"),
    ("top-k-negative", dict(max_new_tokens=4, do_sample=True, top_k=-1), ValueError, r"top_k must be an integer >= 0"),
    (
        "num-return-sequences-without-sampling",
        dict(max_new_tokens=4, num_return_sequences=3),
        ValueError,
        r"num_return_sequences=3 needs do_sample=True.*do_sample=True or num_return_sequences=1",
    ),
    (
        "num-return-sequences-0",
        dict(max_new_tokens=4, num_return_sequences=0),
        ValueError,
        r"num_return_sequences must be an integer >= 1",
    ),
    (
        "streamer-with-batch",
        dict(max_new_tokens=4, streamer=NullStreamer(), batch=2),
        ValueError,
        r"streamer works with one text at a time.*single prompt",
    ),
    (
        "streamer-with-several-sequences",
        dict(max_new_tokens=4, streamer=NullStreamer(), do_sample=True, num_return_sequences=2),
        ValueError,
        r"streamer works with one text at a time.*num_return_sequences=1",
    ),
    ("misspelt-argument", dict(max_new_token=4), ValueError, r"unknown arguments \['max_new_token'\].*spelling"),
    (
        "max-length-below-prompt",
        dict(max_length=3),
        ValueError,
        r"prompt has \d+ tokens but max_length is 3.*pass max_new_tokens",
    ),
]


@pytest.mark.parametrize("kwargs, error, pattern", [c[1:] for c in BAD_GENERATION], ids=[c[0] for c in BAD_GENERATION])
def test_bad_generation_arguments(tokenizer, model, kwargs, error, pattern):
    kwargs = dict(kwargs)
    enc = encode(tokenizer, ["Hello there. How are"] * kwargs.pop("batch", 1))
    with pytest.raises(error, match=pattern):
        model.generate(**enc, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(max_new_tokens=0), ValueError, r"max_new_tokens must be an integer >= 1"),
        (dict(max_new_tokens=4, do_sample=True, temperature=0.0), ValueError, r"temperature must be > 0 when sampling"),
        (dict(max_new_tokens=4, do_sample=True, top_p=2.0), ValueError, r"top_p must lie in \(0, 1\]"),
    ],
    ids=["max-new-tokens-0", "temperature-0-sampling", "top-p-2"],
)
def test_bad_generation_arguments_through_the_pipeline(tokenizer, model, kwargs, error, pattern):
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    with pytest.raises(error, match=pattern):
        generator("Hello there.", **kwargs)


@pytest.mark.parametrize("budget", [10**6, 10**12], ids=["1e6", "1e12"])
def test_huge_max_new_tokens_stops_by_the_stop_head_or_the_slot_limit(tokenizer, model, budget):
    """Runs (10**12 would ask for terabytes if the budget sized a buffer) and stops when the stop
    head ends the text or the sentence slots are full: at most one sentence per free slot."""
    prompt = "Hi. " * (MPE - 4)
    enc = encode(tokenizer, [prompt])
    free_slots = MPE - 1 - sentence_count(tokenizer, prompt)
    new = new_part(model.generate(**enc, max_new_tokens=budget), enc)
    assert 0 < new.shape[1] <= free_slots * MSL


def test_eos_token_id_list_is_accepted_and_changes_nothing(tokenizer, model):
    """Documented: the stop head ends a text and the model's end-of-sentence id ends a sentence;
    ``eos_token_id`` (an int or a list, as pipelines pass it) is accepted for compatibility and
    does not change generation. The end-of-sentence id never appears in the output."""
    enc = encode(tokenizer, ["Hello there. How are", "Fine."])
    plain = model.generate(**enc, max_new_tokens=12)
    for eos in ([model.config.eos_token_id, 300, 301], 300):
        assert torch.equal(model.generate(**enc, max_new_tokens=12, eos_token_id=eos), plain)
    assert not bool((new_part(plain, enc) == model.config.eos_token_id).any())


def test_temperature_0_without_sampling_is_greedy(tokenizer, model):
    enc = encode(tokenizer, ["Hello there."])
    greedy = model.generate(**enc, max_new_tokens=8)
    assert torch.equal(model.generate(**enc, max_new_tokens=8, temperature=0.0), greedy)


def test_min_new_tokens_above_max_new_tokens_gives_max_new_tokens(tokenizer, model):
    """Documented: max_new_tokens wins (as in transformers)."""
    enc = encode(tokenizer, ["Hello there."])
    new = new_part(
        model.generate(**enc, max_new_tokens=5, min_new_tokens=50, suppress_tokens=[tokenizer.pad_token_id]), enc
    )
    assert new.shape[1] == 5 and bool((new != tokenizer.pad_token_id).all())


BAD_BUDGETS = [
    (
        "tensor-of-wrong-length",
        torch.tensor([4, 4]),
        ValueError,
        r"`max_new_tokens` has shape \(2,\).*one int for all rows or a tensor of shape \(3,\)",
    ),
    ("2d-tensor", torch.full((3, 3), 4), ValueError, r"`max_new_tokens` has shape \(3, 3\).*shape \(3,\)"),
    ("float-tensor", torch.full((3,), 4.0), TypeError, r"`max_new_tokens` must hold integers, got dtype torch.float32"),
    (
        "negative-in-a-row",
        torch.tensor([4, -1, 4]),
        ValueError,
        r"`max_new_tokens` must be >= 0 in every row, got min -1",
    ),
    ("float", 2.5, TypeError, r"`max_new_tokens` must be an int or an integer tensor of shape \(3,\), got 2.5"),
    ("negative-int", -2, ValueError, r"`max_new_tokens` must be >= 0, got -2"),
    ("string", "4", TypeError, r"`max_new_tokens` must be an int or an integer tensor"),
]


@pytest.mark.parametrize("budget, error, pattern", [c[1:] for c in BAD_BUDGETS], ids=[c[0] for c in BAD_BUDGETS])
def test_bad_decode_budget(model, budget, error, pattern):
    """SentenceVAEModel.decode (the Sentence Decoder on its own): a budget per row or one int."""
    with pytest.raises(error, match=pattern):
        model.sentence_vae.decode(torch.zeros(3, HIDDEN), max_new_tokens=budget)


def test_good_decode_budgets_are_accepted(model):
    vectors = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(0))
    for budget in (0, 3, torch.tensor(3), torch.tensor([0, 2, 3]), torch.tensor([1, 1, 1], dtype=torch.int32)):
        out = model.sentence_vae.decode(vectors, max_new_tokens=budget)
        assert bool((out.lengths <= torch.as_tensor(budget)).all())


# ====================================================================================== configs
VAE_BASE = dict(vocab_size=1024, hidden_size=HIDDEN, num_attention_heads=4, ffn_dim=64)
OPT_BASE = dict(sentence_vae=VAE_BASE, hidden_size=HIDDEN, num_attention_heads=4, ffn_dim=64, num_hidden_layers=1)

BAD_CONFIGS = [
    # SentenceVAEConfig (unknown keys, heads, max_sentence_len < 2 and ranges are also in test_sentence_vae.py;
    # the SentenceOPTConfig rows below reach them through the nested config)
    (
        "vae-max-sentence-len-string",
        SentenceVAEConfig,
        dict(max_sentence_len="64"),
        r"`max_sentence_len` must be an integer >= 2",
    ),
    ("vae-dropout-string", SentenceVAEConfig, dict(dropout="a"), r"`dropout` must be a number in \[0, 1\), got 'a'"),
    (
        "vae-attention-dropout-none",
        SentenceVAEConfig,
        dict(attention_dropout=None),
        r"`attention_dropout` must be a number in \[0, 1\)",
    ),
    (
        "vae-init-std-negative",
        SentenceVAEConfig,
        dict(init_std=-0.02),
        r"`init_std` must be a finite number > 0, got -0.02",
    ),
    ("vae-init-std-0", SentenceVAEConfig, dict(init_std=0.0), r"`init_std` must be a finite number > 0"),
    (
        "vae-layer-norm-eps-0",
        SentenceVAEConfig,
        dict(layer_norm_eps=0),
        r"`layer_norm_eps` must be a finite number > 0, got 0",
    ),
    (
        "vae-layer-norm-eps-string",
        SentenceVAEConfig,
        dict(layer_norm_eps="1e-5"),
        r"`layer_norm_eps` must be a finite number > 0",
    ),
    (
        "vae-focal-gamma-nan",
        SentenceVAEConfig,
        dict(focal_gamma=math.nan),
        r"`focal_gamma` must be a finite number >= 0, got nan",
    ),
    (
        "vae-share-embeddings-string",
        SentenceVAEConfig,
        dict(share_embeddings="yes"),
        r"`share_embeddings` must be True or False",
    ),
    (
        "vae-pad-token-bool",
        SentenceVAEConfig,
        dict(pad_token_id=True),
        r"`pad_token_id` must be a token id in \[0, vocab_size=1024\)",
    ),
    (
        "vae-config-version-string",
        SentenceVAEConfig,
        dict(config_version="1"),
        r"`config_version` must be an integer.*re-save",
    ),
    # SentenceOPTConfig
    (
        "opt-unknown-key",
        SentenceOPTConfig,
        dict(num_layers=2),
        r"Unknown SentenceOPTConfig key\(s\) \['num_layers'\].*spelling.*num_hidden_layers",
    ),
    (
        "opt-unknown-key-in-vae",
        SentenceOPTConfig,
        dict(sentence_vae=dict(VAE_BASE, max_sentence_length=8)),
        r"Unknown SentenceVAEConfig key\(s\) \['max_sentence_length'\].*max_sentence_len",
    ),
    (
        "opt-vae-hidden-size-differs",
        SentenceOPTConfig,
        dict(sentence_vae=dict(VAE_BASE, hidden_size=16)),
        r"SentenceVAE's hidden_size \(16\) differs from the backbone's hidden_size \(32\).*same hidden_size",
    ),
    (
        "opt-heads-do-not-divide-hidden",
        SentenceOPTConfig,
        dict(num_attention_heads=5),
        r"`num_attention_heads` \(5\) must divide `hidden_size` \(32\)",
    ),
    (
        "opt-vae-max-sentence-len-1",
        SentenceOPTConfig,
        dict(sentence_vae=dict(VAE_BASE, max_sentence_len=1)),
        r"`max_sentence_len` must be an integer >= 2",
    ),
    (
        "opt-max-position-embeddings-1",
        SentenceOPTConfig,
        dict(max_position_embeddings=1),
        r"`max_position_embeddings` must be an integer >= 2, got 1",
    ),
    ("opt-dropout-string", SentenceOPTConfig, dict(dropout="a"), r"`dropout` must be a number in \[0, 1\), got 'a'"),
    ("opt-layerdrop-1", SentenceOPTConfig, dict(layerdrop=1.0), r"`layerdrop` must be a number in \[0, 1\)"),
    (
        "opt-init-std-negative",
        SentenceOPTConfig,
        dict(init_std=-1.0),
        r"`init_std` must be a finite number > 0, got -1.0",
    ),
    (
        "opt-stop-loss-weight-nan",
        SentenceOPTConfig,
        dict(stop_loss_weight=math.nan),
        r"`stop_loss_weight` must be a finite number >= 0",
    ),
    (
        "opt-stop-loss-weight-string",
        SentenceOPTConfig,
        dict(stop_loss_weight="1"),
        r"`stop_loss_weight` must be a finite number >= 0",
    ),
    ("opt-enable-bias-string", SentenceOPTConfig, dict(enable_bias="no"), r"`enable_bias` must be True or False"),
    (
        "opt-vocab-size-conflicts-with-vae",
        SentenceOPTConfig,
        dict(vocab_size=5),
        r"`vocab_size`=5 differs from the SentenceVAE's vocab_size \(1024\).*sentence_vae=dict\(vocab_size=...\)",
    ),
    *(
        (
            f"opt-{name}-conflicts-with-vae",
            SentenceOPTConfig,
            {name: 7},
            rf"`{name}`=7 differs from the SentenceVAE's {name} \(\d+\).*sentence_vae=dict\({name}=...\)",
        )
        for name in ("pad_token_id", "bos_token_id", "eos_token_id")
    ),
    ("opt-base-model-not-a-string", SentenceOPTConfig, dict(base_model=3), r"`base_model` must be a checkpoint name"),
    (
        "opt-sentence-vae-wrong-type",
        SentenceOPTConfig,
        dict(sentence_vae="svae-h1"),
        r"`sentence_vae` must be a `dict`, `PreTrainedConfig`, or `None`",
    ),
]


@pytest.mark.parametrize("cls, overrides, pattern", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config(cls, overrides, pattern):
    fields = dict(VAE_BASE if cls is SentenceVAEConfig else OPT_BASE)
    fields.update(overrides)
    # Every field error is a ValueError naming the field; a sub-config of the wrong type is the
    # library's TypeError (it names the field and the accepted types).
    error = TypeError if isinstance(overrides.get("sentence_vae"), str) else ValueError
    with pytest.raises(error, match=pattern):
        cls(**fields)


def test_token_level_fields_equal_to_the_vae_are_accepted():
    config = SentenceOPTConfig(**OPT_BASE, vocab_size=1024, pad_token_id=1)
    assert config.vocab_size == 1024 and config.pad_token_id == 1


BAD_SETUPS = [
    (
        "tokenizer-max-sentence-len-0",
        lambda tok: train_sentence_tokenizer(["a b c."], vocab_size=300, max_sentence_len=0),
        ValueError,
        r"max_sentence_len must be a positive integer, got 0",
    ),
    (
        "tokenizer-trained-on-one-string",
        lambda tok: train_sentence_tokenizer("one long string", vocab_size=300),
        TypeError,
        r"iterable of strings, not one string; wrap it in a list",
    ),
    (
        "vocab-smaller-than-tokenizer",
        lambda tok: SentenceVAEModel(SentenceVAEConfig(**dict(VAE_BASE, vocab_size=500))).set_boundary_table(tok),
        ValueError,
        r"tokenizer has 1024 tokens but the model's vocab_size is 500.*vocab_size >= len\(tokenizer\)",
    ),
    (
        "model-without-boundary-table",
        lambda tok: SentenceOPTForCausalLM(SentenceOPTConfig(**OPT_BASE))(**encode(tok, ["Hi. There"])),
        ValueError,
        r"no sentence-boundary table yet.*set_boundary_table\(tokenizer\)",
    ),
]


@pytest.mark.parametrize("make, error, pattern", [c[1:] for c in BAD_SETUPS], ids=[c[0] for c in BAD_SETUPS])
def test_bad_setup(tokenizer, make, error, pattern):
    with pytest.raises(error, match=pattern):
        make(tokenizer)


# ====================================================================================== properties
PROPERTY = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)


@st.composite
def generation_settings(draw):
    max_new = draw(st.integers(1, 20))
    do_sample = draw(st.booleans())
    kwargs = dict(max_new_tokens=max_new, min_new_tokens=draw(st.one_of(st.integers(0, max_new), st.just(max_new))))
    if do_sample:
        kwargs.update(
            do_sample=True,
            temperature=draw(st.floats(0.1, 2.0)),
            top_k=draw(st.integers(0, 50)),
            top_p=draw(st.floats(0.1, 1.0, exclude_min=True)),
            num_return_sequences=draw(st.integers(1, 2)),
        )
    return kwargs


@pytest.mark.slow
@PROPERTY
@given(texts=st.lists(TEXT, min_size=1, max_size=3), kwargs=generation_settings(), seed=st.integers(0, 2**16))
def test_generate_properties(tokenizer, model, texts, kwargs, seed):
    """For random prompts and settings: the prompt comes back unchanged as the prefix, new ids lie
    in [0, vocab), no row gets more than max_new_tokens new tokens, and exactly max_new_tokens
    when min_new_tokens == max_new_tokens (if the context has a free slot per token). A prompt
    with more sentences than positions is refused by name."""
    enc = encode(tokenizer, texts)
    pad = tokenizer.pad_token_id
    torch.manual_seed(seed)
    counts = [sentence_count(tokenizer, t) for t in texts]
    if max(counts) > MPE - 1:
        with pytest.raises(ValueError, match="max_position_embeddings"):
            model.generate(**enc, **kwargs)
        return
    # The padding id is suppressed so that a row's new tokens can be counted: they are not padding.
    out = model.generate(**enc, suppress_tokens=[pad], **kwargs)
    new = new_part(out, enc)
    max_new, min_new = kwargs["max_new_tokens"], kwargs["min_new_tokens"]
    assert new.shape[0] == len(texts) * kwargs.get("num_return_sequences", 1)
    assert bool(((new >= 0) & (new < len(tokenizer))).all())
    lengths = (new != pad).sum(dim=1)
    assert new.shape[1] <= max_new and bool((lengths <= max_new).all())
    for row, length in zip(new, lengths):  # right-padded: the tokens, then padding only
        assert bool((row[int(length) :] == pad).all())
    # Each free sentence slot yields at least one token, so with enough of them the budget is met.
    free = MPE - 1 - max(counts)
    if min_new == max_new and free >= max_new:
        assert lengths.tolist() == [max_new] * new.shape[0]


def test_forward_refuses_what_it_would_otherwise_ignore(tokenizer):
    """inputs_embeds, a cache with content and a misspelt keyword are refused by name (issue 27);
    what tools pass every causal LM (use_cache, an empty cache) is accepted and changes nothing."""
    from transformers import DynamicCache

    model = tiny_sentence_opt(tokenizer)
    inputs = encode(tokenizer, ["A short text. Another one."])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        plain = model(ids, attention_mask=mask)
        with pytest.raises(ValueError, match="not inputs_embeds"):
            model(ids, attention_mask=mask, inputs_embeds=torch.zeros(1, ids.shape[1], 32))
        with pytest.raises(TypeError, match=r"\['foo_bar'\].*spelling"):
            model(ids, attention_mask=mask, foo_bar=1)
        with pytest.raises(TypeError, match="foo_bar"):
            model.model(ids, mask, foo_bar=1)
        full = model.model(ids, mask, use_cache=True).cache
        assert full.get_seq_length() > 0
        with pytest.raises(ValueError, match="generate"):
            model(ids, attention_mask=mask, past_key_values=full)
        ignored = model(ids, attention_mask=mask, use_cache=False, past_key_values=DynamicCache())
    torch.testing.assert_close(ignored.nll, plain.nll)


def test_the_base_model_takes_the_tokenizers_outputs_as_they_are(tokenizer):
    """`model.model(**tokenizer(...))` works: sentence_ids is accepted (and ignored) by the base
    model too, while a misspelt keyword is refused."""
    model = tiny_sentence_opt(tokenizer)
    inputs = encode(tokenizer, ["A short text. Another one."])
    assert "sentence_ids" in inputs
    with torch.no_grad():
        out = model.model(**inputs)
        plain = model.model(inputs["input_ids"], inputs["attention_mask"])
    torch.testing.assert_close(out.last_hidden_state, plain.last_hidden_state)
