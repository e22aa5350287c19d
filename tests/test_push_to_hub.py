"""Publishing: `push_to_hub` and `save_pretrained(..., push_to_hub=True)` upload the whole
checkpoint — weights, config, code, tokenizer and our rendered model card — checked against a
local stand-in for the Hub's upload calls."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig

from sentence_lm import SentenceLMForCausalLM, checkpointing


@pytest.fixture
def hub(monkeypatch):
    """Record what would be uploaded: the repo created and the files of each uploaded folder."""
    calls = SimpleNamespace(repos=[], uploads=[])

    def create_repo(repo_id, **kwargs):
        calls.repos.append((repo_id, kwargs))
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(repo_id, folder_path, **kwargs):
        files = {p.relative_to(folder_path).as_posix(): p.read_bytes() for p in Path(folder_path).rglob("*") if p.is_file()}
        calls.uploads.append(SimpleNamespace(repo_id=repo_id, files=files, kwargs=kwargs))
        return "commit"

    monkeypatch.setattr(checkpointing.huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(checkpointing.huggingface_hub, "upload_folder", upload_folder)
    return calls


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    llama = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    from transformers import LlamaForCausalLM

    return SentenceLMForCausalLM.from_pretrained_backbone(LlamaForCausalLM(llama), tokenizer=tokenizer)


EXPECTED = {"model.safetensors", "config.json", "tokenizer.json", "README.md", "modeling_sentence_lm.py"}


def test_push_to_hub_uploads_tokenizer_and_our_card(model, hub):
    assert model.push_to_hub("me/tiny-sentence-llama", commit_message="first", private=True) == "commit"
    assert hub.repos == [("me/tiny-sentence-llama", {"private": True, "token": None, "exist_ok": True})]
    (upload,) = hub.uploads
    assert EXPECTED <= set(upload.files) and upload.kwargs["commit_message"] == "first"
    card = upload.files["README.md"].decode()
    assert card.count("# me/tiny-sentence-llama") == 1 and 'from_pretrained("me/tiny-sentence-llama"' in card
    assert model.model_card_kwargs == {}  # the repo id was used for this card only


def test_save_pretrained_with_push_to_hub_uploads_the_finished_checkpoint(model, hub, tmp_path):
    model.save_pretrained(tmp_path / "ckpt", push_to_hub=True, repo_id="me/other", create_pr=True)
    (upload,) = hub.uploads
    assert upload.repo_id == "me/other" and upload.kwargs["create_pr"] is True
    assert EXPECTED <= set(upload.files)
    local = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir() if p.is_file()}
    assert {name: local[name] for name in upload.files} == upload.files  # exactly what was saved
