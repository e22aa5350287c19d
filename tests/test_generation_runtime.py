"""The row-scheduled runtime of `generate()` (`sentence_lm/generation_runtime.py`) against the
lockstep reference loop (``use_cache=False``): the same greedy text for every backbone family and
attention implementation, rows independent of each other and of the batch, no row waiting for
another's sentence; the static-shape runtime compiled with a bounded number of graphs."""

import logging

import pytest
import torch
import transformers
from helpers import encode, tiny_sentence_opt
from transformers import CompileConfig, StoppingCriteria, StoppingCriteriaList

from sentence_lm import SentenceLMForCausalLM
from sentence_lm.generation_runtime import RowSteps, SlotCache

PROMPTS = ["The king had three sons. The youngest", "Once upon a time there was a", "She said yes.", ""]
NEW = 60


def new_tokens(sequences: torch.Tensor, enc: dict) -> torch.Tensor:
    return sequences[:, enc["input_ids"].shape[1] :]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["opt", "gpt2", "llama", "qwen2"])
def test_rows_runtime_writes_the_reference_text_and_each_row_as_alone(family, attention, sentence_lms, tokenizer):
    model = sentence_lms[family]
    model.set_attn_implementation(attention)
    try:
        enc = encode(tokenizer, PROMPTS)
        reference = model.generate(**enc, max_new_tokens=NEW, use_cache=False)
        out = model.generate(**enc, max_new_tokens=NEW, return_dict_in_generate=True)
        static = model.generate(**enc, max_new_tokens=NEW, cache_implementation="static")
        assert isinstance(out.cache, SlotCache)
        assert torch.equal(out.sequences, reference)
        assert torch.equal(static, reference)
        assert len(set(out.num_sentences.tolist())) > 1  # the rows' sentences differ
        for row, prompt in enumerate(PROMPTS):
            single = encode(tokenizer, [prompt])
            alone = model.generate(**single, max_new_tokens=NEW)
            assert torch.equal(new_tokens(alone, single)[0], new_tokens(out.sequences, enc)[row])
    finally:
        model.set_attn_implementation("sdpa")


def test_rows_runtime_with_rotary_positions_writes_the_reference_text(token_models, tokenizer):
    """A SentenceVAE with rotary positions and RMSNorm (what layers copied from a Llama-style token
    model take): the rows runtime and the static one write the reference loop's text."""
    torch.manual_seed(0)
    model = SentenceLMForCausalLM.from_pretrained_backbone(
        token_models["llama"], tokenizer=tokenizer, copy_layers=True,
        sentence_vae_config=dict(max_sentence_len=tokenizer.max_sentence_len, num_decoder_layers=2),
    ).eval()  # fmt: skip
    assert model.config.sentence_vae.position_embedding == "rotary"
    with torch.no_grad():
        model.stop_head.bias.copy_(torch.tensor([3.0, -3.0]))
    enc = encode(tokenizer, PROMPTS)
    reference = model.generate(**enc, max_new_tokens=NEW, use_cache=False)
    assert torch.equal(model.generate(**enc, max_new_tokens=NEW), reference)
    assert torch.equal(model.generate(**enc, max_new_tokens=NEW, cache_implementation="static"), reference)


def test_no_row_waits_for_another(tokenizer, monkeypatch):
    """Every decoder step writes a token or ends a sentence in every unfinished row: the number of
    steps is the slowest row's own (its tokens + its sentence ends), not the sum over sentences of
    the batch's longest, as in lockstep."""
    model = tiny_sentence_opt(tokenizer)
    calls = []
    step = RowSteps.decoder_step

    def counted(self, *args):
        calls.append(1)
        return step(self, *args)

    monkeypatch.setattr(RowSteps, "decoder_step", counted)
    enc = encode(tokenizer, PROMPTS)
    out = model.generate(**enc, max_new_tokens=NEW, return_dict_in_generate=True, pad_token_id=-1)
    written = (new_tokens(out.sequences, enc) != -1).sum(dim=1)
    # The first step (prompt prefix) is the prefill; each later one is a decoder_step call.
    assert 1 + len(calls) <= int((written + out.num_sentences).max())
    assert int(written.min()) == NEW


def test_rows_that_wait_to_share_a_backbone_step_write_the_same_text(tokenizer, monkeypatch):
    """Gathering the rows whose sentence ended for fewer, fuller backbone steps changes no text."""
    import sentence_lm.generation_runtime as runtime

    model = tiny_sentence_opt(tokenizer)
    enc = encode(tokenizer, PROMPTS)
    reference = model.generate(**enc, max_new_tokens=NEW, use_cache=False)
    sizes = []
    step = RowSteps.backbone_step

    def counted(self, rows, *args):
        sizes.append(rows.shape[0])
        return step(self, rows, *args)

    monkeypatch.setattr(RowSteps, "backbone_step", counted)
    alone = model.generate(**enc, max_new_tokens=NEW)
    immediate = list(sizes)
    sizes.clear()
    monkeypatch.setattr(runtime, "rows_per_backbone_step", lambda batch: batch)
    monkeypatch.setattr(runtime, "MAX_WAIT", 16)  # this model's rows end sentences up to 16 steps apart
    grouped = model.generate(**enc, max_new_tokens=NEW)
    assert torch.equal(alone, reference) and torch.equal(grouped, reference)
    assert sum(sizes) == sum(immediate)  # one backbone step per sentence and row either way
    assert len(sizes) < len(immediate) and max(sizes) > max(immediate)


class StopAfter(StoppingCriteria):
    """Stops a row once its text holds ``length`` tokens."""

    def __init__(self, length: int, pad: int):
        self.length, self.pad = length, pad

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids != self.pad).sum(dim=1) >= self.length


def processor_settings(enc: dict, tokenizer, new_tokens: int = NEW) -> dict:
    """generate() settings that exercise processors, a stopping criterion and the scores."""
    return dict(
        max_new_tokens=new_tokens,
        repetition_penalty=1.3,
        no_repeat_ngram_size=3,
        bad_words_ids=[[tokenizer.convert_tokens_to_ids("Ġthe")]],
        stopping_criteria=StoppingCriteriaList([StopAfter(enc["input_ids"].shape[1] + 25, tokenizer.pad_token_id)]),
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )


def test_rows_runtime_honours_processors_criteria_and_scores_as_the_reference(tokenizer):
    model = tiny_sentence_opt(tokenizer)
    enc = encode(tokenizer, PROMPTS)
    settings = processor_settings(enc, tokenizer)
    reference = model.generate(**enc, use_cache=False, **settings)
    out = model.generate(**enc, **settings)
    assert torch.equal(out.sequences, reference.sequences)
    assert torch.equal(out.num_sentences, reference.num_sentences)
    assert len(out.scores) == len(reference.scores) == out.sequences.shape[1] - enc["input_ids"].shape[1] < NEW
    for mine, theirs in zip(out.scores + out.logits, reference.scores + reference.logits):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)


def test_rows_runtime_in_bfloat16_writes_the_reference_text(sentence_lms, tokenizer):
    model = sentence_lms["llama"].to(torch.bfloat16)
    try:
        enc = encode(tokenizer, PROMPTS)
        reference = model.generate(**enc, max_new_tokens=NEW, use_cache=False)
        assert torch.equal(model.generate(**enc, max_new_tokens=NEW), reference)
    finally:
        model.to(torch.float32)


def test_static_runtime_needs_the_cache(tokenizer):
    model = tiny_sentence_opt(tokenizer)
    with pytest.raises(ValueError, match="cache_implementation='static' needs use_cache=True"):
        model.generate(**encode(tokenizer, PROMPTS), max_new_tokens=4, cache_implementation="static", use_cache=False)


@pytest.mark.slow
def test_compiled_runtime_writes_the_eager_text_and_compiles_a_bounded_number_of_graphs(sentence_lms, tokenizer):
    """The static runtime under `torch.compile` (inductor, as `transformers` compiles with a
    static cache; on CPU only when asked with ``_compile_all_devices``) compiles the decoder step
    once and the backbone step once per bucket (batch 4: ready rows padded to 1, 2 or 4), without
    graph breaks, and a second call compiles nothing."""
    from torch._dynamo.utils import counters

    model = sentence_lms["llama"]
    enc = encode(tokenizer, PROMPTS)
    eager = model.generate(**enc, max_new_tokens=NEW)
    config = CompileConfig(mode="default")
    config._compile_all_devices = True
    torch._dynamo.reset()
    counters.clear()
    compiled = model.generate(**enc, max_new_tokens=NEW, cache_implementation="static", compile_config=config)
    assert torch.equal(compiled, eager)
    graphs = counters["stats"]["unique_graphs"]
    assert 2 <= graphs <= 1 + 3
    assert not counters["graph_break"]
    again = model.generate(**enc, max_new_tokens=NEW, cache_implementation="static", compile_config=config)
    assert torch.equal(again, eager)
    assert counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()


def broken_backend(graph_module, example_inputs, **options):
    raise RuntimeError("no C++ compiler found")


@pytest.mark.parametrize("backend", ["no_such_backend", broken_backend], ids=["unknown", "failing"])
def test_compiling_where_it_cannot_work_warns_and_generates_eagerly(backend, tokenizer, caplog):
    model = tiny_sentence_opt(tokenizer)
    enc = encode(tokenizer, PROMPTS)
    eager = model.generate(**enc, max_new_tokens=20)
    config = CompileConfig(backend=backend)
    config._compile_all_devices = True
    transformers.utils.logging.warning_once.cache_clear()
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING):
        out = model.generate(**enc, max_new_tokens=20, cache_implementation="static", compile_config=config)
    torch._dynamo.reset()
    assert torch.equal(out, eager)
    expected = "no C++ compiler found" if callable(backend) else "no_such_backend"
    assert expected in caplog.text and "generating without compiling" in caplog.text


def test_static_buffers_are_sized_per_call(tokenizer):
    """No batch is too large for the static runtime's buffers: each call allocates its own (a
    larger batch after a smaller one, or a longer budget, simply gets larger ones)."""
    model = tiny_sentence_opt(tokenizer)
    for prompts, new in ((PROMPTS[:2], 10), (PROMPTS * 3, 30)):
        enc = encode(tokenizer, prompts)
        out = model.generate(**enc, max_new_tokens=new, cache_implementation="static", return_dict_in_generate=True)
        assert out.cache.valid.shape[0] == len(prompts) + 1  # the rows, and one scratch row
        assert torch.equal(out.sequences, model.generate(**enc, max_new_tokens=new, use_cache=False))
