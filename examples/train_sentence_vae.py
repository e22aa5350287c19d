#!/usr/bin/env python
"""Stage 1: train a SentenceVAE (sentence encoder + decoder) with the `transformers` Trainer.

With no arguments it trains a tiny model on the built-in default corpus (the standard library's
`pydoc_data.topics`, no download) in about a minute on a CPU, then prints its reconstruction
metrics on held-out sentences. Every `TrainingArguments` flag works (`--output_dir`,
`--max_steps`, `--num_train_epochs`, `--per_device_train_batch_size`, `--learning_rate`,
`--eval_strategy`, `--save_steps`, `--logging_steps`, `--resume_from_checkpoint`, ...), plus
the data and model flags of `sentence_lm.training_sentence_vae` (`--help` lists them all).

Examples:

    python examples/train_sentence_vae.py

    python examples/train_sentence_vae.py \\
        --train_file ../shared/data/grimm/tales.txt --keep_linebreaks False \\
        --vocab_size 4096 --hidden_size 256 --num_attention_heads 4 --ffn_dim 1024 \\
        --max_sentence_len 64 --max_steps 3000 --output_dir runs/svae_grimm

    accelerate launch examples/train_sentence_vae.py --dataset_name wikitext \\
        --dataset_config_name wikitext-103-raw-v1 --sentence_vae_config hidden_size=768 ...

The model and tokenizer are saved to `--output_dir` (load them with
`SentenceVAEModel.from_pretrained` / `SentenceTokenizer.from_pretrained`), the held-out metrics
to `output_dir/reconstruction_metrics.json`.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import sentence_lm  # noqa: F401
except ImportError:  # a source checkout that is not installed: use the package next to this folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sentence_lm.training_sentence_vae import train_sentence_vae


def main(args: list[str] | None = None) -> dict:
    """Run stage-1 training with command-line style ``args`` (``sys.argv[1:]`` when ``None``)."""
    return train_sentence_vae(args)


if __name__ == "__main__":
    main(sys.argv[1:])
