#!/usr/bin/env python
"""Stage 2: train a SentenceLM (sentence-level LLM) with the `transformers` Trainer.

With no arguments it trains a tiny model (new tokenizer and SentenceVAE, trained jointly) on the
built-in corpus. Every `TrainingArguments` flag works, plus the data flags of stage 1 and the
model flags of `sentence_lm.training_sentence_opt` (`--help` lists them all).

Examples:

    python examples/train_sentence_opt.py --sentence_vae_name_or_path runs/svae --output_dir runs/sopt

    python examples/train_sentence_opt.py --backbone_name_or_path facebook/opt-125m \\
        --sentence_vae_name_or_path runs/svae-768 --dataset_name wikitext \\
        --dataset_config_name wikitext-103-raw-v1 --output_dir runs/sopt-125m

    accelerate launch --multi_gpu --num_processes 8 examples/train_sentence_opt.py ...
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import sentence_lm  # noqa: F401
except ImportError:  # a source checkout that is not installed: use the package next to this folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sentence_lm.training_sentence_opt import train_sentence_opt

if __name__ == "__main__":
    train_sentence_opt(sys.argv[1:])
