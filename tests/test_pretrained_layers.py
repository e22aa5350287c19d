"""Stage-1 lever (issue 17): a new SentenceVAE's encoder and decoder layers started from the token
model's first layers (`from_pretrained_backbone(..., copy_layers=True)`), checked against what the
token model's own modules compute, on every family whose layers map, and the refusals."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from sentence_lm import SentenceLMForCausalLM, SentenceVAEModel

MAPPED = ["opt", "gpt2", "llama", "qwen2", "mistral"]


def copied(token_model, tokenizer, **vae_fields):
    torch.manual_seed(1)
    return SentenceLMForCausalLM.from_pretrained_backbone(
        token_model, tokenizer=tokenizer, copy_layers=True,
        sentence_vae_config=dict(max_sentence_len=tokenizer.max_sentence_len, **vae_fields),
    ).sentence_vae


# Where each family keeps its attention output projection and its first norm.
OUTPUT_PROJECTION = {"gpt2": "attn.c_proj", "opt": "self_attn.out_proj"}
FIRST_NORM = {"gpt2": "ln_1", "opt": "self_attn_layer_norm"}


def token_layers(token_model):
    base = token_model.base_model
    return base.decoder.layers if hasattr(base, "decoder") else (base.h if hasattr(base, "h") else base.layers)


def reference_projections(family: str, layer, x: torch.Tensor, heads: int):
    """Queries, keys and values ``(n, heads, q, head_dim)`` as the token model's own modules make
    them, grouped key/value heads repeated as its attention does (no positions)."""
    if family == "gpt2":
        q, k, v = layer.attn.c_attn(x).split(x.shape[-1], dim=-1)
    else:
        q, k, v = (getattr(layer.self_attn, f"{n}_proj")(x) for n in "qkv")
    n, length, width = x.shape
    head_dim = width // heads
    split = [t.view(n, length, -1, head_dim).transpose(1, 2) for t in (q, k, v)]
    repeat = heads // split[1].shape[1]
    return split[0], split[1].repeat_interleave(repeat, 1), split[2].repeat_interleave(repeat, 1)


def reference_mlp(family: str, layer, x: torch.Tensor) -> torch.Tensor:
    return layer.fc2(F.relu(layer.fc1(x))) if family == "opt" else layer.mlp(x)


@pytest.mark.parametrize("family", MAPPED)
def test_copied_layers_compute_what_the_token_model_layers_compute(family, token_models, tokenizer):
    token_model = token_models[family]
    vae = copied(token_model, tokenizer, num_encoder_layers=2, num_decoder_layers=2)
    heads = token_model.config.num_attention_heads
    layers = token_layers(token_model)
    torch.manual_seed(0)
    x = torch.randn(2, 5, token_model.config.hidden_size)
    with torch.no_grad():
        for stack in (vae.encoder.layers, vae.decoder.layers):
            for index, layer in enumerate(stack):
                source = layers[index]
                torch.testing.assert_close(layer.ffn(x), reference_mlp(family, source, x))
                q, k, v = reference_projections(family, source, x, heads)
                attention = F.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v
                expected = attention.transpose(1, 2).reshape(x.shape)
                expected = source.get_submodule(OUTPUT_PROJECTION.get(family, "self_attn.o_proj"))(expected)
                mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
                torch.testing.assert_close(layer.self_attn(x, attention_mask=mask), expected)
        norm = layers[0].get_submodule(FIRST_NORM.get(family, "input_layernorm"))
        torch.testing.assert_close(vae.encoder.layers[0].self_attn_layer_norm.weight, norm.weight)
        copy_norm = vae.encoder.layers[0].self_attn_layer_norm
        assert isinstance(copy_norm, torch.nn.RMSNorm) == (family in ("llama", "qwen2", "mistral"))
        if getattr(norm, "bias", None) is None and not isinstance(copy_norm, torch.nn.RMSNorm):
            assert not copy_norm.bias.any()
    assert vae.config.gated_ffn == (family in ("llama", "qwen2", "mistral"))


def test_copied_layers_train_save_and_load(token_models, tokenizer, tmp_path):
    vae = copied(token_models["llama"], tokenizer)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 1]])
    mask = ids != 1
    vae.train()
    vae(input_ids=ids, attention_mask=mask).loss.backward()
    assert vae.encoder.layers[0].ffn.gate_proj.weight.grad.abs().sum() > 0
    vae.eval().save_pretrained(tmp_path)
    loaded = SentenceVAEModel.from_pretrained(tmp_path).eval()
    assert loaded.config.gated_ffn and loaded.config.activation_function == "silu"
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).loss, vae(input_ids=ids, attention_mask=mask).loss)


def test_new_layers_are_not_copied(token_models, tokenizer):
    token_model = token_models["llama"]
    torch.manual_seed(1)
    vae = SentenceLMForCausalLM.from_pretrained_backbone(
        token_model, tokenizer=tokenizer, sentence_vae_config=dict(max_sentence_len=16, gated_ffn=True,
                                                                    activation_function="silu")
    ).sentence_vae
    x = torch.randn(1, 3, 32)
    with torch.no_grad():
        assert not torch.allclose(vae.encoder.layers[0].ffn(x), token_layers(token_model)[0].mlp(x))


@pytest.mark.parametrize(
    "family, fields, message",
    [
        ("gemma", {}, "activation"),
        ("phi", {}, "Llama-, OPT- or GPT-2-style"),
        ("llama", {"num_encoder_layers": 3}, "only 2 to copy"),
        ("llama", {"gated_ffn": False}, "set gated_ffn to match"),
        ("llama", {"num_attention_heads": 8}, "same number of heads"),
        ("llama", {"ffn_dim": 48}, "feed-forward size"),
    ],
)
def test_layers_that_cannot_be_copied_are_refused(family, fields, message, token_models, tokenizer):
    with pytest.raises(ValueError, match=message):
        copied(token_models[family], tokenizer, **fields)


def test_copy_layers_needs_a_new_sentence_vae(token_models, tokenizer, sentence_lms):
    with pytest.raises(ValueError, match="copy_layers"):
        SentenceLMForCausalLM.from_pretrained_backbone(
            token_models["llama"], tokenizer=tokenizer, sentence_vae=sentence_lms["llama"].sentence_vae, copy_layers=True
        )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_decoder_can_start_from_the_token_models_last_layers(family, token_models, tokenizer):
    """``copy_layers="last"``: a 1-layer decoder from the token model's last layer (of 2) and its
    final norm, the encoder still from its first; ``True`` and ``"first"`` are the same (the decoder's
    final norm stays new)."""
    token_model = copy.deepcopy(token_models[family])
    final_norm = token_model.transformer.ln_f if family == "gpt2" else token_model.model.norm
    with torch.no_grad():
        final_norm.weight.uniform_(0.5, 1.5)
        if getattr(final_norm, "bias", None) is not None:
            final_norm.bias.uniform_(-0.5, 0.5)
    layers = token_layers(token_model)
    assert len(layers) == 2
    last = SentenceLMForCausalLM.from_pretrained_backbone(
        token_model, tokenizer=tokenizer, copy_layers="last",
        sentence_vae_config=dict(max_sentence_len=tokenizer.max_sentence_len, num_decoder_layers=1),
    ).sentence_vae  # fmt: skip
    first = copied(token_model, tokenizer, num_decoder_layers=1)
    x = torch.randn(2, 5, token_model.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(last.decoder.layers[0].ffn(x), reference_mlp(family, layers[1], x))
        torch.testing.assert_close(first.decoder.layers[0].ffn(x), reference_mlp(family, layers[0], x))
        torch.testing.assert_close(last.encoder.layers[0].ffn(x), reference_mlp(family, layers[0], x))
    assert torch.equal(last.decoder.layer_norm.weight, final_norm.weight)
    if family == "gpt2":
        assert torch.equal(last.decoder.layer_norm.bias, final_norm.bias)
    else:  # RMSNorm on both sides: no bias
        assert getattr(last.decoder.layer_norm, "bias", None) is None
    assert torch.equal(first.decoder.layer_norm.weight, torch.ones_like(final_norm.weight))
    with pytest.raises(ValueError, match="copy_layers must be True, False, 'first', 'last' or a list"):
        SentenceLMForCausalLM.from_pretrained_backbone(token_model, tokenizer=tokenizer, copy_layers="middle")
    # Listed token layers: [1] is "last" here; [0] takes the first layer but, unlike "first", the final norm too.
    listed = {}
    for indices in ([1], [0]):
        listed[indices[0]] = SentenceLMForCausalLM.from_pretrained_backbone(
            token_model, tokenizer=tokenizer, copy_layers=indices,
            sentence_vae_config=dict(max_sentence_len=tokenizer.max_sentence_len, num_decoder_layers=1),
        ).sentence_vae  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(listed[1].decoder.layers[0].ffn(x), reference_mlp(family, layers[1], x))
        torch.testing.assert_close(listed[0].decoder.layers[0].ffn(x), reference_mlp(family, layers[0], x))
    assert torch.equal(listed[0].decoder.layer_norm.weight, final_norm.weight)
    assert not listed[0].decoder.layers[0].cross_attn.out_proj.weight.any()
    for indices, message in (([0, 1], "decoder has 1 layers but 2"), ([2], "out of range"), (["a"], "list of layer indices")):
        with pytest.raises(ValueError, match=message):
            SentenceLMForCausalLM.from_pretrained_backbone(
                token_model, tokenizer=tokenizer, copy_layers=indices,
                sentence_vae_config=dict(max_sentence_len=tokenizer.max_sentence_len, num_decoder_layers=1),
            )  # fmt: skip


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_a_decoder_of_all_the_token_models_layers_computes_its_logits(family, token_models, tokenizer):
    """From a rotary token model the SentenceVAE takes rotary positions and RMSNorm: a decoder of
    all its layers (``copy_layers="last"``, its new cross-attention starting at zero output) gives
    the token model's own logits on the same tokens, whatever the sentence vector."""
    token_model = token_models[family]
    count = len(token_layers(token_model))
    vae = SentenceLMForCausalLM.from_pretrained_backbone(
        token_model, tokenizer=tokenizer, copy_layers="last",
        sentence_vae_config=dict(max_sentence_len=tokenizer.max_sentence_len, num_decoder_layers=count),
    ).sentence_vae.eval()  # fmt: skip
    assert (vae.config.position_embedding, vae.config.norm) == ("rotary", "rms_norm")
    assert vae.config.rope_theta == token_model.config.rope_parameters["rope_theta"]
    assert vae.config.tie_word_embeddings == token_model.config.tie_word_embeddings
    ids = torch.randint(3, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(ids.shape[1])
    causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()[None, None]
    with torch.no_grad():
        conditioning = vae.decoder.conditioning(torch.randn(2, vae.config.hidden_size))
        states = vae.decoder(vae.decoder_token_embeddings()(ids), positions[None], causal, conditioning)
        torch.testing.assert_close(vae.lm_head(states), token_model(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_with_a_context_window_the_copied_decoder_continues_the_text(family, token_models, tokenizer):
    """With a ``context_window`` the decoder's first input is the context's last token (not BOS),
    so a decoder of all the token model's layers scores a sentence as the token model scores it
    after the text's last ``context_window`` tokens; where the text before holds none, after BOS."""
    token_model = token_models[family]
    count, window = len(token_layers(token_model)), 4
    vae = SentenceLMForCausalLM.from_pretrained_backbone(
        token_model, tokenizer=tokenizer, copy_layers="last",
        sentence_vae_config=dict(max_sentence_len=tokenizer.max_sentence_len, num_decoder_layers=count,
                                 context_window=window),
    ).sentence_vae.eval()  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    sentences = torch.randint(3, len(tokenizer), (2, 6), generator=generator)
    before = torch.randint(3, len(tokenizer), (2, window), generator=generator)
    valid = torch.tensor([[True] * window, [False] * window])  # the second sentence opens its text
    mask = torch.ones_like(sentences, dtype=torch.bool)
    with torch.no_grad():
        logits = vae.lm_head(vae.teacher_forced_states(sentences, mask, torch.randn(2, vae.config.hidden_size),
                                                       context=(before, valid)))  # fmt: skip
        after_context = token_model(torch.cat([before[:1], sentences[:1]], dim=1)).logits[:, window - 1 :]
        after_bos = token_model(torch.cat([torch.tensor([[tokenizer.bos_token_id]]), sentences[1:]], dim=1)).logits
    torch.testing.assert_close(logits[:1], after_context, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1:], after_bos, atol=1e-4, rtol=1e-4)
