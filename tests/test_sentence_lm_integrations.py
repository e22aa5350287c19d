"""SentenceLM over non-OPT backbones (Llama, GPT-2) with the tools users bring: the
text-generation pipeline (from objects and from a saved path), `TextStreamer`, and PEFT LoRA
adapters on the backbone's attention (train, save, reload, merge)."""

import copy

import pytest
import torch
from helpers import assert_same_weights
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, TextStreamer, pipeline

from sentence_lm import SentenceLMForCausalLM

PROMPTS = ["The object is returned.", "Each argument of the call"]
TEXTS = ["The object is returned. Each argument of the call is evaluated.", "Hello, world!"]
FAMILIES = ["llama", "gpt2"]


def make_sentence_lm(family: str, tokenizer) -> SentenceLMForCausalLM:
    """A tiny random SentenceLM (2 backbone layers of width 32) built from a token model of
    ``family`` with ``from_pretrained_backbone``; the same weights every call."""
    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if family == "llama":
        config = LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, **ids,
        )  # fmt: skip
    else:
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **ids)
    torch.manual_seed(0)
    token_model = AutoModelForCausalLM.from_config(config).eval()
    model = SentenceLMForCausalLM.from_pretrained_backbone(
        token_model, tokenizer=tokenizer, sentence_vae_config=dict(max_sentence_len=tokenizer.max_sentence_len)
    ).eval()
    with torch.no_grad():  # random weights would often stop at once; make texts run on
        model.stop_head.bias.copy_(torch.tensor([3.0, -3.0]))
    return model


@pytest.fixture(scope="module")
def tok(tokenizer):
    """A private copy of the session tokenizer: pipelines set `padding_side` on theirs."""
    return copy.deepcopy(tokenizer)


@pytest.fixture(scope="module")
def models(tok):
    return {family: make_sentence_lm(family, tok) for family in FAMILIES}


@pytest.fixture(scope="module")
def checkpoints(models, tmp_path_factory):
    paths = {}
    for family, model in models.items():
        paths[family] = tmp_path_factory.mktemp(family) / "ckpt"
        model.save_pretrained(paths[family])  # with its tokenizer (attached by from_pretrained_backbone)
    return paths


def generated_text(model, tokenizer, prompt, max_new_tokens=12):
    """What `model.generate` writes after ``prompt`` (greedy), decoded as the pipeline decodes."""
    enc = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


# ------------------------------------------------------------------------------- pipeline
@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_from_objects_and_from_a_path_writes_what_generate_writes(family, models, checkpoints, tok):
    model = models[family]
    from_objects = pipeline("text-generation", model=model, tokenizer=tok)
    from_path = pipeline("text-generation", model=str(checkpoints[family]))
    assert type(from_path.model) is SentenceLMForCausalLM
    assert type(from_path.model.model.backbone) is type(model.model.backbone)
    greedy = dict(max_new_tokens=12, do_sample=False)
    for prompt in PROMPTS:
        new = generated_text(model, tok, prompt)
        assert new.strip(), (family, prompt)  # the model writes something (the stop head is biased to go on)
        for generator in (from_objects, from_path):
            full = generator(prompt, **greedy)
            assert full == [{"generated_text": prompt + new}], (family, prompt)
            assert generator(prompt, return_full_text=False, **greedy) == [{"generated_text": new}]
    # A batch of prompts, several sampled continuations each, all continue their prompt.
    torch.manual_seed(0)
    batch = from_objects(PROMPTS, max_new_tokens=8, do_sample=True, num_return_sequences=2)
    assert [len(rows) for rows in batch] == [2, 2]
    assert all(row["generated_text"].startswith(p) for p, rows in zip(PROMPTS, batch) for row in rows)
    # The empty prompt starts from the start-of-text state.
    assert from_objects("", return_full_text=False, **greedy) == [{"generated_text": generated_text(model, tok, "")}]


@pytest.mark.parametrize("family", FAMILIES)
def test_text_streamer_prints_the_generated_text(family, models, tok, capsys):
    model = models[family]
    enc = tok(PROMPTS[0], return_tensors="pt")
    capsys.readouterr()
    streamer = TextStreamer(tok, skip_special_tokens=True)
    out = model.generate(**enc, max_new_tokens=12, min_new_tokens=12, streamer=streamer)
    printed = capsys.readouterr().out
    assert printed.strip() == tok.decode(out[0], skip_special_tokens=True).strip()
    assert printed.strip().startswith(PROMPTS[0]) and len(printed.strip()) > len(PROMPTS[0])
    # Through the pipeline, with skip_prompt, the streamer prints exactly the new text.
    generator = pipeline("text-generation", model=model, tokenizer=tok)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    result = generator(PROMPTS[1], max_new_tokens=12, do_sample=False, return_full_text=False, streamer=streamer)
    assert capsys.readouterr().out.strip() == result[0]["generated_text"].strip() != ""


# ----------------------------------------------------------------------------------- PEFT
# The backbone's attention projections only: the SentenceVAE's attention has the same names
# (q_proj, v_proj), which a plain list ["q_proj", "v_proj"] would adapt too.
BACKBONE_QV = r".*backbone\.layers\.\d+\.self_attn\.(q_proj|v_proj)"


def logits_of(model, enc):
    with torch.no_grad():
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits


def test_lora_on_the_backbone_trains_saves_reloads_and_merges(tok, tmp_path):
    import peft  # the `test` extra installs it
    base = make_sentence_lm("llama", tok)
    base.save_pretrained(tmp_path / "base")
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    base_logits = logits_of(base, enc)
    frozen_before = {k: v.clone() for k, v in base.state_dict().items()}

    config = peft.LoraConfig(r=8, lora_alpha=32, target_modules=BACKBONE_QV, task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, config)
    assert type(model).__name__ == "PeftModelForCausalLM"
    adapted = {name for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {
        f"base_model.model.model.backbone.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")
    }
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert len(trainable) == 2 * len(adapted)  # lora_A and lora_B of each
    # LoRA B starts at zero: the adapted model starts as the base model.
    torch.testing.assert_close(logits_of(model, enc), base_logits)

    # A few optimizer steps on a fixed batch lower its loss.
    def loss_now():
        with torch.no_grad():
            return model(**enc).loss.item()

    before = loss_now()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    torch.manual_seed(0)
    for _ in range(8):
        loss = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=enc["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert loss_now() < before - 0.02  # measured in eval mode, so any fall is real (8.630 -> 8.594)
    adapted_logits = logits_of(model, enc)
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-3)
    # Only the adapters moved.
    wrapped = model.get_base_model().state_dict()
    unwrapped = {k.replace(".base_layer.", "."): v for k, v in wrapped.items() if "lora_" not in k}
    assert_same_weights(unwrapped, frozen_before, close=True)

    # The adapter alone is saved, and reloaded onto a freshly loaded base model.
    model.save_pretrained(tmp_path / "adapter")
    saved = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= saved and "model.safetensors" not in saved
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    torch.testing.assert_close(logits_of(fresh, enc), base_logits)
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    torch.testing.assert_close(logits_of(loaded, enc), adapted_logits)
    prompt = tok(PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    prompt.pop("sentence_ids")
    peft_generated = loaded.generate(**prompt, max_new_tokens=10, do_sample=False)

    # Merged into the weights, it is a plain SentenceLM again with the adapted outputs.
    merged = loaded.merge_and_unload()
    assert type(merged) is SentenceLMForCausalLM
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits_of(merged, enc), adapted_logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(merged.generate(**prompt, max_new_tokens=10, do_sample=False), peft_generated)
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits_of(again, enc), logits_of(merged, enc))


def test_lora_gradients_are_the_same_with_gradient_checkpointing(tok):
    import peft  # the `test` extra installs it
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    grads = []
    for checkpointing in (False, True):
        base = make_sentence_lm("llama", tok)
        if checkpointing:
            base.activation_checkpointing_enable()  # transformers 5's name of gradient_checkpointing_enable
        # Random (nonzero) B as well as A, so that every adapter weight gets a gradient.
        config = peft.LoraConfig(r=4, target_modules=BACKBONE_QV, task_type="CAUSAL_LM", init_lora_weights=False)
        torch.manual_seed(1)
        model = peft.get_peft_model(base, config).train()
        assert model.get_base_model().model.backbone.gradient_checkpointing is checkpointing
        torch.manual_seed(2)
        model(**enc).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 8
    for name, grad in grads[0].items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grad, msg=name)
