"""Start a SentenceVAE's encoder and decoder layers from a pretrained token model's first layers.

A quality lever of stage 1 (``SentenceLMForCausalLM.from_pretrained_backbone(..., copy_layers=True)``):
the token model's layers already turn token embeddings into contextual states, so a SentenceVAE
whose layers start from them has less to learn than one whose layers are new. The SentenceVAE's
layers are pre-norm Transformer layers; what maps onto them is copied, per family of layer:

* Llama-style layers (Llama, SmolLM2, Qwen2, Mistral, ...): ``q/k/v/o_proj``, ``input_layernorm``
  and ``post_attention_layernorm`` (RMSNorm scales; a SentenceVAE with LayerNorms takes them as
  scales with zero bias), the gated ``mlp`` (``gate/up/down_proj``, which needs ``gated_ffn=True``);
* OPT layers: the same names as the SentenceVAE's (``self_attn``, ``fc1``/``fc2``, both norms);
* GPT-2 layers: ``attn.c_attn`` (split into queries, keys, values), ``attn.c_proj``, ``mlp``, ``ln_1``, ``ln_2``.

Grouped key/value heads are repeated to one per query head (what the token model's attention
computes). Encoder layer ``i`` starts from token layer ``i``, and so does decoder layer ``i``, or,
with ``decoder_layers="last"``, decoder layer ``i`` of ``k`` from token layer ``L - k + i`` of ``L``
(the layers nearest the token model's output, which turn states into next-token predictions), or
with a list of ``k`` token layer indices, from those (e.g. the first two and the last six: the
token model with its middle left out); then the decoder's final norm is the token model's too
(what its output layer reads) and its new cross-attention starts with a zero output projection,
so that the decoder starts as exactly those layers (it learns to read the sentence vector from there). Otherwise the decoder's cross-attention
is new, as are the encoder's fusion and norms. From a token model with rotary positions the
SentenceVAE takes rotary positions and RMSNorm too (:func:`layer_settings`), so that a copied stack
computes what it did in the token model; a token model's learned position table is not carried
over (the SentenceVAE's is new).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .configuration_sentence_vae import ACTIVATIONS

_LLAMA = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "norm1": "input_layernorm", "norm2": "post_attention_layernorm",
    "up": "mlp.up_proj", "gate": "mlp.gate_proj", "down": "mlp.down_proj",
}
_OPT = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
    "norm1": "self_attn_layer_norm", "norm2": "final_layer_norm", "up": "fc1", "down": "fc2",
}
_GPT2 = {"qkv": "attn.c_attn", "o": "attn.c_proj", "norm1": "ln_1", "norm2": "ln_2", "up": "mlp.c_fc", "down": "mlp.c_proj"}


def _layout(layer: nn.Module) -> dict[str, str] | None:
    for layout in (_LLAMA, _OPT, _GPT2):
        if all(_has(layer, path) for path in layout.values()):
            return layout
    return None


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def token_model_layers(token_model: nn.Module) -> nn.ModuleList:
    """The token model's stack of Transformer layers (the ``ModuleList`` of its base model with one
    entry per ``num_hidden_layers``)."""
    base = getattr(token_model, "base_model", token_model)
    count = getattr(base.config, "num_hidden_layers", None)
    for module in base.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and _layout(module[0]) is not None:
            return module
    raise ValueError(
        f"Cannot copy layers from a {type(token_model).__name__}: its layers are not Llama-, OPT- or GPT-2-style "
        "(attention projections, two norms and a feed-forward block under the names those families use). "
        "Build the SentenceVAE without copy_layers."
    )


_FINAL_NORMS = ("norm", "final_layer_norm", "decoder.final_layer_norm", "ln_f")
"""Where Llama-, OPT- and GPT-2-style base models keep the norm before their output layer."""


def token_model_final_norm(token_model: nn.Module) -> nn.Module | None:
    """The norm the token model applies before its output layer, or ``None`` (e.g. OPT-350m, whose
    layers normalise after themselves)."""
    base = getattr(token_model, "base_model", token_model)
    for path in _FINAL_NORMS:
        if _has(base, path) and getattr(base.get_submodule(path), "weight", None) is not None:
            return base.get_submodule(path)
    return None


def layer_settings(token_model: nn.Module) -> dict:
    """The SentenceVAE config fields under which copied layers compute what they computed in the
    token model: ``gated_ffn``, ``activation_function`` and ``tie_word_embeddings`` (an untied token
    model's last layers feed its own output layer, which the SentenceVAE then takes); for a token
    model with rotary positions (Llama-style), also ``position_embedding="rotary"`` with its
    ``rope_theta`` and its norms (``norm="rms_norm"`` with its epsilon). A rotary token model's
    scaled variants (``rope_type`` other than ``"default"``) are read as the default: sentences are
    short, the scaling is for long contexts."""
    config = token_model.config
    activation = getattr(config, "hidden_act", None) or getattr(config, "activation_function", None)
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"The token model's feed-forward activation {activation!r} is not one the SentenceVAE has "
            f"({', '.join(ACTIVATIONS)}); its layers cannot be copied. Build the SentenceVAE without copy_layers."
        )
    llama_style = _layout(token_model_layers(token_model)[0]) is _LLAMA
    settings = {"gated_ffn": llama_style, "activation_function": activation,
                "tie_word_embeddings": bool(getattr(config.get_text_config(), "tie_word_embeddings", True))}  # fmt: skip
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if llama_style and theta is not None:
        settings.update(position_embedding="rotary", rope_theta=float(theta))
        eps = getattr(config, "rms_norm_eps", None)
        if eps is not None:
            settings.update(norm="rms_norm", layer_norm_eps=float(eps))
    return settings


def _weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight, bias)`` of a norm or a ``Linear`` (``(out, in)``; GPT-2's ``Conv1D`` transposed to that)."""
    weight = module.weight.t() if isinstance(module, Conv1D) else module.weight
    return weight, getattr(module, "bias", None)


def _parts(layer: nn.Module, num_heads: int, num_kv_heads: int) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """The layer's weights under family-neutral names, keys and values repeated to ``num_heads`` heads."""
    parts = {name: _weights(layer.get_submodule(path)) for name, path in _layout(layer).items()}
    if "qkv" in parts:
        weight, bias = parts.pop("qkv")
        for name, w, b in zip("qkv", weight.chunk(3, dim=0), bias.chunk(3) if bias is not None else (None,) * 3):
            parts[name] = (w, b)
    if num_kv_heads != num_heads:
        repeat = num_heads // num_kv_heads
        for name in "kv":
            weight, bias = parts[name]
            weight = weight.reshape(num_kv_heads, -1, weight.shape[-1]).repeat_interleave(repeat, 0).flatten(0, 1)
            bias = bias.reshape(num_kv_heads, -1).repeat_interleave(repeat, 0).flatten() if bias is not None else None
            parts[name] = (weight, bias)
    return parts


def _assign(target: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, what: str) -> None:
    if target.weight.shape != weight.shape:
        raise ValueError(
            f"The token model's {what} has shape {tuple(weight.shape)} but the SentenceVAE's has "
            f"{tuple(target.weight.shape)}: copied layers need the token model's width, heads and feed-forward "
            "size (build the SentenceVAE with from_pretrained_backbone's defaults for them)."
        )
    target.weight.copy_(weight)
    if getattr(target, "bias", None) is not None:
        target.bias.copy_(bias if bias is not None else torch.zeros_like(target.bias))


COPIED_LAYERS = ("first", "last")
"""Which token layers a SentenceVAE's decoder starts from, by name (or a list of indices; its
encoder: always the first)."""


def decoder_layer_indices(decoder_layers: str | Sequence[int], num_decoder_layers: int, num_token_layers: int) -> list[int]:
    """The token layers a decoder of ``num_decoder_layers`` layers starts from: ``"first"``,
    ``"last"``, or a list of that many distinct indices in ``[0, num_token_layers)``."""
    if decoder_layers == "first":
        return list(range(num_decoder_layers))
    if decoder_layers == "last":
        return list(range(num_token_layers - num_decoder_layers, num_token_layers))
    if isinstance(decoder_layers, str) or not all(isinstance(i, int) for i in decoder_layers):
        raise ValueError(f"decoder_layers must be one of {COPIED_LAYERS} or a list of layer indices, got {decoder_layers!r}.")
    indices = list(decoder_layers)
    if len(indices) != num_decoder_layers or len(set(indices)) != len(indices):
        raise ValueError(
            f"The decoder has {num_decoder_layers} layers but {len(indices)} token layers were named ({indices}"
            f"{', some twice' if len(set(indices)) != len(indices) else ''}); name each of its layers' source once "
            "(or set num_decoder_layers to match)."
        )
    if not all(0 <= i < num_token_layers for i in indices):
        raise ValueError(f"Token layer indices {indices} are out of range: the token model has {num_token_layers} layers (0..{num_token_layers - 1}).")
    return indices


@torch.no_grad()
def copy_token_model_layers(
    token_model: nn.Module, sentence_vae: nn.Module, decoder_layers: str | Sequence[int] = "first"
) -> None:
    """Copy the token model's first layers into ``sentence_vae``'s encoder layers and its first,
    last or listed layers (``decoder_layers``) into the decoder's (see the module's docstring)."""
    layers = token_model_layers(token_model)
    config, vae_config = token_model.config, sentence_vae.config
    needed = max(vae_config.num_encoder_layers, vae_config.num_decoder_layers)
    if needed > len(layers):
        raise ValueError(
            f"The SentenceVAE has {needed} encoder or decoder layers but the token model only {len(layers)} to copy "
            "from; use at most that many layers."
        )
    decoder_sources = decoder_layer_indices(decoder_layers, vae_config.num_decoder_layers, len(layers))
    num_heads = config.num_attention_heads
    if num_heads != vae_config.num_attention_heads:
        raise ValueError(
            f"The token model has {num_heads} attention heads and the SentenceVAE {vae_config.num_attention_heads}; "
            "copied layers need the same number of heads."
        )
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    encoder_sources = range(len(sentence_vae.encoder.layers))
    for stack, sources in ((sentence_vae.encoder.layers, encoder_sources), (sentence_vae.decoder.layers, decoder_sources)):
        for index, target in zip(sources, stack):
            parts = _parts(layers[index], num_heads, num_kv_heads)
            if ("gate" in parts) != (target.ffn.gate_proj is not None):
                raise ValueError(
                    "The token model's feed-forward is " + ("gated" if "gate" in parts else "not gated")
                    + f" but the SentenceVAE has gated_ffn={vae_config.gated_ffn}; set gated_ffn to match."
                )
            attention = target.self_attn
            destinations = {
                "q": attention.q_proj, "k": attention.k_proj, "v": attention.v_proj, "o": attention.out_proj,
                "norm1": target.self_attn_layer_norm, "norm2": target.final_layer_norm,
                "up": target.ffn.fc1, "down": target.ffn.fc2, "gate": target.ffn.gate_proj,
            }
            for name, (weight, bias) in parts.items():
                _assign(destinations[name], weight, bias, f"layer {index} {name}")
    if decoder_layers != "first":
        final_norm = token_model_final_norm(token_model)
        if final_norm is not None:
            _assign(sentence_vae.decoder.layer_norm, *_weights(final_norm), "final norm")
        for layer in sentence_vae.decoder.layers:  # the decoder starts as the token model's last layers
            layer.cross_attn.out_proj.weight.zero_()
            layer.cross_attn.out_proj.bias.zero_()
