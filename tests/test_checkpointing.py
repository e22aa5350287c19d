"""Checkpoints of SentenceOPTForCausalLM that go wrong: a damaged checkpoint (weights missing,
truncated, empty or only pickled; a config of another model type, of a SentenceVAE, of an older or
newer ``config_version``, with an unknown key, unreadable or missing) is refused by
``SentenceOPTForCausalLM.from_pretrained`` and ``AutoModelForCausalLM.from_pretrained`` with a
named error that says what to do; loading never unpickles; and a save that fails part way (disk
full, the tokenizer, the config or the model card failing) leaves the previous checkpoint as it
was, with no half-written directory beside it.

The model is the shared tiny SentenceOPTForCausalLM (helpers.tiny_sentence_opt) over the session
tokenizer, as in test_hardening.py. SentenceVAE checkpoints have their own tests in
test_sentence_vae.py; checkpoints that travel (remote code, hub cache) are in
test_sentence_opt_hub.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_same_weights, encode, tiny_sentence_opt
from transformers import AutoModelForCausalLM, OPTConfig, OPTForCausalLM

from sentence_lm import SentenceOPTConfig, SentenceOPTForCausalLM

MPE = 24  # sentence slots of the backbone, as in test_hardening.py


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_sentence_opt(tokenizer, max_position_embeddings=MPE)


def digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("checkpointing") / "ckpt"
    model.save_pretrained(path)
    return path


class Unpickled:
    """A pickle that writes a marker file when it is unpickled: the payload of a hostile
    ``pytorch_model.bin``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('unpickled')",))


def write_hostile_pickle(directory: Path) -> Path:
    marker = directory.parent / "UNPICKLED"
    with open(directory / "pytorch_model.bin", "wb") as f:
        pickle.dump(Unpickled(marker), f)
    return marker


def _edit_config(directory: Path, change) -> None:
    config = json.loads((directory / "config.json").read_text())
    change(config)
    (directory / "config.json").write_text(json.dumps(config))


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _other_model_type(directory: Path) -> None:
    shutil.rmtree(directory)
    opt = OPTForCausalLM(
        OPTConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=1,
            ffn_dim=32,
            num_attention_heads=2,
            max_position_embeddings=32,
            word_embed_proj_dim=16,
        )
    )
    opt.save_pretrained(directory)


def _vae_checkpoint(directory: Path, model) -> None:
    shutil.rmtree(directory)
    model.sentence_vae.save_pretrained(directory)


DAMAGES = {
    "weights-missing": (
        lambda d, m: (d / "model.safetensors").unlink(),
        OSError,
        r"has no weights: model\.safetensors is missing.*[Rr]e-save the checkpoint",
    ),
    "weights-truncated": (
        lambda d, m: _truncate(d / "model.safetensors", 0.5),
        OSError,
        r"model\.safetensors.*truncated or corrupt.*re-download.*re-save",
    ),
    "weights-empty-file": (
        lambda d, m: _truncate(d / "model.safetensors", 0.0),
        OSError,
        r"model\.safetensors: it is only 0 bytes long.*re-download",
    ),
    "weights-only-pickled": (
        lambda d, m: ((d / "model.safetensors").unlink(), write_hostile_pickle(d)),
        OSError,
        r"only pickled PyTorch weights \(pytorch_model\.bin\).*never unpickles.*safetensors",
    ),
    "config-of-another-model-type": (
        lambda d, m: _other_model_type(d),
        ValueError,
        r"'opt' checkpoint, but SentenceOPTForCausalLM loads 'sentence_opt'.*OPTForCausalLM",
    ),
    "config-of-a-sentence-vae": (_vae_checkpoint, ValueError, r"'sentence_vae' checkpoint.*SentenceVAEModel"),
    # model_type edited by hand, architectures left: no made-up `transformers.SentenceOPTForCausalLM` in the advice
    "config-model-type-edited": (
        lambda d, m: _edit_config(d, lambda c: c.update(model_type="opt")),
        ValueError,
        r"'opt' checkpoint, but SentenceOPTForCausalLM loads 'sentence_opt'.*matching `transformers` Auto class",
    ),
    "config-older-version": (
        lambda d, m: _edit_config(d, lambda c: c.update(config_version=0)),
        ValueError,
        r"config_version=0.*reads version 2 for SentenceOPTConfig.*Upgrade sentence_lm or re-save",
    ),
    "config-newer-version": (
        lambda d, m: _edit_config(d, lambda c: c.update(config_version=3)),
        ValueError,
        r"config_version=3.*Upgrade sentence_lm",
    ),
    "nested-vae-config-older-version": (
        lambda d, m: _edit_config(d, lambda c: c["sentence_vae"].update(config_version=0)),
        ValueError,
        r"config_version=0.*Upgrade sentence_lm or re-save",
    ),
    # Through AutoModelForCausalLM the library reads config.json first and names the file itself.
    "config-not-json": (
        lambda d, m: (d / "config.json").write_text("{not json"),
        OSError,
        r"(Cannot read .*config\.json.*[Rr]e-download or re-save|config\.json' is not a valid JSON file)",
    ),
    "config-missing": (lambda d, m: (d / "config.json").unlink(), OSError, r"no config\.json.*save_pretrained"),
}
LOADERS = {
    "class": SentenceOPTForCausalLM.from_pretrained,
    "auto": AutoModelForCausalLM.from_pretrained,
}
CHECKPOINT_CASES = [
    (damage, loader)
    for damage in DAMAGES
    for loader in LOADERS
    if not (
        loader == "auto"
        and damage
        in ("config-of-another-model-type", "config-of-a-sentence-vae", "config-model-type-edited", "config-missing")
    )
]  # AutoModelForCausalLM rightly loads an OPT checkpoint as OPT; the class loader must refuse it


@pytest.mark.parametrize("damage, loader", CHECKPOINT_CASES, ids=[f"{d}-{l}" for d, l in CHECKPOINT_CASES])
def test_bad_checkpoint(saved, model, tmp_path, damage, loader):
    directory = tmp_path / "ckpt"
    shutil.copytree(saved, directory)
    make, error, pattern = DAMAGES[damage]
    make(directory, model)
    with pytest.raises(error, match=pattern):
        LOADERS[loader](directory)
    assert not (tmp_path / "UNPICKLED").exists()


def test_loading_never_unpickles(saved, tmp_path):
    """A hostile pickle beside good safetensors weights is never opened: the weights come from
    safetensors, and asking for the pickle is refused."""
    directory = tmp_path / "ckpt"
    shutil.copytree(saved, directory)
    marker = write_hostile_pickle(directory)
    loaded = SentenceOPTForCausalLM.from_pretrained(directory)
    reference = SentenceOPTForCausalLM.from_pretrained(saved)
    assert_same_weights(loaded, reference)
    with pytest.raises(ValueError, match=r"loads safetensors weights only.*use_safetensors=False"):
        SentenceOPTForCausalLM.from_pretrained(directory, use_safetensors=False)
    assert not marker.exists()


def _disk_full(monkeypatch, tokenizer):
    import transformers.modeling_utils as modeling_utils

    real = modeling_utils.safe_save_file

    def save(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(modeling_utils, "safe_save_file", save)
    return OSError


def _tokenizer_save_fails(monkeypatch, tokenizer):
    def broken(self, *args, **kwargs):
        raise RuntimeError("tokenizer could not be written")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", broken)
    return RuntimeError


def _interrupted_while_writing_config(monkeypatch, tokenizer):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(SentenceOPTConfig, "save_pretrained", interrupted)
    return KeyboardInterrupt


def _model_card_fails(monkeypatch, tokenizer):
    import sentence_lm.model_card as model_card

    def broken(*args, **kwargs):
        raise ValueError("model card could not be rendered")

    monkeypatch.setattr(model_card, "save_model_card", broken)
    return ValueError


SAVE_FAILURES = {
    "disk-full-while-writing-weights": _disk_full,
    "exception-while-saving-the-tokenizer": _tokenizer_save_fails,
    "interrupt-while-writing-the-config": _interrupted_while_writing_config,
    "exception-while-writing-the-model-card": _model_card_fails,
}


@pytest.mark.parametrize("failure", list(SAVE_FAILURES))
def test_failed_save_keeps_the_previous_checkpoint(tokenizer, model, saved, tmp_path, monkeypatch, failure):
    directory = tmp_path / "ckpt"
    shutil.copytree(saved, directory)
    before = digest(directory)
    other = tiny_sentence_opt(tokenizer, seed=1, max_position_embeddings=MPE)
    error = SAVE_FAILURES[failure](monkeypatch, tokenizer)
    with pytest.raises(error):
        other.save_pretrained(directory)
    monkeypatch.undo()
    assert digest(directory) == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no half-written sibling left behind
    loaded = SentenceOPTForCausalLM.from_pretrained(directory).eval()
    enc = encode(tokenizer, ["Hello there."])
    assert torch.equal(loaded.generate(**enc, max_new_tokens=6), model.generate(**enc, max_new_tokens=6))


def test_unknown_keys_of_a_saved_config_are_kept_not_refused(saved, tmp_path):
    """A key the config class does not know (set on the config by a user or by `transformers`)
    is written by save_pretrained, so from_pretrained must read it back: it is kept as an
    attribute; only misspelt constructor arguments are refused (tests/test_config_round_trip.py)."""
    directory = tmp_path / "ckpt"
    shutil.copytree(saved, directory)
    _edit_config(directory, lambda c: c.update(num_layers=3))
    for load in LOADERS.values():
        assert load(directory).config.num_layers == 3
