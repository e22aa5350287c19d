"""Configuration of SentenceOPT, the Sentence-level LLM with an OPT backbone."""

from __future__ import annotations

from transformers import PreTrainedConfig

from .configuration_sentence_vae import (
    ACTIVATIONS,
    CONFIG_VERSION,
    SentenceVAEConfig,
    check_bool,
    check_choice,
    check_config_version,
    check_positive,
    check_probability,
    check_real,
    reject_unknown_keys,
)

_DERIVED_KEYS = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")


class SentenceOPTConfig(PreTrainedConfig):
    r"""Configuration of [`SentenceOPTModel`] and [`SentenceOPTForCausalLM`]: OPT decoder layers
    that run over sentence vectors (one step per sentence), a nested SentenceVAE that turns
    sentences into vectors and back, and a stop head.

    The backbone fields have the names and meaning of `transformers.OPTConfig`, except that
    positions count *sentences*: `max_position_embeddings` is the most sentence slots in one
    context, the first slot being the start-of-text state, so a text may hold at most
    `max_position_embeddings - 1` sentences (each of at most `sentence_vae.max_sentence_len`
    tokens). Past it: `forward` and `generate` refuse a text with more sentences with a
    `ValueError` naming `max_position_embeddings` (split the text, or train a backbone with more
    positions); `generate` stops a row when its context is full, so it writes at most
    `(max_position_embeddings - 1) * sentence_vae.max_sentence_len` tokens per text, prompt
    included, whatever `max_new_tokens` says.

    Args:
        sentence_vae (`SentenceVAEConfig` or `dict`, *optional*):
            The SentenceVAE's configuration; its `hidden_size` must equal `hidden_size`, and its
            `vocab_size` and special token ids are the model's.
        hidden_size (`int`, defaults to 768):
            Width of the backbone and of the sentence vectors.
        num_hidden_layers (`int`, defaults to 12):
            Backbone decoder layers.
        num_attention_heads (`int`, defaults to 12):
            Attention heads per backbone layer; must divide `hidden_size`.
        ffn_dim (`int`, defaults to 3072):
            Width of the backbone's feed-forward blocks.
        max_position_embeddings (`int`, defaults to 2048):
            Sentence slots in one context (start state included, at least 2): a text holds at
            most `max_position_embeddings - 1` sentences. A longer prompt is refused with a
            `ValueError`; generation stops when the slots are full (see above).
        do_layer_norm_before (`bool`, defaults to `True`):
            Pre-LayerNorm (OPT-125m and most sizes) or post-LayerNorm (OPT-350m).
        dropout (`float`, defaults to 0.1):
            Dropout on the backbone's residual branches, in [0, 1).
        attention_dropout (`float`, defaults to 0.0):
            Dropout on the backbone's attention weights, in [0, 1).
        activation_function (`str`, defaults to `"relu"`):
            Backbone feed-forward activation.
        layerdrop (`float`, defaults to 0.0):
            Probability of skipping a backbone layer in training, in [0, 1).
        init_std (`float`, defaults to 0.02):
            Standard deviation of the normal weight initialisation; a finite number > 0.
        enable_bias (`bool`, defaults to `True`):
            Biases in the backbone's linear layers.
        layer_norm_elementwise_affine (`bool`, defaults to `True`):
            Learnable backbone LayerNorm parameters.
        base_model (`str`, *optional*):
            The OPT checkpoint the backbone was initialised from (Hub metadata of the model card).
        stop_loss_weight (`float`, defaults to 1.0):
            Weight of the stop head's loss in the training loss (reported NLLs always use 1).
        use_cache (`bool`, defaults to `True`):
            Whether generation keeps key/value caches.
        config_version (`int`, defaults to 1):
            Version of this configuration's format; checkpoints from other versions are refused.

    The token-level fields `vocab_size`, `pad_token_id`, `bos_token_id` and `eos_token_id` are
    read from `sentence_vae` and cannot be set here (a value that differs from the SentenceVAE's
    is refused). Every field is checked when the configuration is built: a value of the wrong
    type or out of range, or an unknown key, raises a `ValueError` that names the field.
    """

    model_type = "sentence_opt"
    sub_configs_defaults = {"sentence_vae": SentenceVAEConfig}

    sentence_vae: SentenceVAEConfig | dict | None = None
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_function: str = "relu"
    layerdrop: float = 0.0
    init_std: float = 0.02
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    base_model: str | None = None
    stop_loss_weight: float = 1.0
    use_cache: bool = True
    tie_word_embeddings: bool = False
    config_version: int = CONFIG_VERSION

    def __post_init__(self, **kwargs):
        derived = {key: kwargs.pop(key) for key in _DERIVED_KEYS if kwargs.get(key) is not None}
        kwargs = {key: value for key, value in kwargs.items() if key not in _DERIVED_KEYS}
        reject_unknown_keys(type(self), kwargs)
        check_config_version(self)
        if self.sentence_vae is None:
            self.sentence_vae = SentenceVAEConfig(
                hidden_size=self.hidden_size,
                num_attention_heads=self.num_attention_heads,
                ffn_dim=self.ffn_dim,
            )
        super().__post_init__(**kwargs)
        check_positive(self, "hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim")
        check_positive(self, "max_position_embeddings", minimum=2)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must divide `hidden_size` ({self.hidden_size})."
            )
        check_probability(self, "dropout", "attention_dropout", "layerdrop")
        check_choice("activation_function", self.activation_function, ACTIVATIONS)
        check_real(self, "stop_loss_weight")
        check_real(self, "init_std", strict=True)
        check_bool(self, "do_layer_norm_before", "enable_bias", "layer_norm_elementwise_affine", "use_cache")
        if self.base_model is not None and not isinstance(self.base_model, str):
            raise ValueError(f"`base_model` must be a checkpoint name (a string) or None, got {self.base_model!r}.")
        for key, value in derived.items():
            if value != getattr(self.sentence_vae, key):
                raise ValueError(
                    f"`{key}`={value!r} differs from the SentenceVAE's {key} ({getattr(self.sentence_vae, key)!r}); "
                    f"token-level settings are read from `sentence_vae`: set it there "
                    f"(sentence_vae=dict({key}=...)) instead."
                )
        if self.sentence_vae.hidden_size != self.hidden_size:
            raise ValueError(
                f"The SentenceVAE's hidden_size ({self.sentence_vae.hidden_size}) differs from the backbone's "
                f"hidden_size ({self.hidden_size}); sentence vectors must have the backbone's width. "
                "Train or pick a SentenceVAE with the same hidden_size."
            )

    # Token-level settings live in the SentenceVAE; these keep the usual names working.
    @property
    def vocab_size(self) -> int:
        return self.sentence_vae.vocab_size

    @property
    def pad_token_id(self) -> int:
        return self.sentence_vae.pad_token_id

    @property
    def bos_token_id(self) -> int:
        return self.sentence_vae.bos_token_id

    @property
    def eos_token_id(self) -> int:
        return self.sentence_vae.eos_token_id
