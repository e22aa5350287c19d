"""Configuration of the SentenceVAE (sentence encoder + sentence decoder)."""

from __future__ import annotations

import dataclasses
import math
import numbers

from transformers import GenerationConfig, PreTrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

FUSIONS = ("learnable", "sum", "mean")
POSITION_EMBEDDINGS = ("learned", "sinusoidal", "rotary")
NORMS = ("layer_norm", "rms_norm")
ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu")
CONFIG_VERSION = 1

# Keys that `transformers` itself may hand to a config's constructor (read from a saved
# config.json or set by `from_pretrained`); anything else unknown is a typo and is refused.
_LIBRARY_KEYS = frozenset(
    {
        "model_type",
        "auto_map",
        "name_or_path",
        "_name_or_path",
        "torch_dtype",
        "attn_implementation",
        "experts_implementation",
        "output_attentions",
        "_commit_hash",
        "num_labels",
        "use_cache",
        "_attn_implementation_autoset",
        "_attn_implementation_internal",
        "_experts_implementation_internal",
    }
) | frozenset(GenerationConfig._get_default_generation_params())


def check_choice(name: str, value, allowed) -> None:
    """Raise a ``ValueError`` naming config field ``name`` unless ``value`` is in ``allowed``."""
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}.")


def check_positive(config: PreTrainedConfig, *names: str, minimum: int = 1) -> None:
    """Raise a ``ValueError`` unless each integer field in ``names`` is at least ``minimum``."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")


def _is_real(value) -> bool:
    """A finite real number (``int`` or ``float``, numpy scalars included), not a ``bool``."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_probability(config: PreTrainedConfig, *names: str) -> None:
    """Raise a ``ValueError`` unless each field in ``names`` is a number in [0, 1)."""
    for name in names:
        value = getattr(config, name)
        if not _is_real(value) or not 0 <= value < 1:
            raise ValueError(f"`{name}` must be a number in [0, 1), got {value!r}.")


def check_real(config: PreTrainedConfig, *names: str, minimum: float = 0.0, strict: bool = False) -> None:
    """Raise a ``ValueError`` unless each field in ``names`` is a finite number ``>= minimum``
    (``> minimum`` when ``strict``)."""
    for name in names:
        value = getattr(config, name)
        if not _is_real(value) or value < minimum or (strict and value == minimum):
            relation = ">" if strict else ">="
            raise ValueError(f"`{name}` must be a finite number {relation} {minimum:g}, got {value!r}.")


def check_bool(config: PreTrainedConfig, *names: str) -> None:
    """Raise a ``ValueError`` unless each field in ``names`` is ``True`` or ``False``."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise ValueError(f"`{name}` must be True or False, got {value!r}.")


def check_config_version(config: PreTrainedConfig, expected: int = CONFIG_VERSION) -> None:
    """Refuse a configuration written in another format version (an older or newer checkpoint)."""
    version = config.config_version
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"`config_version` must be an integer, got {version!r}; re-save the checkpoint.")
    if version != expected:
        raise ValueError(
            f"This checkpoint's config has config_version={version!r}, but this sentence_lm reads version "
            f"{expected} for {type(config).__name__}. Upgrade sentence_lm or re-save the checkpoint with a "
            "matching version."
        )


def _own_fields(config_class: type) -> set[str]:
    """Fields declared by ``config_class`` and its bases below `PreTrainedConfig`, plus its
    ``shortcut_fields`` (keyword arguments it takes and files elsewhere)."""
    fields = set(getattr(config_class, "shortcut_fields", ()))
    for cls in config_class.__mro__:
        if cls is PreTrainedConfig:
            break
        fields.update(vars(cls).get("__annotations__", {}))
    return fields


def set_aside_unknown_keys(config_class: type, config_dict: dict) -> tuple[dict, dict]:
    """Split a saved configuration's dict into what ``config_class`` takes and the other keys
    (an attribute a user or `transformers` set on the config, e.g. ``quantization_config``)."""
    known = {f.name for f in dataclasses.fields(config_class)} | _own_fields(config_class) | _LIBRARY_KEYS
    known |= set(getattr(config_class, "derived_keys", ()))
    extra = {k: v for k, v in config_dict.items() if k not in known}
    return {k: v for k, v in config_dict.items() if k not in extra}, extra


def keep_extra_keys(config: PreTrainedConfig, extra: dict) -> None:
    """Set the keys :func:`set_aside_unknown_keys` put aside as attributes of the loaded config
    (as `PreTrainedConfig` keeps unknown keys), so that saving it again writes them back."""
    for key, value in extra.items():
        setattr(config, key, value)
    if extra:
        logger.info("%s keeps unknown keys of the saved config as attributes: %s", type(config).__name__, sorted(extra))


def reject_unknown_keys(config_class: type, kwargs: dict) -> None:
    """Refuse keyword arguments that are neither fields of ``config_class`` nor library keys."""
    unknown = sorted(set(kwargs) - _LIBRARY_KEYS)
    if unknown:
        fields = sorted(k for k in _own_fields(config_class) if not k.startswith("_"))
        raise ValueError(
            f"Unknown {config_class.__name__} key(s) {unknown}. Check the spelling; valid keys are: "
            + ", ".join(fields)
        )


class SentenceVAEConfig(PreTrainedConfig):
    r"""Configuration of a [`SentenceVAEModel`]: a Sentence Encoder that turns a sentence into one
    vector and a Sentence Decoder that writes the sentence back from that vector.

    Args:
        vocab_size (`int`, defaults to 50272):
            Size of the token vocabulary (OPT's by default).
        hidden_size (`int`, defaults to 768):
            Width of the token embeddings, the layers and the sentence vector. In a SentenceOPT it
            must equal the backbone's `hidden_size`.
        num_encoder_layers (`int`, defaults to 1):
            Transformer layers of the Sentence Encoder (SVAE-H1/H2/H4 use 1, 2, 4).
        num_decoder_layers (`int`, defaults to 1):
            Transformer layers of the Sentence Decoder.
        num_attention_heads (`int`, defaults to 12):
            Attention heads per layer; must divide `hidden_size`.
        ffn_dim (`int`, defaults to 3072):
            Width of each layer's feed-forward block.
        activation_function (`str`, defaults to `"relu"`):
            Feed-forward activation: one of `"relu"`, `"gelu"`, `"gelu_new"`, `"silu"`.
        gated_ffn (`bool`, defaults to `False`):
            Whether each feed-forward block is gated as Llama's is, `fc2(act(gate_proj(x)) * fc1(x))`
            (one more `Linear(hidden, ffn_dim)` per layer), instead of `fc2(act(fc1(x)))`. Set by
            `from_pretrained_backbone(..., copy_layers=True)` when the token model's layers are gated.
        dropout (`float`, defaults to 0.1):
            Dropout on embeddings and residual branches, in [0, 1).
        attention_dropout (`float`, defaults to 0.0):
            Dropout on attention weights, in [0, 1).
        max_sentence_len (`int`, defaults to 64):
            Most tokens in one sentence (at least 2). Past it: segmentation cuts a longer run of
            tokens into pieces of exactly this length (losslessly, wherever the limit falls, even
            inside a word), so a text of any length without punctuation is still accepted; the
            encoder's `encode`/`forward` refuse a packed sentence longer than this with a
            `ValueError`; the decoder writes at most this many tokens per sentence (a continued
            prefix included) and then ends the sentence without an end-of-sentence token. The
            model segments with its own `max_sentence_len`, whatever the tokenizer's is.
        fusion (`str`, defaults to `"learnable"`):
            How the encoder's token states become one vector: `"learnable"` (a `Linear(H, 1)`
            weights each token, softmax over the sentence, weighted sum; the paper's choice),
            `"sum"` or `"mean"` over the sentence's tokens. A LayerNorm follows in every case.
        position_embedding (`str`, defaults to `"learned"`):
            Token positions within a sentence: `"learned"` table or fixed `"sinusoidal"`, added to
            the token embeddings, or `"rotary"`: queries and keys of every self-attention rotated
            by position (RoPE with `rope_theta`, as Llama-style token models do, so that layers
            copied from one (`from_pretrained_backbone(copy_layers=...)`) see positions as they
            were trained to).
        rope_theta (`float`, defaults to 10000.0):
            Base of the rotary frequencies (with `position_embedding="rotary"`).
        norm (`str`, defaults to `"layer_norm"`):
            Every norm of the encoder and decoder: `"layer_norm"` (LayerNorm) or `"rms_norm"`
            (RMSNorm, a scale and no bias, as Llama-style token models' layers have).
        share_embeddings (`bool`, defaults to `True`):
            Whether encoder and decoder use one token embedding.
        tie_word_embeddings (`bool`, defaults to `True`):
            Whether the decoder's output layer shares its weight with the decoder's embedding.
        focal_gamma (`float`, defaults to 0.0):
            Focal-loss exponent of the reconstruction loss, a finite number >= 0; 0 is plain
            cross-entropy, the paper trains with 2.
        num_memory_vectors (`int`, defaults to 1):
            How many vectors the Sentence Decoder reads the sentence vector as (at least 1). With 1
            (the paper's design) every decoder position cross-attends to the sentence vector itself,
            which adds the same vector to every position: the decoder has to pull the token of
            each position out of one sum. With `m > 1` a `Linear(hidden, m * hidden)` widens it into
            `m` vectors and each position attends over them with its own query, so positions can
            read different parts of the sentence vector (more conditioning, a little more work per
            token). The interface (one vector per sentence) is the same.
        condition_inputs (`bool`, defaults to `False`):
            Whether the Sentence Decoder also adds the sentence vector, scaled by `hidden ** -0.5`
            and through a `Linear(hidden, hidden)`, to the input of every position (token and
            position embeddings), before its first layer. Cross-attention alone reaches a position
            only after that layer's self-attention, so a one-layer decoder's attention never sees
            the sentence; with this, every layer (its self-attention included) works on positions
            that already carry it. The `Linear` starts at zero (a new decoder starts as one without
            it). One product per sentence, one addition per token.
        context_window (`int`, defaults to 0):
            Tokens of the text before its sentence that the Sentence Decoder also reads, an integer
            >= 0 (the Byte Latent Transformer's local decoder does this): in a SentenceLM, each
            sentence is written after the last `context_window` tokens of the text before it (the
            prompt's and the generated ones; fewer at the start), which the decoder's
            self-attention sees: the last of them is the decoder's first input, where it reads BOS
            without a window (so that the sentence continues the text, as a token model's layers
            read text: a BOS between them would tell such layers that a new text starts), the others
            come before it, with position embeddings of their own (a learned table of
            `context_window - 1` rows, by distance; none with rotary positions, whose negative
            positions tell them apart); in generation they are part of the decoder's cache.
            0 (the default) writes each sentence from the backbone state alone.
            A SentenceVAE trained alone (stage 1) has no text around its sentences and reads none.
        bag_of_words_weight (`float`, defaults to 0.0):
            Weight of an auxiliary loss, a finite number >= 0, added to the reconstruction loss in
            training and evaluation: the sentence vector alone (through a `Linear(hidden, hidden)`
            and the output layer, one softmax per sentence) must give every token of its
            sentence, whatever its position (a bag-of-words loss). It makes the encoder put the
            sentence's words into the vector from the first steps, before the decoder has learned
            to read it. 0 (the default) leaves it out (and the layer is not built).
        parallel_readout_weight (`float`, defaults to 0.0):
            Weight of an auxiliary loss, a finite number >= 0: a one-layer *parallel readout*
            (a learned query per position attending over the decoder's memory vectors, a
            feed-forward block, then the output layer) must give every token of the sentence, and
            its end, from the sentence vector alone, all positions at once, without the tokens
            before them. It makes the vector say which token sits where. 0 (the default) leaves it
            out (and its layers are not built).
        word_dropout (`float`, defaults to 0.0):
            Probability, in [0, 1), that a token the Sentence Decoder is fed in stage-1 training
            (teacher forcing) is blanked (its embedding replaced by the padding embedding; its
            position kept), so that the decoder has to take the words from the sentence vector
            rather than guess them from the words before. Not applied in evaluation, in
            generation or in a SentenceLM's loss.
        loss_chunk_size (`int`, *optional*):
            Training computes the reconstruction loss from the decoder states through the output
            layer without building the logits (see `output_layer_nll`); it holds one
            `(target steps, vocab)` tensor between the forward and backward passes. With a number
            of rows here, no vocabulary-wide tensor outlives a chunk of that many rows (the
            backward pass recomputes each chunk's logits: one more output-layer matmul for far
            less memory; for large batches on a GPU). `None` (the default): one chunk. Applies to
            a SentenceLM's loss too.
        layer_norm_eps (`float`, defaults to 1e-5):
            Epsilon of every norm; a finite number > 0.
        init_std (`float`, defaults to 0.02):
            Standard deviation of the normal weight initialisation; a finite number > 0.
        pad_token_id (`int`, defaults to 1):
            Padding id of packed sentences.
        bos_token_id (`int`, defaults to 2):
            First input of the decoder (OPT's `</s>`).
        eos_token_id (`int`, defaults to 2):
            End-of-sentence token the decoder writes after a sentence; never part of the text.
        config_version (`int`, defaults to 1):
            Version of this configuration's format; checkpoints from other versions are refused.

    Every field is checked when the configuration is built (also when a checkpoint's
    `config.json` is read): a value of the wrong type or out of range, or an unknown key, raises a
    `ValueError` that names the field.

    Example:

    ```python
    >>> from sentence_lm import SentenceVAEConfig, SentenceVAEModel
    >>> config = SentenceVAEConfig(vocab_size=1000, hidden_size=64, num_attention_heads=4, ffn_dim=128)
    >>> model = SentenceVAEModel(config)
    ```
    """

    model_type = "sentence_vae"

    vocab_size: int = 50272
    hidden_size: int = 768
    num_encoder_layers: int = 1
    num_decoder_layers: int = 1
    num_attention_heads: int = 12
    ffn_dim: int = 3072
    activation_function: str = "relu"
    gated_ffn: bool = False
    dropout: float = 0.1
    attention_dropout: float = 0.0
    max_sentence_len: int = 64
    fusion: str = "learnable"
    position_embedding: str = "learned"
    rope_theta: float = 10000.0
    norm: str = "layer_norm"
    share_embeddings: bool = True
    tie_word_embeddings: bool = True
    focal_gamma: float = 0.0
    num_memory_vectors: int = 1
    condition_inputs: bool = False
    context_window: int = 0
    bag_of_words_weight: float = 0.0
    parallel_readout_weight: float = 0.0
    word_dropout: float = 0.0
    loss_chunk_size: int | None = None
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2
    config_version: int = CONFIG_VERSION

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """As `PreTrainedConfig.from_dict`; keys this class does not know (set on a saved config
        by a user or by `transformers`) are kept as attributes instead of refused, so whatever
        `save_pretrained` wrote loads back. A misspelt keyword argument to the constructor is
        still refused."""
        config_dict, extra = set_aside_unknown_keys(cls, config_dict)
        result = super().from_dict(config_dict, **kwargs)
        keep_extra_keys(result[0] if isinstance(result, tuple) else result, extra)
        return result

    def __post_init__(self, **kwargs):
        reject_unknown_keys(type(self), kwargs)
        check_config_version(self)
        check_positive(self, "vocab_size", "hidden_size", "num_attention_heads", "ffn_dim")
        check_positive(self, "num_encoder_layers", "num_decoder_layers", "num_memory_vectors")
        check_positive(self, "max_sentence_len", minimum=2)
        check_positive(self, "context_window", minimum=0)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must divide `hidden_size` "
                f"({self.hidden_size})."
            )
        check_probability(self, "dropout", "attention_dropout", "word_dropout")
        check_choice("fusion", self.fusion, FUSIONS)
        check_choice("position_embedding", self.position_embedding, POSITION_EMBEDDINGS)
        check_choice("norm", self.norm, NORMS)
        check_choice("activation_function", self.activation_function, ACTIVATIONS)
        check_real(self, "focal_gamma", "bag_of_words_weight", "parallel_readout_weight")
        if self.loss_chunk_size is not None:
            check_positive(self, "loss_chunk_size")
        check_real(self, "layer_norm_eps", "init_std", "rope_theta", strict=True)
        check_bool(self, "share_embeddings", "tie_word_embeddings", "gated_ffn", "condition_inputs")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(f"`{name}` must be a token id in [0, vocab_size={self.vocab_size}), got {value!r}.")
        super().__post_init__(**kwargs)
