"""sentence_lm: next-sentence prediction for Hugging Face `transformers`.

Importing the package registers its configs and models with the `transformers` Auto classes.
"""

from transformers import AutoConfig, AutoModel

from .configuration_sentence_vae import SentenceVAEConfig
from .modeling_sentence_vae import SentenceDecodeOutput, SentenceVAEModel, SentenceVAEOutput
from .segmentation import PackedSentences, build_boundary_table, pack_sentences, segment_sentences

AutoConfig.register(SentenceVAEConfig.model_type, SentenceVAEConfig, exist_ok=True)
AutoModel.register(SentenceVAEConfig, SentenceVAEModel, exist_ok=True)
SentenceVAEConfig.register_for_auto_class()
SentenceVAEModel.register_for_auto_class("AutoModel")

__all__ = [
    "PackedSentences",
    "SentenceDecodeOutput",
    "SentenceVAEConfig",
    "SentenceVAEModel",
    "SentenceVAEOutput",
    "build_boundary_table",
    "pack_sentences",
    "segment_sentences",
]
