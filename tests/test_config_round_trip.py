"""Configs round-trip: token and shape settings are writable on the composite config and land in
the nested configs (refused where they would make them disagree); `get_text_config()` is the backbone's; whatever `save_pretrained` writes (user attributes, `quantization_config`, keys set
by `transformers`) `from_pretrained` reads back; misspelt constructor arguments are still refused."""

import json

import pytest
import torch
from helpers import assert_same_weights
from transformers import AutoConfig, DynamicCache, LlamaConfig

from sentence_lm import SentenceLMConfig, SentenceLMForCausalLM, SentenceOPTConfig, SentenceVAEConfig
from sentence_lm.segmentation import ENDS


def tiny_config() -> SentenceLMConfig:
    return SentenceLMConfig(
        backbone=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=64),
        sentence_vae=dict(vocab_size=64, hidden_size=32, num_attention_heads=4, ffn_dim=64, pad_token_id=0,
                          bos_token_id=1, eos_token_id=2),
    )  # fmt: skip


def test_token_settings_are_writable_and_reach_the_sentence_vae():
    config = tiny_config()
    config.pad_token_id = 0  # the same value, as scripts write it
    config.pad_token_id = 3
    config.eos_token_id = [4]  # a one-element list, as generation configs hold them
    config.vocab_size = 80
    assert (config.sentence_vae.pad_token_id, config.sentence_vae.eos_token_id, config.sentence_vae.vocab_size) == (3, 4, 80)
    assert (config.pad_token_id, config.eos_token_id, config.vocab_size) == (3, 4, 80)
    with pytest.raises(ValueError, match="`eos_token_id` must be a non-negative integer, got None"):
        config.eos_token_id = None
    with pytest.raises(ValueError, match=r"`bos_token_id`=500 is outside the vocabulary \[0, 80\)"):
        config.bos_token_id = 500


def test_shape_settings_are_writable_and_reach_the_nested_configs():
    config = tiny_config()
    config.max_position_embeddings = 5
    assert config.backbone.max_position_embeddings == config.max_position_embeddings == 5
    config.hidden_size = 32  # the same value: nothing changes
    config.hidden_size = 64  # both widths, and the backbone's head_dim derived from it
    assert (config.backbone.hidden_size, config.sentence_vae.hidden_size, config.backbone.head_dim) == (64, 64, 16)
    torch.manual_seed(0)
    model = SentenceLMForCausalLM(config).eval()
    assert model.model.backbone.config.hidden_size == 64 and model.sentence_vae.embed_tokens.embedding_dim == 64
    table = torch.zeros(64, dtype=torch.uint8)
    table[2] = ENDS
    model.sentence_vae.set_boundary_table(table)
    ids = torch.randint(3, 64, (1, 40))
    ids[0, 4::5] = 2  # eight sentences (id 2 ends one): more than the 4 slots after the start state
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(ids)
    for name, value, message in [
        ("hidden_size", 30, r"not divisible by the backbone's num_attention_heads \(4\)"),
        ("hidden_size", 0, "positive integer"),
        ("max_position_embeddings", 1, "integer >= 2"),
        ("max_position_embeddings", "8", "integer >= 2"),
    ]:
        with pytest.raises(ValueError, match=message):
            setattr(config, name, value)
    assert (config.hidden_size, config.max_position_embeddings) == (64, 5)  # a refused value changes nothing
    # OPT's projected embedding width follows the width when it equals it.
    opt = SentenceOPTConfig(hidden_size=32, num_attention_heads=4, ffn_dim=64, num_hidden_layers=1,
                            sentence_vae=dict(vocab_size=64, hidden_size=32, num_attention_heads=4, ffn_dim=64))
    opt.hidden_size = 64
    assert (opt.backbone.hidden_size, opt.backbone.word_embed_proj_dim, opt.sentence_vae.hidden_size) == (64, 64, 64)


def test_get_text_config_is_the_backbone_with_the_models_token_settings():
    config = tiny_config()
    text = config.get_text_config()
    assert text is config.backbone and config.get_text_config(decoder=True) is text
    assert config.get_text_config(encoder=True) is config
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (1, 4, 2)
    config.vocab_size = 80
    config.eos_token_id = 5
    assert (text.vocab_size, text.eos_token_id, text.pad_token_id, text.bos_token_id) == (80, 5, 0, 1)
    # Tools that size caches from the config find the backbone's layers.
    config.backbone.num_hidden_layers = 3
    assert len(DynamicCache(config=config).layers) == 3
    # Saved and loaded, the backbone still carries the model's token settings.
    loaded = SentenceLMConfig.from_dict(config.to_dict())
    assert (loaded.get_text_config().vocab_size, loaded.get_text_config().eos_token_id) == (80, 5)


def test_a_saved_config_with_extra_keys_loads_back(tmp_path):
    config = tiny_config()
    config.my_flag = "kept"
    config.quantization_config = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    config.sentence_vae.note = 3
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["my_flag"] == "kept" and saved["sentence_vae"]["note"] == 3
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is SentenceLMConfig
    assert loaded.my_flag == "kept" and loaded.sentence_vae.note == 3
    assert loaded.quantization_config == config.quantization_config
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["my_flag"] == "kept"


def test_a_model_saved_with_an_extra_config_attribute_loads(tmp_path):
    torch.manual_seed(0)
    model = SentenceLMForCausalLM(tiny_config())
    model.config.trained_on = "pydoc"
    model.save_pretrained(tmp_path)
    loaded = SentenceLMForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.trained_on == "pydoc"
    assert_same_weights(model, loaded)


def test_misspelt_constructor_arguments_are_still_refused():
    with pytest.raises(ValueError, match=r"Unknown SentenceLMConfig key\(s\) \['stop_los_weight'\]"):
        SentenceLMConfig(backbone=LlamaConfig(), stop_los_weight=1.0)
    with pytest.raises(ValueError, match=r"Unknown SentenceVAEConfig key\(s\) \['max_sentence_length'\]"):
        SentenceVAEConfig(max_sentence_length=8)
    with pytest.raises(ValueError, match=r"Unknown SentenceOPTConfig key\(s\) \['num_layers'\]"):
        SentenceOPTConfig(num_layers=2)
