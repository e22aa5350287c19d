"""SentenceVAEConfig / SentenceVAEModel: validation, loss, batch invariance, cached decoding,
input errors, and safe checkpoints (round trip, remote code without the package, hub cache
offline, atomic save, refused checkpoints)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import check_run, make_hub_cache, run_without_package
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    LogitsProcessor,
    LogitsProcessorList,
    OPTConfig,
    OPTForCausalLM,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)

from sentence_lm import SentenceVAEConfig, SentenceVAEModel, pack_sentences
from sentence_lm.checkpointing import check_safetensors_file

VOCAB, PAD, BOS, EOS, MAX_LEN, HIDDEN = 1024, 1, 2, 2, 16, 32


def tiny_config(**overrides) -> SentenceVAEConfig:
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_attention_heads=4,
        ffn_dim=64,
        max_sentence_len=MAX_LEN,
        dropout=0.0,
    )
    fields.update(overrides)
    return SentenceVAEConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> SentenceVAEModel:
    torch.manual_seed(seed)
    return SentenceVAEModel(tiny_config(**overrides)).eval()


@pytest.fixture(scope="module")
def model() -> SentenceVAEModel:
    return tiny_model()


def right_pad(rows: list[list[int]], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    width = width or max(len(r) for r in rows)
    ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(r) for r in rows), default=0)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows], dtype=torch.long).reshape(len(rows), width)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long).reshape(len(rows), width)
    return ids, mask


def random_sentences(lengths, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]


SENTENCES = random_sentences([5, 16, 1, 9, 12])


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "field, value",
    [
        ("vocab_size", 0),
        ("vocab_size", True),
        ("hidden_size", -4),
        ("num_attention_heads", 0),
        ("ffn_dim", 0),
        ("num_encoder_layers", 0),
        ("num_decoder_layers", 2.0),
        ("max_sentence_len", 1),
        ("max_sentence_len", 0),
        ("dropout", 1.0),
        ("attention_dropout", -0.1),
        ("fusion", "max"),
        ("position_embedding", "alibi"),
        ("activation_function", "tanh"),
        ("focal_gamma", -1.0),
        ("pad_token_id", VOCAB),
        ("bos_token_id", -1),
        ("eos_token_id", None),
    ],
)
def test_config_rejects_invalid_field(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        tiny_config(**{field: value})


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="hiden_size") as info:
        tiny_config(hiden_size=64)
    assert "hidden_size" in str(info.value)  # lists the valid keys


def test_config_heads_must_divide_hidden():
    with pytest.raises(ValueError, match="num_attention_heads.*must divide.*hidden_size"):
        tiny_config(hidden_size=30, num_attention_heads=4)


def test_config_refuses_other_version():
    with pytest.raises(ValueError, match="config_version=0"):
        tiny_config(config_version=0)


def test_config_round_trip(tmp_path):
    config = tiny_config(fusion="mean", focal_gamma=2.0)
    config.save_pretrained(tmp_path)
    again = SentenceVAEConfig.from_pretrained(tmp_path)
    assert again.to_dict() == config.to_dict()


def test_checkpoint_with_older_config_version_is_refused(tmp_path, model):
    model.save_pretrained(tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "config.json"
    data = json.loads(config_file.read_text())
    data["config_version"] = 0
    config_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="config_version"):
        SentenceVAEModel.from_pretrained(tmp_path / "ckpt")


# ------------------------------------------------------------------------------------ forward
def test_forward_shapes_and_finite_loss(model):
    ids, mask = right_pad(SENTENCES)
    out = model(ids, attention_mask=mask)
    assert out.logits.shape == (len(SENTENCES), MAX_LEN + 1, VOCAB)
    assert out.sentence_vectors.shape == (len(SENTENCES), HIDDEN)
    assert torch.isfinite(out.loss)
    loss, logits, vectors = model(ids, attention_mask=mask, return_dict=False)
    assert torch.equal(loss, out.loss) and torch.equal(vectors, out.sentence_vectors)


def test_loss_is_cross_entropy_over_tokens_and_eos(model):
    ids, mask = right_pad(SENTENCES)
    out = model(ids, attention_mask=mask)
    pieces = [F.cross_entropy(out.logits[i, : len(s) + 1], torch.tensor(s + [EOS]), reduction="sum")
              for i, s in enumerate(SENTENCES)]
    expected = torch.stack(pieces).sum() / sum(len(s) + 1 for s in SENTENCES)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)


def test_loss_decreases_with_training():
    model = tiny_model().train()
    ids, mask = right_pad(SENTENCES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(ids, attention_mask=mask).loss
        assert torch.isfinite(loss)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < 0.8 * losses[0], losses


def reference_focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float) -> torch.Tensor:
    """The reconstruction loss from full logits: mean (focal) cross-entropy over the targets."""
    valid = targets != -100
    nll = -logits[valid].float().log_softmax(dim=-1).gather(1, targets[valid][:, None]).squeeze(1)
    return ((1 - torch.exp(-nll)).pow(gamma) * nll).mean()


def test_focal_loss_differs_from_cross_entropy(model):
    focal = SentenceVAEModel(tiny_config(focal_gamma=2.0)).eval()
    focal.load_state_dict(model.state_dict())
    ids, mask = right_pad(SENTENCES)
    ce_out, focal_out = model(ids, attention_mask=mask), focal(ids, attention_mask=mask)
    torch.testing.assert_close(ce_out.logits, focal_out.logits)
    assert torch.isfinite(focal_out.loss)
    assert focal_out.loss < ce_out.loss  # (1 - p)^gamma < 1 shrinks every term
    targets = model.reconstruction_targets(ids[:, :MAX_LEN], mask[:, :MAX_LEN].bool())
    torch.testing.assert_close(focal_out.loss, reference_focal_loss(ce_out.logits, targets, gamma=2.0))
    torch.testing.assert_close(ce_out.loss, reference_focal_loss(ce_out.logits, targets, gamma=0.0))


@pytest.mark.parametrize("fusion", ["learnable", "sum", "mean"])
@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "rotary"])
def test_packed_batch_gives_each_sentence_its_own_vector(fusion, positions):
    model = tiny_model(fusion=fusion, position_embedding=positions)
    ids, mask = right_pad(SENTENCES, width=MAX_LEN + 3)  # extra all-padding columns too
    packed_vectors = model.encode(ids, mask)
    packed_logits = model(ids, attention_mask=mask).logits
    for i, sentence in enumerate(SENTENCES):
        alone = torch.tensor([sentence])
        torch.testing.assert_close(packed_vectors[i : i + 1], model.encode(alone), atol=1e-5, rtol=0)
        alone_logits = model(alone).logits
        n = len(sentence) + 1
        torch.testing.assert_close(packed_logits[i : i + 1, :n], alone_logits[:, :n], atol=1e-5, rtol=0)


def test_text_batch_through_tokenizer(tokenizer):
    model = tiny_model()
    model.set_boundary_table(tokenizer)
    texts = ["Once upon a time, there was a king. He had three sons!", "Hello world. Bye."]
    batch = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    sentence_ids = model.segment(batch["input_ids"], batch["attention_mask"])
    packed = pack_sentences(batch["input_ids"], sentence_ids, PAD)
    assert int(packed.num_sentences[0]) >= 3 and int(packed.num_sentences[1]) == 2
    out = model(packed.input_ids, attention_mask=packed.attention_mask)
    assert torch.isfinite(out.loss)
    # The sentences of the second text give the same vectors when it is encoded alone.
    alone = tokenizer(texts[1:], return_tensors="pt", add_special_tokens=False)
    packed_alone = pack_sentences(alone["input_ids"], model.segment(alone["input_ids"]), PAD)
    vectors = model.encode(packed_alone.input_ids, packed_alone.attention_mask)
    torch.testing.assert_close(out.sentence_vectors[packed.batch_index == 1], vectors, atol=1e-5, rtol=0)
    for i, row in enumerate(packed.input_ids[packed.batch_index == 1]):
        assert tokenizer.decode(row[: packed.lengths[packed.batch_index == 1][i]]).strip() in texts[1]


def test_bf16_forward_and_decode_on_cpu():
    model = tiny_model().to(torch.bfloat16)
    ids, mask = right_pad(SENTENCES)
    out = model(ids, attention_mask=mask)
    assert out.logits.dtype == torch.bfloat16 and out.sentence_vectors.dtype == torch.bfloat16
    assert torch.isfinite(out.loss)
    decoded = model.decode(out.sentence_vectors, max_new_tokens=4)
    assert decoded.sequences.shape[0] == len(SENTENCES) and int(decoded.lengths.max()) <= 4


# ------------------------------------------------------------------------------------ decode
class ForceToken(LogitsProcessor):
    """Make ``token`` the only possible next token."""

    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.token] = 0.0
        return forced


NO_EOS = LogitsProcessorList([SuppressTokensLogitsProcessor([EOS])])


def assert_same_decode(a, b):
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.lengths, b.lengths)
    assert torch.equal(a.ended, b.ended)


@pytest.fixture(scope="module")
def decoder():
    """A model with larger random weights, whose greedy choices vary along a sentence and between
    rows (with init_std 0.02 every row writes one token over and over)."""
    return tiny_model(init_std=0.3)


@pytest.fixture(scope="module")
def vectors(decoder):
    ids, mask = right_pad(SENTENCES)
    return decoder.encode(ids, mask)


def test_decode_cache_matches_no_cache_greedy(decoder, vectors):
    cached = decoder.decode(vectors, use_cache=True)
    plain = decoder.decode(vectors, use_cache=False)
    assert_same_decode(cached, plain)
    assert int(cached.lengths.max()) > 1
    assert len({tuple(row) for row in cached.sequences.tolist()}) > 1  # rows differ


def test_decode_cache_matches_no_cache_with_left_padded_prefixes(decoder, vectors):
    prefixes = [[5, 6, 7], [], [8], [9, 10, 11, 12, 13], [14, 15]]
    prefix_ids, prefix_mask = left_pad(prefixes)
    cached = decoder.decode(vectors, prefix_ids, prefix_mask, use_cache=True)
    plain = decoder.decode(vectors, prefix_ids, prefix_mask, use_cache=False)
    assert_same_decode(cached, plain)
    # Left padding changes nothing: each row decoded alone with its bare prefix agrees.
    for i, prefix in enumerate(prefixes):
        alone = decoder.decode(vectors[i : i + 1], torch.tensor([prefix], dtype=torch.long).reshape(1, -1))
        n = int(alone.lengths[0])
        assert int(cached.lengths[i]) == n
        assert torch.equal(cached.sequences[i, :n], alone.sequences[0, :n])
        assert bool(cached.ended[i]) == bool(alone.ended[0])


def test_decode_cache_matches_no_cache_sampling(decoder, vectors):
    processors = LogitsProcessorList([TemperatureLogitsWarper(1.5), TopKLogitsWarper(50)])
    prefix_ids, prefix_mask = left_pad([[5], [], [6, 7], [], [8, 9, 10]])
    outputs = []
    for use_cache in (True, False):
        torch.manual_seed(1234)
        outputs.append(
            decoder.decode(vectors, prefix_ids, prefix_mask, do_sample=True, logits_processor=processors, use_cache=use_cache)
        )
    assert_same_decode(*outputs)
    torch.manual_seed(1234)
    greedy = decoder.decode(vectors, prefix_ids, prefix_mask)
    assert not torch.equal(outputs[0].sequences, greedy.sequences)  # it really sampled


def test_decode_respects_int_budget(decoder, vectors):
    out = decoder.decode(vectors, max_new_tokens=3, logits_processor=NO_EOS)
    assert out.sequences.shape == (len(SENTENCES), 3)
    assert out.lengths.tolist() == [3] * len(SENTENCES)
    assert not bool(out.ended.any())


def test_decode_respects_per_row_budget(decoder, vectors):
    budget = torch.tensor([0, 1, 4, 30, 2])
    out = decoder.decode(vectors, max_new_tokens=budget, logits_processor=NO_EOS)
    assert out.lengths.tolist() == [0, 1, 4, MAX_LEN, 2]
    assert out.sequences.shape == (len(SENTENCES), MAX_LEN)
    assert bool((out.sequences[0] == PAD).all()) and bool((out.sequences[1, 1:] == PAD).all())


def test_decode_stops_at_max_sentence_len_counting_prefix(decoder, vectors):
    prefixes = [[5] * 3, [], [6] * MAX_LEN, [7] * (MAX_LEN - 1), [8]]
    prefix_ids, prefix_mask = left_pad(prefixes)
    for use_cache in (True, False):
        out = decoder.decode(vectors, prefix_ids, prefix_mask, logits_processor=NO_EOS, use_cache=use_cache)
        assert out.lengths.tolist() == [MAX_LEN - len(p) for p in prefixes]
        assert not bool(out.ended.any())


def test_decode_ends_at_eos_without_writing_it(decoder, vectors):
    out = decoder.decode(vectors, logits_processor=LogitsProcessorList([ForceToken(EOS)]))
    assert out.lengths.tolist() == [0] * len(SENTENCES)
    assert out.sequences.shape == (len(SENTENCES), 0)
    assert bool(out.ended.all())


# ------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("method", ["forward", "encode"])
@pytest.mark.parametrize(
    "ids, mask, error, pattern",
    [
        (torch.empty(0, 4, dtype=torch.long), None, ValueError, "empty batch"),
        (torch.tensor([[5, VOCAB]]), None, ValueError, "outside the vocabulary"),
        (torch.tensor([[5, -1]]), None, ValueError, "outside the vocabulary"),
        (torch.tensor([[5.0, 6.0]]), None, TypeError, "integer token ids"),
        (torch.tensor([5, 6, 7]), None, ValueError, "2-D"),
        (torch.tensor([[5, 6, 7]]), torch.tensor([[1, 1]]), ValueError, "attention_mask has shape"),
        (torch.full((2, MAX_LEN + 1), 5), None, ValueError, "max_sentence_len"),
        (torch.tensor([[5, 6], [7, 8]]), torch.tensor([[1, 1], [0, 0]]), ValueError, r"empty \(no unmasked token\)"),
        (torch.tensor([[1, 1, 5, 6], [7, 8, 9, 10]]), torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]), ValueError,
         "right-padded"),
        (torch.tensor([[5, 1, 6]]), torch.tensor([[1, 0, 1]]), ValueError, "right-padded"),
    ],
    ids=["empty-batch", "id-too-big", "negative-id", "float-ids", "1d-ids", "mask-shape", "too-long", "empty-row",
         "left-padded", "inner-padding"],
)
def test_bad_sentence_inputs_raise_clear_errors(model, method, ids, mask, error, pattern):
    call = model.encode if method == "encode" else model.forward
    with pytest.raises(error, match=pattern):
        call(ids, mask)


@pytest.mark.parametrize(
    "vectors_shape", [(3, HIDDEN + 1), (HIDDEN,), (2, 1, HIDDEN)], ids=["wrong-width", "1d", "3d"]
)
def test_decode_rejects_wrong_vector_shape(model, vectors_shape):
    with pytest.raises(ValueError, match=f"shape \\(n, {HIDDEN}\\)"):
        model.decode(torch.zeros(vectors_shape))


def test_decode_rejects_bad_prefixes(decoder, vectors):
    model = decoder
    with pytest.raises(ValueError, match="rows"):
        model.decode(vectors, torch.tensor([[5]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.decode(vectors, torch.full((len(SENTENCES), 1), VOCAB))
    with pytest.raises(TypeError, match="integer token ids"):
        model.decode(vectors, torch.ones(len(SENTENCES), 1))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model.decode(vectors, torch.ones(len(SENTENCES), 2, dtype=torch.long), torch.ones(len(SENTENCES), 3))


# ------------------------------------------------------------------------------------ checkpoints
def trained_like_model(seed: int = 0) -> SentenceVAEModel:
    """A tiny model with a boundary table, so that buffers round-trip too."""
    model = tiny_model(seed)
    table = torch.zeros(VOCAB, dtype=torch.uint8)
    table[torch.arange(10, 20)] = 1
    model.set_boundary_table(table)
    return model


def reference_outputs(model: SentenceVAEModel) -> dict[str, torch.Tensor]:
    ids, mask = right_pad(SENTENCES)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    return {
        "vectors": out.sentence_vectors.contiguous(),
        "logits": out.logits.contiguous(),
        "decoded": model.decode(out.sentence_vectors, max_new_tokens=6).sequences.contiguous(),
    }


# Run by subprocesses: load the model, compute the same outputs, save them as safetensors.
SUBPROCESS_OUTPUTS = """
import json, sys, torch
from safetensors.torch import save_file
from transformers import AutoModel
ids = torch.tensor(json.load(open("inputs.json"))["ids"])
mask = torch.tensor(json.load(open("inputs.json"))["mask"])
model = AutoModel.from_pretrained({source!r}, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
assert type(model).__name__ == "SentenceVAEModel"
with torch.no_grad():
    out = model(ids, attention_mask=mask)
save_file({{
    "vectors": out.sentence_vectors.contiguous(),
    "logits": out.logits.contiguous(),
    "decoded": model.decode(out.sentence_vectors, max_new_tokens=6).sequences.contiguous(),
    "boundary_table": model.boundary_table.contiguous(),
}}, "outputs.safetensors")
"""


def write_inputs(directory: Path) -> None:
    ids, mask = right_pad(SENTENCES)
    (directory / "inputs.json").write_text(json.dumps({"ids": ids.tolist(), "mask": mask.tolist()}))


def assert_outputs_match(expected: dict, got: dict) -> None:
    torch.testing.assert_close(got["vectors"], expected["vectors"], atol=1e-6, rtol=0)
    torch.testing.assert_close(got["logits"], expected["logits"], atol=1e-5, rtol=0)
    # Greedy choices of random weights can be near-ties that differences of 1e-7 flip (with
    # tied embeddings the BOS input favours EOS at the first step), so only the shape is
    # compared across processes; the in-process round trip compares decoding exactly.
    assert got["decoded"].shape[0] == expected["decoded"].shape[0]


def dir_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()
    }


def test_save_load_round_trip_is_exact(tmp_path):
    model = trained_like_model()
    model.save_pretrained(tmp_path / "ckpt")
    files = set(os.listdir(tmp_path / "ckpt"))
    assert {"config.json", "model.safetensors", "modeling_sentence_vae.py", "checkpointing.py"} <= files
    assert not any(name.endswith(".bin") for name in files)
    loaded = SentenceVAEModel.from_pretrained(tmp_path / "ckpt").eval()
    assert torch.equal(loaded.boundary_table, model.boundary_table)
    assert loaded.lm_head.weight.data_ptr() == loaded.embed_tokens.weight.data_ptr()  # still tied
    expected, got = reference_outputs(model), reference_outputs(loaded)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    # AutoModel with the package imported gives our own class.
    auto = AutoModel.from_pretrained(tmp_path / "ckpt")
    assert type(auto) is SentenceVAEModel
    # Saving leaves no temporary siblings behind.
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


@pytest.mark.slow
def test_remote_code_load_without_the_package(tmp_path):
    model = trained_like_model()
    model.save_pretrained(tmp_path / "ckpt")
    write_inputs(tmp_path)
    check_run(run_without_package(SUBPROCESS_OUTPUTS.format(source=str(tmp_path / "ckpt")), cwd=tmp_path))
    got = load_file(tmp_path / "outputs.safetensors")
    assert_outputs_match(reference_outputs(model), got)
    assert torch.equal(got["boundary_table"], model.boundary_table)


@pytest.mark.slow
def test_load_by_repo_id_from_offline_hub_cache(tmp_path):
    model = trained_like_model()
    model.save_pretrained(tmp_path / "ckpt")
    env = make_hub_cache(tmp_path / "ckpt", tmp_path / "hub", "org/tiny-vae")
    opt = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                   num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16))
    opt.save_pretrained(tmp_path / "opt")
    make_hub_cache(tmp_path / "opt", tmp_path / "hub", "org/tiny-opt")
    write_inputs(tmp_path)
    code = SUBPROCESS_OUTPUTS.format(source="org/tiny-vae") + """
from huggingface_hub import constants
assert constants.HF_HUB_OFFLINE
# The checks of the copied checkpointing module resolve repo ids through the cache too.
try:
    type(model).from_pretrained("org/tiny-opt")
except ValueError as err:
    assert "'opt'" in str(err) and "'sentence_vae'" in str(err), err
else:
    raise SystemExit("loading an OPT repo as a SentenceVAEModel did not fail")
try:
    type(model).from_pretrained("org/not-in-cache")
except OSError as err:
    print("missing repo:", err)
else:
    raise SystemExit("loading a repo absent from the offline cache did not fail")
"""
    check_run(run_without_package(code, cwd=tmp_path, env=env))
    assert_outputs_match(reference_outputs(model), load_file(tmp_path / "outputs.safetensors"))


def failing_safe_save(real):
    """Write half of the file (as a full disk would), then fail."""

    def save(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        size = os.path.getsize(filename)
        with open(filename, "r+b") as f:
            f.truncate(size // 2)
        raise OSError(28, "No space left on device")

    return save


@pytest.mark.parametrize("where", ["weights", "config"])
def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch, where):
    import transformers.modeling_utils as modeling_utils

    old = trained_like_model(seed=0)
    old.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "tokenizer.json").write_text("{}")  # someone else's file in the directory
    before = dir_digest(tmp_path / "ckpt")

    if where == "weights":
        monkeypatch.setattr(modeling_utils, "safe_save_file", failing_safe_save(modeling_utils.safe_save_file))
    else:
        def broken(self, *args, **kwargs):
            raise RuntimeError("config could not be written")

        monkeypatch.setattr(SentenceVAEConfig, "save_pretrained", broken)
    new = trained_like_model(seed=1)
    with pytest.raises((OSError, RuntimeError)):
        new.save_pretrained(tmp_path / "ckpt")
    monkeypatch.undo()

    assert dir_digest(tmp_path / "ckpt") == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary directory left behind
    loaded = SentenceVAEModel.from_pretrained(tmp_path / "ckpt").eval()
    expected, got = reference_outputs(old), reference_outputs(loaded)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_save_over_existing_checkpoint_keeps_other_files_and_drops_stale_weights(tmp_path):
    target = tmp_path / "ckpt"
    first = trained_like_model(seed=0)
    first.save_pretrained(target, max_shard_size="100KB")
    assert (target / "model.safetensors.index.json").exists()
    (target / "tokenizer.json").write_text('{"kept": true}')
    (target / "checkpoint-5").mkdir()
    (target / "checkpoint-5" / "optimizer.pt").write_bytes(b"state")
    os.chmod(target, 0o750)

    second = trained_like_model(seed=1)
    second.save_pretrained(target)
    names = set(os.listdir(target))
    assert "model.safetensors" in names
    assert not any(n.startswith("model-0") or n.endswith(".index.json") for n in names)  # stale shards gone
    assert (target / "tokenizer.json").read_text() == '{"kept": true}'
    assert (target / "checkpoint-5" / "optimizer.pt").read_bytes() == b"state"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o750
    loaded = SentenceVAEModel.from_pretrained(target).eval()
    assert torch.equal(reference_outputs(loaded)["vectors"], reference_outputs(second)["vectors"])
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_save_into_new_nested_directory(tmp_path):
    model = trained_like_model()
    model.save_pretrained(str(tmp_path / "a" / "b" / "ckpt"))
    assert (tmp_path / "a" / "b" / "ckpt" / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path / "a" / "b")) == ["ckpt"]


def test_push_to_hub_paths_still_work(tmp_path, monkeypatch):
    """`save_pretrained(push_to_hub=True)` names the repo after the user's directory and uploads
    what it wrote; `push_to_hub()` saves into its own temporary directory. No network: the hub
    calls (`huggingface_hub.create_repo` and `upload_folder`, which sentence_lm.checkpointing
    makes) are replaced by fakes."""
    from sentence_lm import checkpointing

    created, uploaded = [], []

    def create_repo(repo_id, **kwargs):
        created.append(repo_id)
        return type("Repo", (), {"repo_id": f"user/{repo_id}"})()

    def upload_folder(repo_id, folder_path, **kwargs):
        uploaded.append((repo_id, sorted(os.listdir(folder_path))))

    monkeypatch.setattr(checkpointing.huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(checkpointing.huggingface_hub, "upload_folder", upload_folder)

    model = trained_like_model()
    model.save_pretrained(tmp_path / "my-vae", push_to_hub=True)
    assert created == ["my-vae"]
    assert uploaded[0][0] == "user/my-vae" and "model.safetensors" in uploaded[0][1]
    assert "modeling_sentence_vae.py" in uploaded[0][1] and "checkpointing.py" in uploaded[0][1]
    assert (tmp_path / "my-vae" / "model.safetensors").exists()

    model.push_to_hub("my-vae-2")
    assert uploaded[1][0] == "user/my-vae-2"
    assert {"config.json", "model.safetensors", "README.md", "checkpointing.py"} <= set(uploaded[1][1])


def test_missing_weights_are_refused(tmp_path, model):
    model.save_pretrained(tmp_path / "ckpt")
    os.remove(tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(OSError, match="model.safetensors is missing"):
        SentenceVAEModel.from_pretrained(tmp_path / "ckpt")


def test_pickled_weights_are_never_loaded(tmp_path, model):
    model.save_pretrained(tmp_path / "ckpt")
    os.remove(tmp_path / "ckpt" / "model.safetensors")
    (tmp_path / "ckpt" / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(OSError, match="pytorch_model.bin.*never unpickles"):
        SentenceVAEModel.from_pretrained(tmp_path / "ckpt")
    model.save_pretrained(tmp_path / "ok")
    with pytest.raises(ValueError, match="use_safetensors=False"):
        SentenceVAEModel.from_pretrained(tmp_path / "ok", use_safetensors=False)


@pytest.mark.parametrize("damage", ["truncate", "garbage-header", "tiny"])
def test_corrupt_weights_raise_naming_the_file(tmp_path, model, damage):
    model.save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) * 2 // 3])
    elif damage == "garbage-header":
        weights.write_bytes(data[:8] + b"\xff" * 16 + data[24:])
    else:
        weights.write_bytes(data[:5])
    for load in (SentenceVAEModel.from_pretrained, lambda p: AutoModel.from_pretrained(p, trust_remote_code=True)):
        with pytest.raises(OSError, match="model.safetensors") as info:
            load(tmp_path / "ckpt")
        assert str(weights) in str(info.value) and "re-download" in str(info.value)


def test_corrupt_shard_is_named(tmp_path, model):
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="100KB")
    shard = sorted((tmp_path / "ckpt").glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(OSError, match=shard.name):
        SentenceVAEModel.from_pretrained(tmp_path / "ckpt")
    shard.unlink()
    with pytest.raises(OSError, match=f"missing the weight shard {shard.name}"):
        SentenceVAEModel.from_pretrained(tmp_path / "ckpt")


def test_check_safetensors_file_accepts_valid_files(tmp_path):
    save_file({"a": torch.ones(3), "b": torch.zeros(2, 2, dtype=torch.int64)}, tmp_path / "x.safetensors")
    check_safetensors_file(str(tmp_path / "x.safetensors"))
    save_file({}, tmp_path / "empty.safetensors")
    check_safetensors_file(str(tmp_path / "empty.safetensors"))


def test_other_model_type_is_refused(tmp_path):
    opt = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                   num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16))
    opt.save_pretrained(tmp_path / "opt")
    with pytest.raises(ValueError, match="'opt' checkpoint.*SentenceVAEModel loads 'sentence_vae'.*OPTForCausalLM"):
        SentenceVAEModel.from_pretrained(tmp_path / "opt")


def test_missing_config_is_refused(tmp_path, model):
    model.save_pretrained(tmp_path / "ckpt")
    os.remove(tmp_path / "ckpt" / "config.json")
    with pytest.raises(OSError, match="no config.json"):
        SentenceVAEModel.from_pretrained(tmp_path / "ckpt")


def test_interrupted_swap_points_to_the_backup(tmp_path, model):
    model.save_pretrained(tmp_path / "ckpt")
    os.rename(tmp_path / "ckpt", tmp_path / ".ckpt.old-0123456789ab")  # killed between the renames
    with pytest.raises(OSError, match=r"interrupted.*\.ckpt\.old-0123456789ab"):
        SentenceVAEModel.from_pretrained(tmp_path / "ckpt")


def test_atomic_save_of_a_tokenizer(tmp_path, tokenizer):
    """The mixin on a tokenizer class: atomic save, returned paths in the final directory."""
    from sentence_lm.checkpointing import SafeCheckpointMixin

    class SafeTokenizer(SafeCheckpointMixin, type(tokenizer)):
        pass

    tokenizer.save_pretrained(tmp_path / "plain")
    safe = SafeTokenizer.from_pretrained(tmp_path / "plain")
    model = tiny_model()
    model.save_pretrained(tmp_path / "ckpt")  # the usual layout: model and tokenizer in one directory
    written = safe.save_pretrained(tmp_path / "ckpt")
    assert written and all(str(p).startswith(str(tmp_path / "ckpt") + os.sep) for p in written)
    assert all(os.path.isfile(p) for p in written)
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(os.listdir(tmp_path / "ckpt"))
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "plain"]
    again = SafeTokenizer.from_pretrained(tmp_path / "ckpt")
    text = "Once upon a time. The end!"
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    SentenceVAEModel.from_pretrained(tmp_path / "ckpt")
