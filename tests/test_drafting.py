"""Drafting (``generate(draft_tokens=k)``, `sentence_lm/drafting.py`): the draft head's tokens
verified by the Sentence Decoder in one pass. Greedy text identical to plain decoding on every
backbone family, with random drafts (mostly rejected) and with drafts read from the plain text
(mostly accepted, a few corrupted); speculative sampling's rule keeps the model's distribution;
settings that cannot draft are refused."""

import pytest
import torch
from helpers import assert_same_weights, encode, load_script, tiny_sentence_opt
from transformers import GenerationConfig

from sentence_lm import SentenceLMForCausalLM
from sentence_lm.drafting import verify_draft
from sentence_lm.generation_runtime import RowSteps

PROMPTS = ["The king had three sons. The youngest", "Once upon a time there was a", "She said yes.", ""]
NEW = 50
HEAD = dict(parallel_readout_weight=0.5)


def drafting_model(tokenizer, **overrides):
    return tiny_sentence_opt(tokenizer, sentence_vae=dict(HEAD, **overrides))


class PlainTextDrafts:
    """Patches `RowSteps` so that a plain run records each row's sentences (as the encoder reads
    them, prompt prefix included) and a drafting run drafts them back: the drafted token for
    sentence index ``i`` is the recorded one (the end-of-sentence marker after the last), except
    at every ``corrupt``-th index, where it is another token."""

    def __init__(self, monkeypatch, vocab_size: int, eos: int, corrupt: int = 5):
        self.sentences: dict[int, list[list[int]]] = {}
        self.monkeypatch, self.vocab_size, self.eos, self.corrupt = monkeypatch, vocab_size, eos, corrupt

    def record(self):
        encode_, backbone_step = RowSteps.encode, RowSteps.backbone_step
        owner = self

        def encode(self, ids, keep):
            self.recorded = [row[k].tolist() for row, k in zip(ids, keep)]
            return encode_(self, ids, keep)

        def step(self, rows, *args):
            for row, ids in zip(rows.tolist(), self.recorded):
                if row < self.batch:
                    owner.sentences.setdefault(row, []).append(ids)
            return backbone_step(self, rows, *args)

        self.monkeypatch.setattr(RowSteps, "encode", encode)
        self.monkeypatch.setattr(RowSteps, "backbone_step", step)

    def draft(self):
        self.monkeypatch.undo()
        start_drafts = RowSteps.start_drafts
        owner = self

        def start(self, rows, states):
            if not hasattr(self, "sentence_index"):
                self.sentence_index = [-1] * self.batch
            for row in rows.tolist():
                self.sentence_index[row] += 1
            return start_drafts(self, rows, states)

        def logits(self, rows, starts):
            out = torch.zeros(len(rows), self.draft_chunk, owner.vocab_size)
            for i, (row, start) in enumerate(zip(rows.tolist(), starts.tolist())):
                done = owner.sentences.get(row, [])
                index = self.sentence_index[row]
                sentence = done[index] + [owner.eos] if index < len(done) else []
                for j in range(self.draft_chunk):
                    at = start + j
                    if at < len(sentence):
                        token = sentence[at] if at % owner.corrupt else (sentence[at] + 1) % owner.vocab_size
                        out[i, j, token] = 20.0
            return out

        self.monkeypatch.setattr(RowSteps, "start_drafts", start)
        self.monkeypatch.setattr(RowSteps, "draft_logits", logits)


@pytest.mark.parametrize("family", ["opt", "gpt2", "llama", "qwen2", "mistral", "gemma", "phi"])
def test_greedy_drafting_writes_the_plain_text_on_every_family(family, token_models, tokenizer):
    torch.manual_seed(0)
    model = SentenceLMForCausalLM.from_pretrained_backbone(
        token_models[family],
        tokenizer=tokenizer,
        sentence_vae_config=dict(max_sentence_len=tokenizer.max_sentence_len, init_std=0.3, **HEAD),
    ).eval()
    with torch.no_grad():
        model.stop_head.bias.copy_(torch.tensor([3.0, -3.0]))
    enc = encode(tokenizer, PROMPTS)
    plain = model.generate(**enc, max_new_tokens=NEW, return_dict_in_generate=True)
    for k in (1, 4):
        drafted = model.generate(**enc, max_new_tokens=NEW, return_dict_in_generate=True, draft_tokens=k)
        assert torch.equal(drafted.sequences, plain.sequences)
        assert torch.equal(drafted.num_sentences, plain.num_sentences)
        assert bool((drafted.decoder_passes <= plain.decoder_passes).all())


@pytest.mark.parametrize("static", [False, True])
def test_accepted_drafts_cut_decoder_passes_and_change_no_token(static, tokenizer, monkeypatch):
    model = drafting_model(tokenizer)
    enc = encode(tokenizer, PROMPTS)
    settings = dict(max_new_tokens=NEW, return_dict_in_generate=True)
    if static:
        settings["cache_implementation"] = "static"
    drafts = PlainTextDrafts(monkeypatch, model.config.vocab_size, model.config.sentence_vae.eos_token_id)
    drafts.record()
    plain = model.generate(**enc, **settings)
    drafts.draft()
    passes = {}
    for k in (1, 3, 8):
        out = model.generate(**enc, **settings, draft_tokens=k)
        assert torch.equal(out.sequences, plain.sequences), k
        passes[k] = out.decoder_passes
    written = (out.sequences[:, enc["input_ids"].shape[1] :] != tokenizer.pad_token_id).sum(dim=1)
    assert bool((plain.decoder_passes >= written).all())  # one pass per token (and end of sentence)
    # With every 5th drafted token wrong, a pass keeps up to 5 tokens: fewer passes as k grows.
    assert bool((passes[1] < plain.decoder_passes).all())
    assert bool((passes[3] < passes[1]).all()) and bool((passes[8] < passes[3]).all())
    assert bool((passes[8] * 2 < plain.decoder_passes).all())


def test_drafting_honours_processors_criteria_streamer_and_scores(tokenizer, monkeypatch):
    from test_generation_runtime import processor_settings
    from transformers import TextIteratorStreamer

    model = drafting_model(tokenizer)
    enc = encode(tokenizer, PROMPTS)
    settings = processor_settings(enc, tokenizer, NEW)
    drafts = PlainTextDrafts(monkeypatch, model.config.vocab_size, model.config.sentence_vae.eos_token_id)
    drafts.record()
    plain = model.generate(**enc, **settings)
    drafts.draft()
    out = model.generate(**enc, **settings, draft_tokens=4)
    assert torch.equal(out.sequences, plain.sequences)
    assert bool((out.decoder_passes < plain.decoder_passes).all())
    assert len(out.scores) == len(plain.scores) == out.sequences.shape[1] - enc["input_ids"].shape[1] < NEW
    for mine, theirs in zip(out.scores + out.logits, plain.scores + plain.logits):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)

    single = encode(tokenizer, PROMPTS[:1])
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    text = model.generate(**single, max_new_tokens=NEW, streamer=streamer, draft_tokens=4)
    assert "".join(streamer) == tokenizer.decode(text[0, single["input_ids"].shape[1] :])


def test_verify_draft_keeps_the_model_distribution():
    """Speculative sampling's rule: whatever distribution ``q`` the drafts come from, the tokens
    taken are distributed as the model's ``p`` (here within sampling noise of 400,000 draws)."""
    torch.manual_seed(0)
    rows = 400_000
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05, 0.0])
    q = torch.tensor([0.1, 0.1, 0.3, 0.1, 0.2, 0.2])
    scores = p.log().expand(rows, -1)
    draft = torch.multinomial(q, rows, replacement=True)
    token, accepted = verify_draft(scores, draft, q.expand(rows, -1))
    seen = torch.bincount(token, minlength=6).float() / rows
    torch.testing.assert_close(seen, p, atol=4e-3, rtol=0)
    # Accepted exactly at rate sum(min(p, q)); the greedy rule accepts the argmax only.
    assert abs(accepted.float().mean().item() - torch.minimum(p, q).sum().item()) < 4e-3
    greedy, kept = verify_draft(scores[:6], torch.arange(6))
    assert greedy.tolist() == [0] * 6 and kept.tolist() == [True] + [False] * 5


def test_sampled_drafting_writes_texts_from_the_model_distribution(tokenizer):
    """The second and third new tokens (the first ones a drafted pass takes) of many samples
    have the same frequencies with drafts as without, within sampling noise."""
    model = drafting_model(tokenizer)
    enc = encode(tokenizer, ["Once upon a time there was a"])
    n = 3000
    settings = dict(max_new_tokens=3, do_sample=True, num_return_sequences=n, top_k=8)
    torch.manual_seed(1)
    plain = model.generate(**enc, **settings)[:, -2:]
    torch.manual_seed(2)
    drafted = model.generate(**enc, **settings, draft_tokens=3)[:, -2:]
    for column in range(2):
        a = torch.bincount(plain[:, column], minlength=model.config.vocab_size).float() / n
        b = torch.bincount(drafted[:, column], minlength=model.config.vocab_size).float() / n
        assert 0.5 * (a - b).abs().sum().item() < 0.06  # total variation; ~0.03 for two samples of one law


def test_draft_tokens_is_a_generation_config_field(tokenizer, monkeypatch):
    import sentence_lm.generation_sentence_lm as generation

    seen = []
    rows = generation.generate_rows

    def recorded(*args, **kwargs):
        seen.append(kwargs["draft_tokens"])
        return rows(*args, **kwargs)

    monkeypatch.setattr(generation, "generate_rows", recorded)
    model = drafting_model(tokenizer)
    enc = encode(tokenizer, PROMPTS[:1])
    model.generate(**enc, max_new_tokens=5)
    model.generate(**enc, max_new_tokens=5, generation_config=GenerationConfig(draft_tokens=3))
    model.generation_config.draft_tokens = 2
    model.generate(**enc, max_new_tokens=5)
    model.generate(**enc, max_new_tokens=5, draft_tokens=5)
    assert seen == [0, 3, 2, 5]


def test_settings_that_cannot_draft_are_refused(tokenizer):
    enc = encode(tokenizer, PROMPTS[:1])
    plain = tiny_sentence_opt(tokenizer)
    with pytest.raises(ValueError, match="draft head.*train_draft_head"):
        plain.generate(**enc, max_new_tokens=5, draft_tokens=4)
    model = drafting_model(tokenizer)
    for bad in (-1, 1.5, True, "4"):
        with pytest.raises(ValueError, match="draft_tokens must be an integer >= 0"):
            model.generate(**enc, max_new_tokens=5, draft_tokens=bad)
    with pytest.raises(ValueError, match="use_cache=True"):
        model.generate(**enc, max_new_tokens=5, draft_tokens=4, use_cache=False)
    with pytest.raises(ValueError, match="beam search"):
        model.generate(**enc, max_new_tokens=5, draft_tokens=4, num_beams=2)


def test_a_draft_head_trained_on_the_frozen_model_cuts_passes_and_saves(tokenizer, tmp_path):
    """`train_draft_head` trains only the head (the model's own text is unchanged), on the
    decoder's own sentences: its drafts then agree with the decoder more often than a new head's,
    and the saved model loads with its head and drafts the same text."""
    import datasets

    from sentence_lm.data import tokenize_texts
    from sentence_lm.corpus import default_corpus
    from sentence_lm.training_draft_head import train_draft_head

    model = tiny_sentence_opt(tokenizer)
    enc = encode(tokenizer, PROMPTS)
    plain = model.generate(**enc, max_new_tokens=NEW, return_dict_in_generate=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    texts = tokenize_texts(datasets.Dataset.from_dict({"text": default_corpus()}), tokenizer, 128, 16)
    summary = train_draft_head(
        model, texts.select(range(40)), str(tmp_path / "run"), eval_texts=texts.select(range(40, 50)),
        max_steps=60, batch_size=32, show_progress=False,
    )  # fmt: skip
    assert summary["steps"] == 60 and model.sentence_vae.parallel_readout is not None
    after_training = model.state_dict()
    added = set(after_training) - set(before)
    assert added and all(".parallel_readout." in k for k in added), sorted(added)  # the draft head only
    assert_same_weights(before, {k: v for k, v in after_training.items() if k not in added})  # the rest untouched
    after, start = summary["agreement_after"], summary["agreement_before"]
    assert after["token_accuracy"] > start["token_accuracy"] + 0.1 and after["first_run"] > start["first_run"]
    drafted = model.generate(**enc, max_new_tokens=NEW, return_dict_in_generate=True, draft_tokens=4)
    assert torch.equal(drafted.sequences, plain.sequences)
    model.save_pretrained(tmp_path / "saved")
    loaded = type(model).from_pretrained(tmp_path / "saved").eval()
    again = loaded.generate(**enc, max_new_tokens=NEW, return_dict_in_generate=True, draft_tokens=4)
    assert torch.equal(again.sequences, plain.sequences)
    assert torch.equal(again.decoder_passes, drafted.decoder_passes)
    # Under a time budget the head trains until it runs out (a budget of 0: one step), and nothing is saved on the way.
    summary = train_draft_head(model, texts.select(range(20)), str(tmp_path / "timed"), minutes=0,
                               batch_size=8, show_progress=False)  # fmt: skip
    assert summary["steps"] == 1 and not list((tmp_path / "timed").glob("checkpoint-*"))


def test_train_draft_head_script_saves_a_model_that_drafts(tokenizer, tmp_path):
    import json

    tiny_sentence_opt(tokenizer).save_pretrained(tmp_path / "model")
    script = load_script("examples/train_draft_head.py")
    out, valid = tmp_path / "drafted", tmp_path / "valid.txt"
    valid.write_text("The king was old. He had a son.\n\nShe said yes.")
    summary = script.main(["--model", str(tmp_path / "model"), "--output_dir", str(out), "--max_steps", "3",
                           "--train_tokens", "3000", "--validation_file", str(valid)])  # fmt: skip
    assert summary["steps"] == 3 and summary["eval_sentences"] > 0
    assert json.loads((out / "draft_head.json").read_text())["steps"] == 3
    model = type(tiny_sentence_opt(tokenizer)).from_pretrained(out)
    assert model.sentence_vae.parallel_readout is not None
    enc = encode(tokenizer, PROMPTS[:2])
    assert torch.equal(model.generate(**enc, max_new_tokens=20, draft_tokens=3), model.generate(**enc, max_new_tokens=20))
    with pytest.raises(SystemExit, match="not a SentenceLM"):
        from transformers import GPT2Config, GPT2LMHeadModel

        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
        tokenizer.save_pretrained(tmp_path / "gpt2")
        script.main(["--model", str(tmp_path / "gpt2"), "--output_dir", str(tmp_path / "x"), "--max_steps", "1"])
