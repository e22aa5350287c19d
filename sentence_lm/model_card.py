"""Model cards for SentenceOPT checkpoints, rendered from the repository's MODEL_CARD.md template
with `huggingface_hub.ModelCard`."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

TEMPLATE = Path(__file__).with_name("MODEL_CARD.md")


def render_model_card(
    model,
    repo_id: str = "path/to/checkpoint",
    results: dict[str, float | str] | None = None,
    datasets: list[str] | None = None,
    license: str = "apache-2.0",
) -> ModelCard:
    """Render the model card of a `SentenceOPTForCausalLM`.

    Args:
        model: the model; its config fills the architecture table (and ``config.base_model``
            the Hub metadata).
        repo_id: the name shown in the usage snippet.
        results: metric name -> value, shown as the results table (for example the training
            run's evaluation loss and perplexity).
        datasets: names of the training datasets (Hub ids where there are).
        license: the license of the weights.
    """
    config = model.config
    base_model = getattr(config, "base_model", None)
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license,
        tags=["sentence_lm", "sentence-vae", "next-sentence-prediction", "opt", "custom_code"],
        base_model=base_model,
        datasets=datasets,
    )
    vae = config.sentence_vae
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=Path(repo_id).name,
        repo_id=repo_id,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        max_sentences=config.max_position_embeddings - 1,
        max_sentence_len=vae.max_sentence_len,
        num_encoder_layers=vae.num_encoder_layers,
        num_decoder_layers=vae.num_decoder_layers,
        fusion=vae.fusion,
        vocab_size=vae.vocab_size,
        num_parameters=f"{model.num_parameters():,}",
        base_model=base_model,
        results=results,
        datasets=datasets,
    )


def save_model_card(model, save_directory: str | os.PathLike, **kwargs) -> None:
    """Write ``README.md`` (the rendered card) into ``save_directory`` when the template is at
    hand (it is not when the model code was loaded from a checkpoint as remote code)."""
    if TEMPLATE.is_file():
        render_model_card(model, **kwargs).save(os.path.join(save_directory, "README.md"))
