"""Configuration of SentenceLM, the Sentence-level LLM over any decoder-only backbone."""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

from .configuration_sentence_vae import (
    SentenceVAEConfig,
    check_bool,
    check_choice,
    check_config_version,
    check_real,
    keep_extra_keys,
    reject_unknown_keys,
    set_aside_unknown_keys,
)

CONFIG_VERSION = 2
"""Format of `SentenceLMConfig`: 2 nests the backbone's own config (release 0.1.0 wrote flat OPT
fields, version 1; `SentenceOPTConfig` still reads those)."""

NEXT_VECTOR_OBJECTIVES = ("mse", "contrastive")
NEXT_VECTOR_TEMPERATURE = 0.1
"""Temperature of the contrastive next-vector loss (cosine similarities in [-1, 1] / 0.1)."""

_DERIVED_KEYS = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")


def backbone_width(backbone: PreTrainedConfig) -> int:
    """Width of the vectors a backbone reads as ``inputs_embeds`` and writes as its last hidden
    state: ``hidden_size``, except for OPTs with a projected embedding (OPT-350m's
    ``word_embed_proj_dim``)."""
    return getattr(backbone, "word_embed_proj_dim", None) or backbone.hidden_size


def check_decoder_only(backbone: PreTrainedConfig) -> None:
    """Refuse a backbone config that is not a decoder-only language model `transformers` knows."""
    model_type = getattr(backbone, "model_type", None)
    fix = (
        "A SentenceLM's backbone must be a decoder-only language model that `transformers` builds with "
        "`AutoModel` and runs on `inputs_embeds` (OPT, GPT-2, Llama, Qwen2, Mistral, Gemma, Phi, ...)."
    )
    if getattr(backbone, "is_encoder_decoder", False):
        raise ValueError(f"The backbone {model_type!r} is an encoder-decoder model. {fix}")
    if getattr(backbone, "is_decoder", True) is False or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"The backbone {model_type!r} is not a decoder-only language model. {fix}")
    if model_type not in MODEL_MAPPING_NAMES:
        raise ValueError(f"`transformers` has no base model (AutoModel) for the backbone {model_type!r}. {fix}")


def _token_setting(name: str):
    """Getter and setter of a token-level setting of `SentenceLMConfig`, kept in its
    `sentence_vae`: writing checks the value (a non-negative int inside the vocabulary; a
    one-element list is unpacked, as generation configs hold ids) and writes the SentenceVAE's."""

    def get(config):
        return getattr(config.sentence_vae, name)

    def set_(config, value) -> None:
        if isinstance(value, (list, tuple)) and len(value) == 1:
            value = value[0]
        if value == get(config):
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(
                f"`{name}` must be a non-negative integer, got {value!r}: a SentenceLM always has one "
                + ("vocabulary size." if name == "vocab_size" else "id for it (the end-of-sentence token ends every sentence).")
            )
        if name != "vocab_size" and value >= config.sentence_vae.vocab_size:
            raise ValueError(f"`{name}`={value} is outside the vocabulary [0, {config.sentence_vae.vocab_size}).")
        setattr(config.sentence_vae, name, value)
        config.mirror_token_settings()

    return get, set_


class SentenceLMConfig(PreTrainedConfig):
    r"""Configuration of [`SentenceLMModel`] and [`SentenceLMForCausalLM`]: the layers of any
    decoder-only `transformers` model (the *backbone*) run over sentence vectors, one step per
    sentence; a nested SentenceVAE turns sentences into vectors and back, and a stop head decides
    where a text ends. Built like `transformers`' composite configs (LLaVA's `text_config`).

    Positions count *sentences*: the backbone's ``max_position_embeddings`` is the most sentence
    slots in one context, the first slot being the start-of-text state, so a text may hold at most
    ``max_position_embeddings - 1`` sentences (each of at most ``sentence_vae.max_sentence_len``
    tokens). Past it, ``forward`` and ``generate`` refuse a longer text with a ``ValueError``
    naming ``max_position_embeddings``, and ``generate`` stops a row whose context is full.

    Args:
        sentence_vae (`SentenceVAEConfig` or `dict`, *optional*):
            The SentenceVAE's configuration; its `hidden_size` must equal the backbone's width, and
            its `vocab_size` and special token ids are the model's. Defaults to one encoder and one
            decoder layer of the backbone's width, heads and feed-forward size.
        backbone (`PreTrainedConfig` or `dict`, *optional*):
            The configuration of a decoder-only `transformers` model (a `dict` names its
            `model_type`); defaults to a `LlamaConfig`. Only its layers, norms and positions are
            built: its token-embedding table is never used, so it is not kept.
        base_model (`str`, *optional*):
            The token model the backbone was initialised from (Hub metadata of the model card).
        stop_loss_weight (`float`, defaults to 1.0):
            Weight of the stop head's loss in the training loss (reported NLLs always use 1).
        next_vector_weight (`float`, defaults to 0.0):
            Weight of an auxiliary loss, a finite number >= 0: the backbone's state before each
            sentence (what the Sentence Decoder writes the sentence from) must be the Sentence
            Encoder's vector of that sentence (mean squared error per dimension; the target is not
            trained by it), which the decoder learned to read in stage 1. The token loss reaches
            the backbone only through what the decoder reads of its state; this gives it a dense
            target in the space the decoder reads. Added to `loss` (reported as
            `next_vector_loss`), never to the NLLs; 0 (the default) leaves it out.
        next_vector_objective (`str`, defaults to `"mse"`):
            The form of that auxiliary loss. `"mse"`: the mean squared error above, which pulls the
            state towards the mean of the sentences that may follow (the decoder reads the mean as
            the most generic sentence). `"contrastive"`: InfoNCE over the batch's sentences, which
            makes the state pick out its own next sentence among the others: cross-entropy of
            the cosine similarities between each state and every sentence vector of the batch,
            divided by a temperature of `NEXT_VECTOR_TEMPERATURE` (0.1), with the true next
            sentence as the target. It rewards a state that carries what sets its sentence apart
            (the context) rather than what all sentences share.
        use_cache (`bool`, defaults to `True`):
            Whether generation keeps key/value caches.
        config_version (`int`, defaults to 2):
            Version of this configuration's format; checkpoints from other versions are refused.

    The token-level fields `vocab_size`, `pad_token_id`, `bos_token_id` and `eos_token_id` are
    read from `sentence_vae` (a value passed here that differs from the SentenceVAE's is
    refused) and mirrored into `backbone`; `hidden_size` and `max_position_embeddings` are read
    from `backbone`. All six can be written on this config and reach the nested ones (`hidden_size`
    both, so that they keep one width); a value that would leave them disagreeing is refused.
    `get_text_config()` returns the backbone's config, as `transformers` composites return their
    text model's: tools find the decoder's layers, heads and cache settings there. Every field is
    checked when the configuration is built: a value of the wrong type or range, a backbone that
    is not decoder-only, or an unknown key raises a `ValueError` that names the field.
    """

    model_type = "sentence_lm"
    sub_configs_defaults = {
        "backbone": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "sentence_vae": SentenceVAEConfig,
    }

    sentence_vae: SentenceVAEConfig | dict | None = None
    backbone: PreTrainedConfig | dict | None = None
    base_model: str | None = None
    stop_loss_weight: float = 1.0
    next_vector_weight: float = 0.0
    next_vector_objective: str = "mse"
    use_cache: bool = True
    tie_word_embeddings: bool = False
    config_version: int = CONFIG_VERSION

    derived_keys = _DERIVED_KEYS

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """As `PreTrainedConfig.from_dict`; keys this class (or the nested SentenceVAE config)
        does not know are kept as attributes instead of refused (see
        `SentenceVAEConfig.from_dict`)."""
        config_dict, extra = set_aside_unknown_keys(cls, config_dict)
        vae_extra = {}
        if isinstance(config_dict.get("sentence_vae"), dict):
            vae, vae_extra = set_aside_unknown_keys(SentenceVAEConfig, config_dict["sentence_vae"])
            config_dict = {**config_dict, "sentence_vae": vae}
        result = super().from_dict(config_dict, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        keep_extra_keys(config, extra)
        keep_extra_keys(config.sentence_vae, vae_extra)
        return result

    def __post_init__(self, **kwargs):
        derived = {key: kwargs.pop(key) for key in _DERIVED_KEYS if kwargs.get(key) is not None}
        kwargs = {key: value for key, value in kwargs.items() if key not in _DERIVED_KEYS}
        reject_unknown_keys(type(self), kwargs)
        check_config_version(self, CONFIG_VERSION)
        if isinstance(self.backbone, dict) and "model_type" not in self.backbone:
            raise ValueError(
                "`backbone` is a dict without `model_type`; name the backbone's family, e.g. "
                "backbone=dict(model_type='llama', hidden_size=...), or pass a config such as LlamaConfig(...)."
            )
        if self.backbone is None:
            self.backbone = self.default_backbone()
        if not isinstance(self.backbone, PreTrainedConfig):
            self.backbone = AutoConfig.for_model(**self.backbone)
        check_decoder_only(self.backbone)
        if self.sentence_vae is None:
            self.sentence_vae = SentenceVAEConfig(
                hidden_size=backbone_width(self.backbone),
                num_attention_heads=self.backbone.num_attention_heads,
                ffn_dim=backbone_ffn_dim(self.backbone),
            )
        super().__post_init__(**kwargs)
        check_real(self, "stop_loss_weight", "next_vector_weight")
        check_choice("next_vector_objective", self.next_vector_objective, NEXT_VECTOR_OBJECTIVES)
        check_bool(self, "use_cache")
        if self.base_model is not None and not isinstance(self.base_model, str):
            raise ValueError(f"`base_model` must be a checkpoint name (a string) or None, got {self.base_model!r}.")
        for key, value in derived.items():
            if value != getattr(self.sentence_vae, key):
                raise ValueError(
                    f"`{key}`={value!r} differs from the SentenceVAE's {key} ({getattr(self.sentence_vae, key)!r}); "
                    f"token-level settings are read from `sentence_vae`: set it there "
                    f"(sentence_vae=dict({key}=...)) instead."
                )
        self.mirror_token_settings()
        self.check_consistency()

    def mirror_token_settings(self) -> None:
        """Write the SentenceVAE's vocabulary size and special token ids into the backbone's
        config, so that tools reading them through `get_text_config()` get the model's own (the
        backbone's token-embedding table, the only part of it they size, is never built)."""
        for key in _DERIVED_KEYS:
            setattr(self.backbone, key, getattr(self.sentence_vae, key))

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        """The backbone's config, the decoder over sentence slots (its layers, heads, positions and
        cache settings; token-level fields mirrored from the SentenceVAE). With ``encoder=True``
        alone, this config itself (a SentenceLM has no separate text encoder config)."""
        if encoder and not decoder:
            return self
        self.mirror_token_settings()
        return self.backbone

    def check_consistency(self) -> None:
        """Raise a ``ValueError`` naming the fields when the nested configs disagree: the
        SentenceVAE's width must be the backbone's, and the backbone needs at least two sentence
        slots. Checked when the config is built and again when a model is built from it (a
        config changed in between, e.g. ``config.backbone.hidden_size = ...``)."""
        width = backbone_width(self.backbone)
        if self.sentence_vae.hidden_size != width:
            raise ValueError(
                f"The SentenceVAE's hidden_size ({self.sentence_vae.hidden_size}) differs from the backbone's "
                f"hidden_size ({width}); sentence vectors must have the backbone's width. "
                "Train or pick a SentenceVAE with the same hidden_size (or set both: config.backbone.hidden_size "
                "and config.sentence_vae.hidden_size)."
            )
        if self.max_position_embeddings is not None and self.max_position_embeddings < 2:
            raise ValueError(
                f"The backbone's max_position_embeddings ({self.max_position_embeddings}) must be at least 2: "
                "one slot for the start state and one per sentence."
            )

    @classmethod
    def default_backbone(cls) -> PreTrainedConfig:
        """The backbone config used when none is given."""
        spec = cls.sub_configs_defaults["backbone"]
        return spec.create_subconfig("backbone")[0]

    # Token-level settings live in the SentenceVAE; these keep the usual names working, and
    # writing them (as scripts, TRL and `resize_token_embeddings` do) writes the SentenceVAE's.
    vocab_size = property(*_token_setting("vocab_size"))
    pad_token_id = property(*_token_setting("pad_token_id"))
    bos_token_id = property(*_token_setting("bos_token_id"))
    eos_token_id = property(*_token_setting("eos_token_id"))

    # Shape settings live in the backbone.
    @property
    def hidden_size(self) -> int:
        """Width of the sentence vectors and of the backbone's states. Writing it sets the width of
        both the backbone and the SentenceVAE (and the fields derived from it: the backbone's
        ``head_dim``, OPT's ``word_embed_proj_dim``), for a model to be built from this config."""
        return backbone_width(self.backbone)

    @hidden_size.setter
    def hidden_size(self, value: int) -> None:
        old = self.hidden_size
        if value == old:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`hidden_size` must be a positive integer, got {value!r}.")
        backbone, vae = self.backbone, self.sentence_vae
        heads = {"the backbone's": backbone.num_attention_heads, "the SentenceVAE's": vae.num_attention_heads}
        for owner, count in heads.items():
            if value % count:
                raise ValueError(
                    f"`hidden_size`={value} is not divisible by {owner} num_attention_heads ({count}); pick a "
                    "multiple of it, or change the heads too (config.backbone / config.sentence_vae) first."
                )
        if getattr(backbone, "head_dim", None) == backbone.hidden_size // backbone.num_attention_heads:
            backbone.head_dim = value // backbone.num_attention_heads
        if getattr(backbone, "word_embed_proj_dim", None) == old:
            backbone.word_embed_proj_dim = value
        backbone.hidden_size = vae.hidden_size = value

    @property
    def max_position_embeddings(self) -> int | None:
        """Sentence slots in one context, start state included (``None``: the backbone sets no
        limit). Writing it sets the backbone's (at least 2: the start state and one sentence)."""
        return getattr(self.backbone, "max_position_embeddings", None)

    @max_position_embeddings.setter
    def max_position_embeddings(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ValueError(
                f"`max_position_embeddings` must be an integer >= 2 (the start state and one slot per sentence), "
                f"got {value!r}."
            )
        self.backbone.max_position_embeddings = value


def backbone_ffn_dim(backbone: PreTrainedConfig) -> int:
    """The backbone's feed-forward width, whatever its family calls it."""
    for name in ("intermediate_size", "ffn_dim", "n_inner"):
        value = getattr(backbone, name, None)
        if value:
            return value
    return 4 * backbone.hidden_size
