"""Shared fixtures of the test suite, and its ``slow`` marker.

``slow`` marks the long end-to-end tests: those that run a subprocess (remote code in a Python
without sentence_lm, a hub cache offline) and those that take more than a few seconds alone.
``python -m pytest -q tests -m "not slow"`` is the quick loop; CI runs everything. The tiny
SentenceOPT that end-to-end tests build on the ``tokenizer`` fixture is
``helpers.tiny_sentence_opt``."""

from __future__ import annotations

import pytest
import torch
from helpers import backbone_configs
from transformers import AutoModelForCausalLM

from sentence_lm import SentenceLMForCausalLM
from sentence_lm.corpus import default_corpus
from sentence_lm.tokenization_sentence_lm import train_sentence_tokenizer


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long end-to-end tests; deselect with -m 'not slow'")


@pytest.fixture(scope="session")
def tokenizer():
    """A small byte-level BPE :class:`SentenceTokenizer` trained on the built-in corpus (well
    under a second): OPT's special-token layout (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2 = BOS = EOS,
    ``<unk>`` 3), a ``</s>`` prepended to every text, ``max_sentence_len=16``.

    Shared by the whole session: do not modify it in a test (copy it with ``copy.deepcopy``)."""
    return train_sentence_tokenizer(default_corpus(), vocab_size=1024, max_sentence_len=16)


@pytest.fixture(scope="module")
def token_models(tokenizer):
    """One tiny random token model per family, sharing the test tokenizer's vocabulary."""
    configs = backbone_configs(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    models = {}
    for family, config in configs.items():
        torch.manual_seed(0)
        models[family] = AutoModelForCausalLM.from_config(config).eval()
    return models


@pytest.fixture(scope="module")
def sentence_lms(token_models, tokenizer):
    """A SentenceLM on each of ``token_models`` (new random SentenceVAE, stop head biased to go on)."""
    models = {}
    for family, token_model in token_models.items():
        torch.manual_seed(0)
        model = SentenceLMForCausalLM.from_pretrained_backbone(
            token_model, tokenizer=tokenizer, sentence_vae_config=dict(max_sentence_len=tokenizer.max_sentence_len)
        ).eval()
        with torch.no_grad():  # random weights would often stop at once; make texts run on
            model.stop_head.bias.copy_(torch.tensor([3.0, -3.0]))
        models[family] = model
    return models


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """A saved tiny random Llama token model (1 layer of width 32) with a sentence tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sentence_lm.tokenization_sentence_lm import train_sentence_tokenizer

    path = tmp_path_factory.mktemp("backbone") / "llama"
    tokenizer = train_sentence_tokenizer(default_corpus(), vocab_size=512, max_sentence_len=16)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )  # fmt: skip
    llama.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
