"""Weight-only int8 quantization of SentenceLM models (and of their token models, for a
comparison in kind), the `transformers` way.

`from_pretrained(path, quantization_config=Int8WeightOnlyConfig())` loads a model with the
weights of its linear layers (backbone, SentenceVAE, output layer, draft head) stored as int8,
one float scale per output channel; activations stay in the model's dtype. ``save_pretrained``
writes the int8 weights and the config's ``quantization_config``, and ``from_pretrained`` of that
checkpoint loads them as they are (no `quantization_config` argument needed). The config and its
quantizer are registered with `transformers` (``quant_method="sentence_lm_int8"``) when this
module is imported, as ``import sentence_lm`` and the model files of a checkpoint do.

On a CPU the product runs on ``torch._weight_int8pack_mm`` (int8 weights, bfloat16
activations; for layers whose input width is a multiple of 16, which the kernel needs). Each row
of its output is the same whatever the other rows, so a row's greedy text does not depend on the
batch or on drafting. Measured on the 2-core EPYC for SmolLM2's output layer (49,152 x 576), two
threads: 2.3-2.8 ms for 1 row (bfloat16: 5.0-5.3 ms; float32: 11-12 ms), 5.8 ms for 8, 54 ms
for 64, slower than dequantizing for hundreds of rows (scoring long texts), which generation
never feeds it. On other devices, and for other widths, the weight is dequantized into the
activations' dtype first. Inference only: the
quantized layers do not train.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
)
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module
from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "sentence_lm_int8"


class Int8WeightOnlyConfig(QuantizationConfigMixin):
    """Weight-only int8 quantization of every `nn.Linear` of a SentenceLM (see
    :mod:`sentence_lm.quantization`).

    Args:
        modules_to_not_convert (`list[str]`, *optional*):
            Names (or name prefixes) of linear layers to keep in floating point, e.g.
            ``["model.sentence_vae.encoder"]``. The stop head (two outputs) is always kept.
    """

    def __init__(self, modules_to_not_convert: list[str] | None = None, **kwargs):
        self.quant_method = QUANT_METHOD
        if modules_to_not_convert is not None and (
            isinstance(modules_to_not_convert, str) or not all(isinstance(m, str) for m in modules_to_not_convert)
        ):
            raise ValueError(
                f"modules_to_not_convert must be a list of module names, got {modules_to_not_convert!r}."
            )
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert is not None else None


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 of a ``(out, in)`` weight: ``(int8 weight, float32
    scales)`` with ``weight ~= int8 * scales[:, None]``."""
    weight = weight.detach().float()
    scales = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    return (weight / scales[:, None]).round().clamp(-127, 127).to(torch.int8), scales


class Int8Linear(nn.Module):
    """A linear layer with an int8 ``weight`` ``(out, in)`` and float32 ``weight_scale``
    ``(out,)`` per output channel; the bias (if any) stays in floating point."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=torch.int8, device=device), requires_grad=False
        )
        self.weight_scale = nn.Parameter(
            torch.ones(out_features, dtype=torch.float32, device=device), requires_grad=False
        )
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """The int8 copy of a float ``linear``."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype,
                    linear.weight.device)  # fmt: skip
        weight, scales = quantize_int8(linear.weight)
        layer.weight.data, layer.weight_scale.data = weight, scales
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().clone()
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if x.device.type == "cpu" and self.in_features % 16 == 0:
            out = torch._weight_int8pack_mm(
                rows.to(torch.bfloat16).contiguous(), self.weight, self.weight_scale.to(torch.bfloat16)
            ).to(x.dtype)
        else:
            out = (rows @ self.weight.to(x.dtype).T) * self.weight_scale.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def _skipped(config: Int8WeightOnlyConfig) -> list[str]:
    return ["stop_head", *(config.modules_to_not_convert or [])]


def replace_linear_layers(model: nn.Module, skip: list[str]) -> list[str]:
    """Put an (empty) `Int8Linear` in place of every `nn.Linear` of ``model`` not under a name in
    ``skip``; the names replaced."""
    replaced = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and should_convert_module(name, skip):
            with torch.device("meta"):
                layer = Int8Linear(module.in_features, module.out_features, module.bias is not None, module.weight.dtype)
            model.set_submodule(name, layer)
            replaced.append(name)
    return replaced


class Int8Quantize(ConversionOps):
    """Loading op: a float ``...weight`` of an `Int8Linear` becomes its int8 weight and scale."""

    def convert(self, input_dict: dict, full_layer_name: str | None = None, **kwargs) -> dict:
        value = next(iter(input_dict.values()))
        value = value[0] if isinstance(value, list) else value
        weight, scales = quantize_int8(value)
        return {full_layer_name: weight, full_layer_name.removesuffix("weight") + "weight_scale": scales}


class Int8WeightOnlyQuantizer(HfQuantizer):
    """The `transformers` quantizer of :class:`Int8WeightOnlyConfig`."""

    requires_calibration = False

    def validate_environment(self, *args, **kwargs):
        pass

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module, tensor_name = get_module_from_name(model, param_name)
        return isinstance(module, Int8Linear) and tensor_name == "weight" and not self.pre_quantized

    def _process_model_before_weight_loading(self, model, **kwargs):
        replaced = replace_linear_layers(model, _skipped(self.quantization_config))
        # An output layer tied to the token embeddings gets int8 weights of its own (from the
        # embeddings, after loading): the embeddings stay in floating point.
        tied = model.all_tied_weights_keys
        self.untied = {k: tied[k] for k in tied if k.removesuffix(".weight") in replaced}  # layer: its source
        for key in self.untied:
            del tied[key]
            if not self.pre_quantized:  # a float checkpoint holds no weights of its own for the layer
                model._keys_to_ignore_on_load_missing.update({re.escape(key), re.escape(key) + "_scale"})
        for name, module in model.named_modules():
            tied = getattr(module, "_tied_weights_keys", None)
            if isinstance(tied, dict):
                prefix = f"{name}." if name else ""
                for key in [k for k in tied if prefix + k in self.untied]:
                    del tied[key]

    def _process_model_after_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            for key, source in self.untied.items():
                layer = model.get_submodule(key.removesuffix(".weight"))
                weight, scales = quantize_int8(model.get_parameter(source))
                layer.weight = nn.Parameter(weight, requires_grad=False)
                layer.weight_scale = nn.Parameter(scales, requires_grad=False)
        for layer in model.modules():
            if isinstance(layer, Int8Linear):
                # Weights read from a memory-mapped file may sit at any address; the int8 kernel
                # needs its own aligned copy (it crashes on a mapped one).
                layer.weight.data = layer.weight.data.clone(memory_format=torch.contiguous_format)
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    def get_quantize_ops(self):
        return Int8Quantize()


# Registered once per process, even when both the package and a checkpoint's copy of this module load.
if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = Int8WeightOnlyConfig
if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
    AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = Int8WeightOnlyQuantizer
