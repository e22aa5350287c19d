"""Model cards for SentenceOPT checkpoints, rendered from the repository's MODEL_CARD.md template
with `huggingface_hub.ModelCard`."""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

TEMPLATE = Path(__file__).with_name("MODEL_CARD.md")

# `checkpointing.atomic_save` writes a checkpoint into a hidden sibling `.NAME.saving-<12 hex>` of
# the target directory NAME and then renames it into place: the card names NAME.
_ATOMIC_SAVE_DIR = re.compile(r"^\.(?P<name>.+)\.saving-[0-9a-f]{12}$")

PLACEHOLDER = "path/to/checkpoint"
"""Shown in the usage snippet only when neither a repo id nor a directory is known."""


def checkpoint_location(save_directory: str | os.PathLike) -> str:
    """Where a checkpoint saved into ``save_directory`` will be loaded from: the target directory
    (not the temporary one an atomic save writes into), relative to the working directory when it
    lies under it (``outputs/run``), else absolute."""
    path = Path(os.path.abspath(os.fspath(save_directory)))
    match = _ATOMIC_SAVE_DIR.match(path.name)
    if match:
        path = path.with_name(match["name"])
    try:
        return path.relative_to(Path.cwd()).as_posix() or "."
    except ValueError:
        return path.as_posix()


def render_model_card(
    model,
    repo_id: str | None = None,
    results: dict[str, float | str] | None = None,
    datasets: list[str] | None = None,
    license: str = "apache-2.0",
    model_name: str | None = None,
) -> ModelCard:
    """Render the model card of a `SentenceOPTForCausalLM`.

    Args:
        model: the model; its config fills the architecture table (and ``config.base_model``
            the Hub metadata).
        repo_id: the Hub repo id (``"you/sentence-opt"``) or local path the checkpoint is loaded
            from: the argument of ``from_pretrained`` in the usage snippet. Defaults to the
            model's ``name_or_path`` (where it was loaded from), else a placeholder.
        results: metric name -> value, shown as the results table (for example the training
            run's evaluation loss and perplexity).
        datasets: names of the training datasets (Hub ids where there are).
        license: the license of the weights.
        model_name: the card's title; defaults to ``repo_id`` (a local directory's name when
            ``repo_id`` is an existing directory).
    """
    repo_id = os.fspath(repo_id or getattr(model, "name_or_path", None) or PLACEHOLDER)
    if model_name is None:
        model_name = Path(repo_id).resolve().name if os.path.isdir(repo_id) else repo_id
    config = model.config
    base_model = getattr(config, "base_model", None)
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license,
        tags=["sentence_lm", "sentence-vae", "next-sentence-prediction", config.backbone.model_type, "custom_code"],
        base_model=base_model,
        datasets=datasets,
    )
    vae = config.sentence_vae
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=model_name,
        repo_id=repo_id,
        hidden_size=config.hidden_size,
        backbone_family=type(config.backbone).__name__.removesuffix("Config"),
        backbone_model_type=config.backbone.model_type,
        num_hidden_layers=config.backbone.num_hidden_layers,
        num_attention_heads=config.backbone.num_attention_heads,
        max_sentences=config.max_position_embeddings - 1 if config.max_position_embeddings else "no fixed limit of",
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


def save_model_card(model, save_directory: str | os.PathLike, repo_id: str | None = None, **kwargs) -> None:
    """Write ``README.md`` (the rendered card) into ``save_directory`` when the template is at
    hand (it is not when the model code was loaded from a checkpoint as remote code).

    The card is titled with ``repo_id`` (``model.model_card_kwargs["repo_id"]``) when given, and
    its usage snippet loads from it; otherwise both name the directory the checkpoint is saved to.
    """
    if TEMPLATE.is_file():
        if repo_id:
            card = render_model_card(model, repo_id=repo_id, **kwargs)
        else:
            location = checkpoint_location(save_directory)
            card = render_model_card(model, repo_id=location, model_name=Path(os.path.abspath(location)).name, **kwargs)
        card.save(os.path.join(save_directory, "README.md"))
