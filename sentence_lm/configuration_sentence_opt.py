"""Configuration of SentenceOPT: the SentenceLM whose backbone is OPT."""

from __future__ import annotations

from types import SimpleNamespace

from transformers import OPTConfig

from .configuration_sentence_lm import CONFIG_VERSION, SentenceLMConfig
from .configuration_sentence_vae import ACTIVATIONS, check_bool, check_choice, check_positive, check_probability, check_real

OPT_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "ffn_dim",
    "max_position_embeddings",
    "do_layer_norm_before",
    "dropout",
    "attention_dropout",
    "activation_function",
    "layerdrop",
    "init_std",
    "enable_bias",
    "layer_norm_elementwise_affine",
)
"""`OPTConfig` fields that `SentenceOPTConfig` takes directly (as release 0.1.0 did)."""

_FLAT_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072)
"""OPT-125m's shape, the default of a backbone given by flat fields."""

_LEGACY_VERSION = 1


class SentenceOPTConfig(SentenceLMConfig):
    r"""Configuration of [`SentenceOPTModel`] and [`SentenceOPTForCausalLM`]: a
    [`SentenceLMConfig`] whose backbone is an `OPTConfig`.

    The backbone may be given as ``backbone=OPTConfig(...)`` (or a dict of its fields), or by its
    fields directly, as in release 0.1.0: ``SentenceOPTConfig(sentence_vae=..., hidden_size=768,
    num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072, max_position_embeddings=2048,
    dropout=0.1, ...)`` (the `OPT_FIELDS`; OPT-125m's shape by default). `max_position_embeddings`
    counts sentence slots (see [`SentenceLMConfig`]). Configurations saved by release 0.1.0
    (`config_version` 1, flat fields) load as this version; their weights are renamed on loading
    by [`SentenceOPTForCausalLM.from_pretrained`].
    """

    model_type = "sentence_opt"
    shortcut_fields = OPT_FIELDS
    sub_configs_defaults = {"backbone": OPTConfig, "sentence_vae": SentenceLMConfig.sub_configs_defaults["sentence_vae"]}

    def __post_init__(self, **kwargs):
        flat = {name: kwargs.pop(name) for name in OPT_FIELDS if name in kwargs}
        if self.config_version == _LEGACY_VERSION:
            self.config_version = CONFIG_VERSION
        if flat:
            if self.backbone is not None:
                raise ValueError(
                    f"Pass the OPT backbone either as `backbone` or by its fields {sorted(flat)}, not both."
                )
            self.backbone = OPTConfig(**_checked_opt_fields({**_FLAT_DEFAULTS, **flat}))
        elif self.backbone is None:
            self.backbone = OPTConfig(**_FLAT_DEFAULTS)
        if isinstance(self.backbone, dict):
            self.backbone = OPTConfig(**{k: v for k, v in self.backbone.items() if k != "model_type"})
        if not isinstance(self.backbone, OPTConfig):
            raise ValueError(
                f"A SentenceOPT's backbone must be an OPTConfig, got {type(self.backbone).__name__}; for other "
                "families use SentenceLMConfig / SentenceLMForCausalLM."
            )
        super().__post_init__(**kwargs)


def _checked_opt_fields(fields: dict) -> dict:
    """Refuse OPT backbone fields of the wrong type or range with a `ValueError` naming them."""
    given = SimpleNamespace(**fields)
    check_positive(given, *(name for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim") if name in fields))
    if "max_position_embeddings" in fields:
        check_positive(given, "max_position_embeddings", minimum=2)
    if given.hidden_size % given.num_attention_heads:
        raise ValueError(
            f"`num_attention_heads` ({given.num_attention_heads}) must divide `hidden_size` ({given.hidden_size})."
        )
    check_probability(given, *(name for name in ("dropout", "attention_dropout", "layerdrop") if name in fields))
    if "activation_function" in fields:
        check_choice("activation_function", given.activation_function, ACTIVATIONS)
    if "init_std" in fields:
        check_real(given, "init_std", strict=True)
    check_bool(given, *(n for n in ("do_layer_norm_before", "enable_bias", "layer_norm_elementwise_affine") if n in fields))
    return fields
