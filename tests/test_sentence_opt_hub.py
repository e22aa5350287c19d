"""SentenceOPT with a real tokenizer: pipeline("text-generation"), checkpoints that travel
(remote code in a process without sentence_lm, Hugging Face cache layout offline), model card."""

import json

import pytest
import torch
from helpers import check_run, make_hub_cache, run_without_package, tiny_sentence_opt
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer, pipeline

from sentence_lm import SentenceOPTForCausalLM

PROMPTS = ["The object is returned.", "Each argument of the call", ""]


@pytest.fixture(scope="module")
def model(tokenizer):
    model = tiny_sentence_opt(tokenizer, num_hidden_layers=2)
    model.model_card_kwargs = {"results": {"held-out perplexity": 12.5}, "datasets": ["pydoc"], "repo_id": "me/tiny"}
    return model


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("sentence_opt") / "ckpt"
    model.save_pretrained(path)
    return path


def greedy_texts(model, tokenizer, prompts, max_new_tokens=12):
    enc = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=max_new_tokens)
    return tokenizer.batch_decode(out, skip_special_tokens=True)


def test_checkpoint_holds_model_tokenizer_code_and_card(checkpoint):
    names = {p.name for p in checkpoint.iterdir()}
    expected = {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "modeling_sentence_opt.py",
        "tokenization_sentence_lm.py",
        "README.md",
    }
    assert expected <= names
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"].endswith("SentenceOPTForCausalLM")
    card = (checkpoint / "README.md").read_text()
    assert "library_name: transformers" in card and "pipeline_tag: text-generation" in card
    assert "| held-out perplexity | 12.5 |" in card


def test_round_trip_through_auto_classes_gives_the_same_outputs(model, tokenizer, checkpoint):
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert type(loaded) is SentenceOPTForCausalLM
    enc = tokenizer(PROMPTS[:2], padding=True, return_tensors="pt")
    torch.testing.assert_close(loaded(**enc).logits, model(**enc).logits)
    assert greedy_texts(loaded, loaded_tokenizer, PROMPTS) == greedy_texts(model, tokenizer, PROMPTS)


def test_pipeline_from_path_and_from_objects(model, tokenizer, checkpoint):
    from_path = pipeline("text-generation", model=str(checkpoint))
    from_objects = pipeline("text-generation", model=model, tokenizer=tokenizer)
    for generator in (from_path, from_objects):
        single = generator(PROMPTS[0], max_new_tokens=10, do_sample=False)
        assert single[0]["generated_text"].startswith(PROMPTS[0])
        new_only = generator(PROMPTS[0], max_new_tokens=10, do_sample=False, return_full_text=False)
        assert single[0]["generated_text"] == PROMPTS[0] + new_only[0]["generated_text"]
    batch = from_objects(PROMPTS[:2], max_new_tokens=8, do_sample=True, num_return_sequences=3)
    assert [len(rows) for rows in batch] == [3, 3]
    assert all(row["generated_text"].startswith(p) for p, rows in zip(PROMPTS, batch) for row in rows)
    greedy = dict(max_new_tokens=10, do_sample=False)
    assert from_path(PROMPTS[0], **greedy) == from_objects(PROMPTS[0], **greedy)


def test_text_streamer_prints_the_generated_text(model, tokenizer, capsys):
    enc = tokenizer(PROMPTS[0], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=12, min_new_tokens=12, streamer=TextStreamer(tokenizer, skip_special_tokens=True))
    printed = capsys.readouterr().out
    assert printed.strip() == tokenizer.decode(out[0], skip_special_tokens=True).strip()


REMOTE = """
import json, sys
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, pipeline
path = sys.argv[1] if len(sys.argv) > 1 else {path!r}
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
assert "sentence_lm" not in type(model).__module__.split(".")[0], type(model).__module__
base = AutoModel.from_pretrained(path, trust_remote_code=True)
assert type(base).__name__ == "SentenceOPTModel", type(base)
assert base.state_dict().keys() == model.model.state_dict().keys()
generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
print(json.dumps([generator(p, max_new_tokens=12, do_sample=False)[0]["generated_text"] for p in {prompts!r}]))
"""


def expected_texts(model, tokenizer):
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    return [generator(p, max_new_tokens=12, do_sample=False)[0]["generated_text"] for p in PROMPTS[:2]]


@pytest.mark.slow
def test_remote_code_load_without_the_package_generates_the_same_text(model, tokenizer, checkpoint, tmp_path):
    result = check_run(run_without_package(REMOTE.format(path=str(checkpoint), prompts=PROMPTS[:2]), tmp_path))
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected_texts(model, tokenizer)


@pytest.mark.slow
def test_loads_by_repo_id_from_the_hub_cache_offline(model, tokenizer, checkpoint, tmp_path):
    env = make_hub_cache(checkpoint, tmp_path / "hub", "someone/tiny-sentence-opt")
    code = REMOTE.format(path="someone/tiny-sentence-opt", prompts=PROMPTS[:2])
    result = check_run(run_without_package(code, tmp_path, env=env))
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected_texts(model, tokenizer)


def test_loading_a_vae_checkpoint_as_causal_lm_is_refused(tmp_path, model):
    model.sentence_vae.save_pretrained(tmp_path / "vae")
    with pytest.raises(ValueError, match="sentence_vae"):
        SentenceOPTForCausalLM.from_pretrained(tmp_path / "vae")
