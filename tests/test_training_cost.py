"""A training step pays only for what it uses: no logits in training mode (``logits_to_keep``),
the output layer fused with the cross-entropy (:func:`output_layer_nll`), sentences run in groups
of similar length, the cross-attention computed once per sentence. Each fast path is compared with
the simple computation it replaces, written out here as the reference: the loss and every
gradient are the same; evaluation tools get the same causal scores."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import encode, tiny_sentence_opt

import sentence_lm.modeling_sentence_vae as modeling_sentence_vae
from sentence_lm import SentenceVAEConfig, SentenceVAEModel
from sentence_lm.cross_entropy import output_layer_nll
from sentence_lm.decoding import CONTINUE, STOP, causal_key_mask

TEXTS = [
    "The value is returned. A list of items, each one a string; the rest follows.",
    "Yes.",
    "An object is created when the class is called: its attributes are set, and it is returned to the caller.",
]


@pytest.fixture
def groups_always(monkeypatch):
    """Group sentences by length even in tiny batches (real batches are large enough)."""
    monkeypatch.setattr(modeling_sentence_vae, "GROUP_MIN_TOKENS", 0)


# ------------------------------------------------------------------------------ references
def reference_decoder_states(vae, ids, mask, vectors):
    """The decoder over every sentence padded to the longest, attending to its vector at every step."""
    decoder_ids = torch.cat([torch.full_like(ids[:, :1], vae.config.bos_token_id), ids], dim=1)
    key_mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
    positions = torch.arange(decoder_ids.shape[1]).expand_as(decoder_ids)
    mask = causal_key_mask(positions[0], positions.shape[1], key_mask)
    conditioning = vae.decoder.conditioning(vectors, precompute=False)  # attend at every step
    return vae.decoder(vae.decoder_token_embeddings()(decoder_ids), positions, mask, conditioning)


def reference_token_nll(vae, ids, mask, vectors):
    """``(n, max_len + 1)`` NLL of every decoder step (0 where there is no target), from full logits."""
    targets = vae.reconstruction_targets(ids, mask)
    logits = vae.lm_head(reference_decoder_states(vae, ids, mask, vectors))
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten().clamp(min=0), reduction="none")
    return nll.view(targets.shape) * (targets != -100)


def reference_vae_loss(vae, ids, mask):
    vectors = vae.encoder(vae.embed_tokens(ids), mask)
    nll = reference_token_nll(vae, ids, mask, vectors)
    return nll.sum() / (vae.reconstruction_targets(ids, mask) != -100).sum()


def reference_sentence_lm_loss(model, input_ids, attention_mask):
    """The whole-text loss without labels, each piece computed the simple way."""
    vae, base = model.sentence_vae, model.model
    content, turn_ends = base.sentence_tokens(input_ids, attention_mask.bool())
    assert not turn_ends.any()  # (texts without an EOS: every stop decision but the last goes on)
    from sentence_lm.segmentation import pack_sentences

    packed = pack_sentences(input_ids, vae.segment(input_ids, content), model.config.pad_token_id)
    vectors = vae.encoder(vae.embed_tokens(packed.input_ids), packed.attention_mask)
    inputs, slot_mask = base.slot_inputs(vectors, packed)
    hidden = base.run_backbone(inputs, slot_mask).last_hidden_state
    first_slot = hidden.shape[1] - 1 - packed.num_sentences
    memory = hidden[packed.batch_index, first_slot[packed.batch_index] + packed.sentence_index]
    token_nll = reference_token_nll(vae, packed.input_ids, packed.attention_mask, memory)
    stop_targets = torch.full(slot_mask.shape, CONTINUE)
    stop_targets[:, -1] = STOP
    stop_nll = F.cross_entropy(model.stop_head(hidden).flatten(0, 1), stop_targets.flatten(), reduction="none")
    stop_nll = stop_nll.view(slot_mask.shape) * slot_mask
    loss = token_nll.sum() + model.config.stop_loss_weight * stop_nll.sum()
    return loss / packed.lengths.sum()


def gradients(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


def assert_same_gradients(model, fast, reference):
    """Every gradient of the fast path equals the reference's; a parameter the fast path leaves
    without one (the cross-attention's query and key, whose one-key softmax is constant) has a
    zero gradient in the reference."""
    for name in reference:
        if fast[name] is None:
            assert reference[name] is None or float(reference[name].abs().max()) < 1e-6, name
            assert "cross_attn" in name, name
        else:
            torch.testing.assert_close(fast[name], reference[name], atol=2e-5, rtol=1e-4, msg=name)


# ------------------------------------------------------------------------------ the loss path
def test_output_layer_nll_equals_the_cross_entropy_of_the_logits():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    upstream = torch.rand(37)
    expected = F.cross_entropy(F.linear(hidden, weight), targets, reduction="none")
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (hidden, weight))
    for chunk_size in (None, 1, 5, 64):
        nll = output_layer_nll(hidden, weight, targets, chunk_size)
        assert nll.dtype == torch.float32
        torch.testing.assert_close(nll, expected)
        for got, want in zip(torch.autograd.grad((nll * upstream).sum(), (hidden, weight)), expected_grads):
            torch.testing.assert_close(got, want)
    with torch.no_grad():
        torch.testing.assert_close(output_layer_nll(hidden, weight, targets), expected)


def test_output_layer_nll_reuses_its_buffer_safely():
    """Two graphs alive at once, and batches of changing size, each get the right gradient
    (the CPU buffer a backward pass gives back serves the next forward pass only)."""
    torch.manual_seed(0)
    weight = torch.randn(30, 8, requires_grad=True)
    for rows in ((10, 10), (12, 5), (3, 40)):
        hiddens = [torch.randn(n, 8, requires_grad=True) for n in rows]
        targets = [torch.randint(0, 30, (n,)) for n in rows]
        fast = sum((i + 1) * output_layer_nll(h, weight, t).sum() for i, (h, t) in enumerate(zip(hiddens, targets)))
        got = torch.autograd.grad(fast, [*hiddens, weight])
        reference = sum(
            (i + 1) * F.cross_entropy(h @ weight.t(), t, reduction="sum") for i, (h, t) in enumerate(zip(hiddens, targets))
        )
        for g, r in zip(got, torch.autograd.grad(reference, [*hiddens, weight])):
            torch.testing.assert_close(g, r)


def test_output_layer_nll_frozen_weight_bf16_and_misuse():
    torch.manual_seed(0)
    hidden = torch.randn(12, 16, requires_grad=True)
    weight = torch.randn(40, 16)  # frozen: no gradient is computed for it
    targets = torch.randint(0, 40, (12,))
    output_layer_nll(hidden, weight, targets).sum().backward()
    assert weight.grad is None and hidden.grad is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nll = output_layer_nll(hidden, weight.requires_grad_(), targets)
        reference = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")
    assert nll.dtype == torch.float32
    torch.testing.assert_close(nll, reference, atol=2e-2, rtol=2e-2)
    nll.sum().backward(retain_graph=True)
    assert weight.grad.dtype == torch.float32
    with pytest.raises(RuntimeError, match="differentiated once"):
        nll.sum().backward()
    with pytest.raises(ValueError, match="chunk_size"):
        output_layer_nll(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match="targets"):
        output_layer_nll(hidden, weight, targets[:3])


@pytest.mark.parametrize("focal_gamma", [0.0, 2.0])
def test_sentence_vae_training_loss_and_gradients_equal_the_simple_path(groups_always, focal_gamma):
    torch.manual_seed(0)
    config = SentenceVAEConfig(
        vocab_size=90, hidden_size=32, num_attention_heads=4, ffn_dim=64, max_sentence_len=12, dropout=0.0,
        focal_gamma=focal_gamma,
    )
    vae = SentenceVAEModel(config).train()
    lengths = torch.tensor([12, 1, 5, 9, 3, 12, 7, 2])
    ids = torch.randint(3, 90, (len(lengths), 12))
    mask = torch.arange(12) < lengths[:, None]
    ids = torch.where(mask, ids, config.pad_token_id)
    out = vae(ids, attention_mask=mask)
    assert out.logits is None  # training mode: the loss only
    fast = gradients(vae, out.loss)
    if focal_gamma == 0:
        reference_loss = reference_vae_loss(vae, ids, mask)
    else:  # the focal weighting of the same per-token terms
        vectors = vae.encoder(vae.embed_tokens(ids), mask)
        nll = reference_token_nll(vae, ids, mask, vectors)[vae.reconstruction_targets(ids, mask) != -100]
        reference_loss = ((1 - torch.exp(-nll)).pow(focal_gamma) * nll).mean()
    torch.testing.assert_close(out.loss, reference_loss)
    assert_same_gradients(vae, fast, gradients(vae, reference_loss))
    # The same model in evaluation mode: logits as before, the same loss.
    vae.eval()
    with torch.no_grad():
        evaluated = vae(ids, attention_mask=mask)
        vectors = vae.encoder(vae.embed_tokens(ids), mask)
        reference_logits = vae.lm_head(reference_decoder_states(vae, ids, mask, vectors))
    steps = vae.reconstruction_targets(ids, mask) != -100
    torch.testing.assert_close(evaluated.logits[steps], reference_logits[steps])
    torch.testing.assert_close(evaluated.loss, out.loss)


@pytest.mark.parametrize("side", ["left", "right"])
def test_sentence_lm_training_loss_and_gradients_equal_the_simple_path(tokenizer, groups_always, side):
    model = tiny_sentence_opt(tokenizer).train()
    batch = encode(tokenizer, TEXTS, side)
    out = model(**batch)
    assert out.logits is None and out.lm_loss is None
    fast = gradients(model, out.loss)
    reference_loss = reference_sentence_lm_loss(model, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(out.loss, reference_loss)
    assert_same_gradients(model, fast, gradients(model, reference_loss))


def test_labelled_training_loss_is_the_evaluation_loss(tokenizer):
    """With labels (a masked prompt) the loss in training mode, from the fused path, equals the
    loss of the evaluation path, which goes through full logits."""
    model = tiny_sentence_opt(tokenizer)
    batch = encode(tokenizer, TEXTS)
    labels = batch["input_ids"].clone()
    labels[:, :12] = -100
    evaluated = model(**batch, labels=labels)
    trained = model.train()(**batch, labels=labels)
    torch.testing.assert_close(trained.loss, evaluated.loss)
    torch.testing.assert_close(trained.nll, evaluated.nll)
    full = model(**batch, labels=labels, logits_to_keep=0)  # training mode, logits asked for
    torch.testing.assert_close(full.logits, evaluated.logits)
    torch.testing.assert_close(full.lm_loss, evaluated.lm_loss)


# ------------------------------------------------------------------------------ logits_to_keep
def test_logits_to_keep_gives_the_same_scores_as_all_positions(tokenizer):
    model = tiny_sentence_opt(tokenizer)
    batch = encode(tokenizer, TEXTS)
    with torch.no_grad():
        every = model(**batch).logits
        assert every.shape[:2] == batch["input_ids"].shape
        torch.testing.assert_close(model(**batch, logits_to_keep=0).logits, every)
        torch.testing.assert_close(model(**batch, logits_to_keep=5).logits, every[:, -5:])
        torch.testing.assert_close(model(**batch, logits_to_keep=1).logits, every[:, -1:])
        positions = torch.tensor([7, 0, 3, 7, -1])
        torch.testing.assert_close(model(**batch, logits_to_keep=positions).logits, every[:, positions])
        none = model(**batch, logits_to_keep=torch.tensor([], dtype=torch.long))
        assert none.logits is None and none.lm_loss is None
        torch.testing.assert_close(none.nll, model(**batch).nll)


@pytest.mark.parametrize(
    "value, match",
    [
        (-1, "not supported"),
        (2.5, "not supported"),
        (True, "not supported"),
        (torch.tensor([[0, 1]]), "1-D"),
        (torch.tensor([0.5]), "integer positions"),
        (torch.tensor([0, 99]), "outside"),
    ],
)
def test_unsupported_logits_to_keep_is_refused_naming_what_is_supported(tokenizer, value, match):
    model = tiny_sentence_opt(tokenizer)
    with pytest.raises(ValueError, match=match) as err:
        model(**encode(tokenizer, TEXTS), logits_to_keep=value)
    assert "int n > 0" in str(err.value) or "outside" in str(err.value)


def test_sentence_vae_refuses_logits_of_chosen_positions():
    vae = SentenceVAEModel(SentenceVAEConfig(vocab_size=40, hidden_size=16, num_attention_heads=2, ffn_dim=32))
    ids = torch.randint(3, 40, (2, 5))
    with pytest.raises(ValueError, match="0 \\(all\\) or an empty tensor"):
        vae(ids, logits_to_keep=2)
    assert vae.eval()(ids, logits_to_keep=torch.tensor([], dtype=torch.long)).logits is None
    assert vae.train()(ids, logits_to_keep=0).logits.shape == (2, 6, 40)


# ------------------------------------------------------------------------------ length groups
def test_length_groups_bound_the_padding():
    lengths = [1, 2, 3, 5, 8, 9, 10, 11, 12, 13, 40, 64] * 10
    groups = modeling_sentence_vae.length_groups(lengths, max_tokens=256)
    rows = sorted(row for group, _ in groups for row in group)
    assert rows == list(range(len(lengths)))  # every sentence exactly once
    for group, width in groups:
        assert width == max(lengths[i] for i in group)
        assert all(lengths[i] * modeling_sentence_vae.GROUP_LENGTH_RATIO >= width for i in group)
        assert len(group) * width <= 256 or len(group) == 1
    padded = sum(len(group) * width for group, width in groups)
    assert padded <= 1.34 * sum(lengths) < len(lengths) * max(lengths)


def test_grouped_encoder_and_decoder_equal_one_padded_pass(groups_always):
    torch.manual_seed(0)
    vae = SentenceVAEModel(
        SentenceVAEConfig(vocab_size=60, hidden_size=16, num_attention_heads=2, ffn_dim=32, max_sentence_len=20)
    ).eval()
    lengths = torch.tensor([20, 1, 4, 13, 2, 20, 6])
    mask = torch.arange(22) < lengths[:, None]  # two all-padding columns too
    ids = torch.where(mask, torch.randint(3, 60, (len(lengths), 22)), vae.config.pad_token_id)
    with torch.no_grad():
        vectors = vae.encode(ids, mask)
        torch.testing.assert_close(vectors, vae.encoder(vae.embed_tokens(ids[:, :20]), mask[:, :20]))
        states = vae.teacher_forced_states(ids[:, :20], mask[:, :20], vectors)
        reference = reference_decoder_states(vae, ids[:, :20], mask[:, :20], vectors)
    steps = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :20]], dim=1)
    torch.testing.assert_close(states[steps], reference[steps])
    assert states.shape == reference.shape


# ------------------------------------------------------------------------------ switches
def test_gradient_checkpointing_and_a_frozen_output_layer(tokenizer, groups_always):
    model = tiny_sentence_opt(tokenizer).train()
    batch = encode(tokenizer, TEXTS)
    plain = gradients(model, model(**batch).loss)
    model.activation_checkpointing_enable()
    checkpointed = gradients(model, model(**batch).loss)
    model.activation_checkpointing_disable()
    for name, grad in plain.items():
        if grad is None:
            assert checkpointed[name] is None, name
        else:
            torch.testing.assert_close(checkpointed[name], grad, msg=name)
    frozen = copy.deepcopy(model)
    frozen.get_input_embeddings().requires_grad_(False)  # tied: the output layer too
    assert frozen.get_output_embeddings().weight.requires_grad is False
    grads = gradients(frozen, frozen(**batch).loss)
    assert grads["model.sentence_vae.embed_tokens.weight"] is None
    for name, grad in grads.items():
        if grad is not None:
            torch.testing.assert_close(grad, plain[name], msg=name)


def test_bf16_autocast_training_step(tokenizer):
    model = tiny_sentence_opt(tokenizer).train()
    batch = encode(tokenizer, TEXTS)
    fp32 = model(**batch).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(**batch).loss
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0.02)
    grads = gradients(model, bf16)
    assert all(g is None or (g.dtype == torch.float32 and torch.isfinite(g).all()) for g in grads.values())


def test_loss_chunk_size_gives_the_same_loss_and_gradients(tokenizer, monkeypatch):
    model = tiny_sentence_opt(tokenizer).train()
    batch = encode(tokenizer, TEXTS)
    whole = gradients(model, model(**batch).loss)
    chunk_sizes = []

    def spy(hidden, weight, targets, chunk_size=None):
        chunk_sizes.append(chunk_size)
        return output_layer_nll(hidden, weight, targets, chunk_size)

    monkeypatch.setattr(modeling_sentence_vae, "output_layer_nll", spy)
    model.config.sentence_vae.loss_chunk_size = 7
    chunked = gradients(model, model(**batch).loss)
    assert chunk_sizes == [7]
    for name, grad in whole.items():
        if grad is not None:
            torch.testing.assert_close(chunked[name], grad, msg=name)
    with pytest.raises(ValueError, match="loss_chunk_size"):
        SentenceVAEConfig(loss_chunk_size=0)
