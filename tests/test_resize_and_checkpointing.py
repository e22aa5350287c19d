"""`resize_token_embeddings` on SentenceLMs and SentenceVAEs (nested config, tied weights, the
decoder's own embeddings, the boundary table, new ids in forward/generate, save/load, refusal
below the special ids) and gradient checkpointing of the SentenceVAE's layers (same loss and
gradients, fewer saved activations), on tiny models."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from helpers import assert_same_weights, encode, tiny_sentence_opt
from sentence_lm import SentenceOPTForCausalLM, SentenceVAEConfig, SentenceVAEModel
from sentence_lm.segmentation import ENDS

NEW_SPECIAL = ["<|im_start|>", "<|im_end|>"]
NEW_WORD = "zqxj."  # an added (non-special) token that ends a sentence
TEXTS = ["<|im_start|>The cat sat on the mat. It was warm.<|im_end|>", "Hello there zqxj. How are you?"]


@pytest.fixture()
def grown_tokenizer(tokenizer):
    grown = copy.deepcopy(tokenizer)
    grown.add_special_tokens({"additional_special_tokens": NEW_SPECIAL})
    grown.add_tokens([NEW_WORD])
    assert len(grown) == len(tokenizer) + 3
    return grown


def tiny_vae(share_embeddings: bool = True, vocab_size: int = 100, **fields) -> SentenceVAEModel:
    torch.manual_seed(0)
    config = SentenceVAEConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_attention_heads=4,
        ffn_dim=64,
        max_sentence_len=12,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dropout=0.0,
        share_embeddings=share_embeddings,
        **fields,
    )
    return SentenceVAEModel(config)


def packed_batch(vocab_size: int = 100, n: int = 6, width: int = 10, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (n, width), generator=generator)
    lengths = torch.randint(2, width + 1, (n,), generator=generator)
    lengths[0] = width
    mask = torch.arange(width)[None, :] < lengths[:, None]
    return ids.masked_fill(~mask, 1), mask.long()


# --------------------------------------------------------------------------------- resizing


def test_resize_sentence_lm_for_new_tokens(tokenizer, grown_tokenizer, tmp_path):
    """The usual recipe: add tokens to the tokenizer, then resize to len(tokenizer)."""
    model = tiny_sentence_opt(tokenizer)
    old_embeddings = model.get_input_embeddings().weight.detach().clone()
    old_table = model.sentence_vae.boundary_table.clone()
    model.tokenizer = grown_tokenizer
    size = len(grown_tokenizer)

    embeddings = model.resize_token_embeddings(size)

    vae = model.sentence_vae
    assert embeddings is vae.embed_tokens and embeddings.weight.shape == (size, 32)
    assert model.config.vocab_size == model.config.sentence_vae.vocab_size == vae.config.vocab_size == size
    assert vae.lm_head.weight is vae.embed_tokens.weight  # still tied
    assert model.get_output_embeddings().out_features == size
    assert torch.equal(embeddings.weight[: len(tokenizer)], old_embeddings)
    # The boundary table: old rows kept, new rows from the attached tokenizer.
    table = vae.boundary_table
    assert table.shape == (size,) and table.dtype == torch.uint8
    assert torch.equal(table[: len(tokenizer)], old_table)
    assert torch.equal(table, grown_tokenizer.boundary_table)
    special = grown_tokenizer.convert_tokens_to_ids(NEW_SPECIAL)
    assert table[special].tolist() == [0, 0]  # special tokens are never boundaries
    assert int(table[grown_tokenizer.convert_tokens_to_ids(NEW_WORD)]) & ENDS

    batch = encode(grown_tokenizer, TEXTS)
    assert int(batch["input_ids"].max()) >= len(tokenizer)  # the new ids are in use
    out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape[-1] == size and torch.isfinite(out.loss)
    out.loss.backward()
    assert vae.embed_tokens.weight.grad[special].abs().sum() > 0  # new rows are trained
    model.zero_grad()
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert generated.shape[0] == 2 and int(generated.max()) < size

    model.save_pretrained(tmp_path)
    loaded = SentenceOPTForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.vocab_size == loaded.config.sentence_vae.vocab_size == size
    assert loaded.sentence_vae.lm_head.weight is loaded.sentence_vae.embed_tokens.weight
    assert torch.equal(loaded.sentence_vae.boundary_table, table)
    assert_same_weights(model, loaded)
    with torch.no_grad():
        # Same weights, same code; float rounding may differ in the last bits between two models.
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=1e-6, atol=1e-5)


def test_resize_without_tokenizer_pads_to_multiple(tokenizer):
    """Without an attached tokenizer the new ids are not boundaries (0); pad_to_multiple_of rounds up."""
    model = tiny_sentence_opt(tokenizer)
    model.tokenizer = None
    old_table = model.sentence_vae.boundary_table.clone()
    model.resize_token_embeddings(len(tokenizer) + 3, pad_to_multiple_of=64)
    size = 64 * -(-(len(tokenizer) + 3) // 64)
    vae = model.sentence_vae
    assert model.config.vocab_size == size and vae.embed_tokens.weight.shape[0] == size
    assert vae.lm_head.weight is vae.embed_tokens.weight
    assert torch.equal(vae.boundary_table[: len(tokenizer)], old_table)
    assert not vae.boundary_table[len(tokenizer) :].any()
    ids = torch.tensor([[2, 100, size - 1, 17, 200]])
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, 5, size) and torch.isfinite(out.loss)
    # pad_to_multiple_of alone pads the current size.
    model.resize_token_embeddings(pad_to_multiple_of=100)
    assert model.config.vocab_size == 100 * -(-size // 100)


@pytest.mark.parametrize("share_embeddings", [True, False])
def test_resize_sentence_vae(share_embeddings, tmp_path):
    model = tiny_vae(share_embeddings).eval()
    table = torch.zeros(100, dtype=torch.uint8)
    table[10] = ENDS
    model.set_boundary_table(table)
    model.resize_token_embeddings(120)

    assert model.config.vocab_size == 120
    assert model.embed_tokens.weight.shape == (120, 32) and model.lm_head.weight.shape == (120, 32)
    decoder_embeddings = model.decoder_token_embeddings()
    assert decoder_embeddings.weight.shape == (120, 32)
    assert model.lm_head.weight is decoder_embeddings.weight  # tied to the decoder's table
    assert (decoder_embeddings is model.embed_tokens) == share_embeddings
    assert model.boundary_table.shape == (120,) and int(model.boundary_table[10]) == ENDS
    assert not model.boundary_table[100:].any()

    ids, mask = packed_batch(120)
    ids[0, 0] = 119
    with torch.no_grad():
        out = model(ids, mask)
        decoded = model.decode(out.sentence_vectors, max_new_tokens=4)
    assert out.logits.shape[-1] == 120 and torch.isfinite(out.loss)
    assert int(decoded.sequences.max()) < 120

    model.save_pretrained(tmp_path)
    loaded = SentenceVAEModel.from_pretrained(tmp_path).eval()
    assert loaded.config.vocab_size == 120
    assert loaded.lm_head.weight is loaded.decoder_token_embeddings().weight
    assert torch.equal(loaded.boundary_table, model.boundary_table)
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask).logits, out.logits)

    model.resize_token_embeddings(50)  # shrinking above the special ids works too
    assert model.config.vocab_size == 50 and model.decoder_token_embeddings().weight.shape[0] == 50
    assert model.boundary_table.shape == (50,) and int(model.boundary_table[10]) == ENDS


def test_resize_below_special_ids_is_refused(tokenizer):
    model = tiny_sentence_opt(tokenizer)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    assert model.config.eos_token_id == 2
    fix = r"the eos token id is 2, outside.*at least 3 tokens.*resize_token_embeddings\(len\(tokenizer\)\)"
    with pytest.raises(ValueError, match=fix):
        model.resize_token_embeddings(2)
    with pytest.raises(ValueError, match="at least 3"):
        model.sentence_vae.resize_token_embeddings(1)
    # Nothing changed.
    assert model.config.vocab_size == len(tokenizer)
    assert_same_weights(before, model)
    vae = tiny_vae(pad_token_id=40)
    with pytest.raises(ValueError, match="the pad token id is 40, outside"):
        vae.resize_token_embeddings(30)
    assert vae.config.vocab_size == 100


# --------------------------------------------------------------------------------- checkpointing


def saved_bytes(run) -> tuple[int, object]:
    """Bytes of the tensors autograd keeps for the backward pass while ``run()`` runs (those
    saved inside a checkpointed layer are not kept: the checkpoint recomputes them); and
    ``run()``'s result."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    return total, result


def loss_and_grads(model, run):
    model.zero_grad(set_to_none=True)
    nbytes, loss = saved_bytes(run)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return nbytes, loss.detach(), grads


def vae_layers(vae):
    return [*vae.encoder.layers, *vae.decoder.layers]


def check_same(reference, checkpointed):
    (_, loss, grads), (_, loss_ckpt, grads_ckpt) = reference, checkpointed
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads.keys() == grads_ckpt.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], msg=name)


@pytest.mark.parametrize("method", ["gradient_checkpointing_enable", "activation_checkpointing_enable"])
def test_sentence_vae_gradient_checkpointing(method):
    model = tiny_vae().train()
    ids, mask = packed_batch()

    def run():
        return model(ids, mask).loss

    reference = loss_and_grads(model, run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing_enable is deprecated in 5.24
        getattr(model, method)()
    assert model.is_activation_checkpointing
    assert all(layer.gradient_checkpointing for layer in vae_layers(model))
    checkpointed = loss_and_grads(model, run)
    check_same(reference, checkpointed)
    assert checkpointed[0] < reference[0] / 2, (checkpointed[0], reference[0])

    model.activation_checkpointing_disable()
    assert not any(layer.gradient_checkpointing for layer in vae_layers(model))
    assert loss_and_grads(model, run)[0] == reference[0]
    # Inference (no gradients) is unaffected by it.
    model.activation_checkpointing_enable()
    with torch.no_grad():
        vectors = model.eval().encode(ids, mask)
        assert model.decode(vectors, max_new_tokens=3).sequences.shape[0] == ids.shape[0]


def test_sentence_lm_gradient_checkpointing_covers_sentence_vae(tokenizer):
    model = tiny_sentence_opt(tokenizer, sentence_vae=dict(num_encoder_layers=2, num_decoder_layers=2)).train()
    batch = encode(tokenizer, ["The cat sat on the mat. It was warm. Then it left.", "Hello there. How are you?"])

    def run():
        return model(**batch, labels=batch["input_ids"]).loss

    reference = loss_and_grads(model, run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable()
    layers = vae_layers(model.sentence_vae)
    assert all(layer.gradient_checkpointing for layer in layers)
    checkpointed = loss_and_grads(model, run)
    check_same(reference, checkpointed)
    assert checkpointed[0] < reference[0], (checkpointed[0], reference[0])

    # The SentenceVAE's layers account for a good part of what checkpointing saves: with only
    # the backbone's layers checkpointed (the behaviour before), more activations are kept.
    for layer in layers:
        layer.gradient_checkpointing = False
    backbone_only = loss_and_grads(model, run)
    check_same(reference, backbone_only)
    assert checkpointed[0] < backbone_only[0] < reference[0], (checkpointed[0], backbone_only[0], reference[0])
    assert backbone_only[0] - checkpointed[0] > (reference[0] - checkpointed[0]) / 2
