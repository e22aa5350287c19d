"""sentence_lm: next-sentence prediction for Hugging Face `transformers`.

Importing the package registers its configs and models with the `transformers` Auto classes, so
checkpoints load through `AutoConfig`, `AutoModel` and `AutoModelForCausalLM` without remote code.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_sentence_lm import SentenceLMConfig
from .configuration_sentence_opt import SentenceOPTConfig
from .configuration_sentence_vae import SentenceVAEConfig
from .corpus import default_corpus, group_paragraphs, read_text_lines, split_train_validation
from .metrics import reconstruction_metrics
from .generation_sentence_lm import SentenceGenerateOutput, SentenceGenerationMixin
from .modeling_sentence_lm import (
    SentenceLMCausalLMOutput,
    SentenceLMForCausalLM,
    SentenceLMModel,
    SentenceLMModelOutput,
)
from .modeling_sentence_opt import SentenceOPTForCausalLM, SentenceOPTModel
from .modeling_sentence_vae import SentenceDecodeOutput, SentenceVAEModel, SentenceVAEOutput
from .quantization import Int8WeightOnlyConfig
from .segmentation import PackedSentences, build_boundary_table, pack_sentences, segment_sentences
from .tokenization_sentence_lm import SentenceTokenizer, train_sentence_tokenizer

for _config, _models in (
    (SentenceVAEConfig, {AutoModel: SentenceVAEModel}),
    (SentenceLMConfig, {AutoModel: SentenceLMModel, AutoModelForCausalLM: SentenceLMForCausalLM}),
    (SentenceOPTConfig, {AutoModel: SentenceOPTModel, AutoModelForCausalLM: SentenceOPTForCausalLM}),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    _config.register_for_auto_class()
    for _auto, _model in _models.items():
        _auto.register(_config, _model, exist_ok=True)
        _model.register_for_auto_class(_auto.__name__)

__all__ = [
    "Int8WeightOnlyConfig",
    "PackedSentences",
    "SentenceDecodeOutput",
    "SentenceGenerateOutput",
    "SentenceGenerationMixin",
    "SentenceLMCausalLMOutput",
    "SentenceLMConfig",
    "SentenceLMForCausalLM",
    "SentenceLMModel",
    "SentenceLMModelOutput",
    "SentenceOPTConfig",
    "SentenceOPTForCausalLM",
    "SentenceOPTModel",
    "SentenceTokenizer",
    "SentenceVAEConfig",
    "SentenceVAEModel",
    "SentenceVAEOutput",
    "build_boundary_table",
    "default_corpus",
    "group_paragraphs",
    "pack_sentences",
    "read_text_lines",
    "reconstruction_metrics",
    "segment_sentences",
    "split_train_validation",
    "train_sentence_tokenizer",
]
