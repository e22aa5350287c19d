"""The model card (README.md) of a saved SentenceOPT names the checkpoint it belongs to: its
title and its usage snippet give the repo id when one is known, else the directory it was saved
to (never a placeholder, nor the hidden directory an atomic save writes into)."""

from __future__ import annotations

import re

import pytest
from helpers import tiny_sentence_opt

from sentence_lm import SentenceOPTForCausalLM
from sentence_lm.model_card import PLACEHOLDER, checkpoint_location, render_model_card


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_sentence_opt(tokenizer)


def title_and_sources(card: str) -> tuple[str, set[str]]:
    """The card's ``# title`` and the arguments of its ``from_pretrained("...")`` calls."""
    title = re.search(r"^# (.+)$", card, flags=re.M)
    assert title, card
    return title[1], set(re.findall(r'from_pretrained\("([^"]+)"', card))


def assert_no_placeholder(card: str) -> None:
    assert PLACEHOLDER not in card and "# checkpoint" not in card and ".saving-" not in card


def test_card_names_the_directory_relative_to_the_working_directory(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model.model_card_kwargs = {}
    for _ in range(2):  # a first save, then one that replaces the checkpoint in place
        model.save_pretrained("runs/my-sentence-opt")
        card = (tmp_path / "runs" / "my-sentence-opt" / "README.md").read_text()
        assert title_and_sources(card) == ("my-sentence-opt", {"runs/my-sentence-opt"})
        assert_no_placeholder(card)


def test_card_names_a_directory_outside_the_working_directory_by_its_absolute_path(model, tmp_path, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    target = tmp_path / "models" / "sopt-small"
    model.model_card_kwargs = {}
    model.save_pretrained(target)
    card = (target / "README.md").read_text()
    assert title_and_sources(card) == ("sopt-small", {target.resolve().as_posix()})
    assert_no_placeholder(card)


def test_card_names_the_repo_id_when_given(model, tmp_path):
    model.model_card_kwargs = {"repo_id": "someone/sentence-opt-tiny", "results": {"held-out perplexity": 9.5}}
    try:
        model.save_pretrained(tmp_path / "local-dir")
    finally:
        model.model_card_kwargs = {}
    card = (tmp_path / "local-dir" / "README.md").read_text()
    assert title_and_sources(card) == ("someone/sentence-opt-tiny", {"someone/sentence-opt-tiny"})
    assert "| held-out perplexity | 9.5 |" in card and "local-dir" not in card
    assert_no_placeholder(card)


def test_render_defaults_to_where_the_model_was_loaded_from(model, tmp_path):
    model.model_card_kwargs = {}
    model.save_pretrained(tmp_path / "trained")
    loaded = SentenceOPTForCausalLM.from_pretrained(tmp_path / "trained")
    title, sources = title_and_sources(str(render_model_card(loaded)))
    assert title == "trained" and sources == {str(tmp_path / "trained")}
    title, sources = title_and_sources(str(render_model_card(loaded, repo_id="org/name")))
    assert (title, sources) == ("org/name", {"org/name"})


def test_checkpoint_location_sees_through_the_atomic_save_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert checkpoint_location(tmp_path / "out" / ".sopt.saving-0123456789ab") == "out/sopt"
    assert checkpoint_location(tmp_path / "out" / ".sopt") == "out/.sopt"
    assert checkpoint_location("/somewhere/else/sopt") == "/somewhere/else/sopt"
