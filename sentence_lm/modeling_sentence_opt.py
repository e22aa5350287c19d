"""SentenceOPT: the SentenceLM whose backbone is OPT (the paper's setting), under the names
release 0.1.0 used. Checkpoints of that release load unchanged: their weights are renamed on
loading (see `LEGACY_KEY_MAPPING`)."""

from __future__ import annotations

import os

from transformers import OPTConfig

from .configuration_sentence_opt import SentenceOPTConfig
from .modeling_sentence_lm import SentenceLMForCausalLM, SentenceLMModel, SentenceLMPreTrainedModel

LEGACY_KEY_MAPPING = {
    r"^model\.layers\.": "model.backbone.decoder.layers.",
    r"^model\.embed_positions\.": "model.backbone.decoder.embed_positions.",
    r"^model\.final_layer_norm\.": "model.backbone.decoder.final_layer_norm.",
    r"^layers\.": "backbone.decoder.layers.",
    r"^embed_positions\.": "backbone.decoder.embed_positions.",
    r"^final_layer_norm\.": "backbone.decoder.final_layer_norm.",
}
"""Weight names of release 0.1.0 (OPT layers directly under the model) -> this release's
(`backbone` is an `OPTModel`, whose layers sit in its `decoder`)."""


class SentenceOPTPreTrainedModel(SentenceLMPreTrainedModel):
    """Weight initialisation and loading for SentenceOPT models; reads release 0.1.0 checkpoints."""

    config_class = SentenceOPTConfig
    config: SentenceOPTConfig

    @classmethod
    def legacy_key_mapping(cls, saved_config: dict) -> dict | None:
        """The weight renaming a checkpoint with this ``config.json`` content needs, if any."""
        return LEGACY_KEY_MAPPING if saved_config.get("config_version") == 1 else None


class SentenceOPTModel(SentenceOPTPreTrainedModel, SentenceLMModel):
    """[`SentenceLMModel`] with an OPT backbone (`OPTModel`)."""


class SentenceOPTForCausalLM(SentenceOPTPreTrainedModel, SentenceLMForCausalLM):
    """[`SentenceLMForCausalLM`] with an OPT backbone; :meth:`from_opt` starts it from an OPT
    checkpoint."""

    base_model_class = SentenceOPTModel

    @classmethod
    def from_opt(cls, opt_model_or_path, sentence_vae=None, tokenizer=None, sentence_vae_config=None, **config_overrides):
        """:meth:`from_pretrained_backbone` for an OPT checkpoint (an `OPTForCausalLM`/`OPTModel`,
        or a path or Hub id of one, e.g. ``"facebook/opt-125m"``)."""
        config = getattr(opt_model_or_path, "config", None)
        if not isinstance(opt_model_or_path, (str, os.PathLike)) and not isinstance(config, OPTConfig):
            raise ValueError(
                f"from_opt needs an OPT model (model_type 'opt'), got {type(opt_model_or_path).__name__} with "
                f"model_type {getattr(config, 'model_type', None)!r}; for other families use "
                "SentenceLMForCausalLM.from_pretrained_backbone."
            )
        return cls.from_pretrained_backbone(
            opt_model_or_path, sentence_vae=sentence_vae, tokenizer=tokenizer, sentence_vae_config=sentence_vae_config, **config_overrides
        )
