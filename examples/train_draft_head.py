"""Train a draft head on a trained SentenceLM, so that ``generate(draft_tokens=k)`` can draft each
sentence in one pass and verify it in one (:mod:`sentence_lm.training_draft_head`).

The model stays frozen; only the head trains, on the sentences the model's own Sentence Decoder
writes from the backbone states of the training text. The model with its head is saved to
``--output_dir`` (with its tokenizer) together with ``draft_head.json``: the steps, sentences and
seconds, and how often the head drafts the decoder's token on held-out text, before and after.

Examples:

    # the SmolLM2 SentenceLM of examples/sentence_lm_from_smollm2.py, 20 minutes on its text:
    python examples/train_draft_head.py --model runs/smollm2/stage2 --output_dir runs/smollm2/drafted \\
        --train_file runs/smollm2/data/train.txt --validation_file runs/smollm2/data/valid.txt --minutes 20

    # a smoke run on the built-in corpus (any SentenceLM checkpoint):
    python examples/train_draft_head.py --model runs/quickstart --output_dir /tmp/drafted --max_steps 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import sentence_lm  # noqa: F401  (registers the SentenceLM classes with the Auto classes)
from sentence_lm.corpus import default_corpus, text_paragraphs
from sentence_lm.data import first_tokens, tokenize_texts
from sentence_lm.training_draft_head import train_draft_head


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A trained SentenceLM (a directory or Hub id).")
    parser.add_argument("--output_dir", required=True, help="Where the model with its draft head is saved.")
    parser.add_argument("--train_file", help="Training text (paragraphs separated by blank lines); default: the built-in corpus.")
    parser.add_argument("--validation_file", help="Held-out text for the agreement figures; default: none.")
    parser.add_argument("--train_tokens", type=int, default=200_000, help="Tokens of training text to draw sentences from.")
    parser.add_argument("--eval_tokens", type=int, default=10_000)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--minutes", type=float, default=10.0, help="Training wall-clock budget.")
    parser.add_argument("--max_steps", type=int, default=-1, help="Train this many steps instead of --minutes.")
    parser.add_argument("--batch_size", type=int, default=64, help="Sentences per optimizer step.")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def text_blocks(path: str | None, tokenizer, block_size: int, max_sentence_len: int, max_tokens: int):
    """The first text examples (``tokenize_texts`` rows) of a file, or of the built-in corpus,
    holding ``max_tokens`` scored tokens (:func:`~sentence_lm.data.first_tokens`)."""
    paragraphs = text_paragraphs(path, detokenize="no") if path else default_corpus()
    blocks = tokenize_texts(datasets.Dataset.from_dict({"text": paragraphs}), tokenizer, block_size, max_sentence_len)
    return first_tokens(blocks, max_tokens)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    began = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model).to(args.device)
    if not hasattr(model, "sentence_vae"):
        raise SystemExit(f"{args.model} is a {type(model).__name__}, not a SentenceLM: a draft head drafts sentences.")
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    max_len = model.config.sentence_vae.max_sentence_len
    train = text_blocks(args.train_file, tokenizer, args.block_size, max_len, args.train_tokens)
    held_out = (
        text_blocks(args.validation_file, tokenizer, args.block_size, max_len, args.eval_tokens)
        if args.validation_file
        else None
    )
    summary = train_draft_head(
        model,
        train,
        args.output_dir,
        eval_texts=held_out,
        minutes=args.minutes,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        max_steps=args.max_steps,
        seed=args.seed,
    )
    model.tokenizer = tokenizer
    model.save_pretrained(args.output_dir)
    summary.update(
        command=" ".join(["python", "examples/train_draft_head.py", *(sys.argv[1:] if argv is None else argv)]),
        model=args.model,
        device=args.device,
        threads=torch.get_num_threads(),
        versions={"torch": torch.__version__},
        wall_seconds=round(time.perf_counter() - began, 1),
    )
    Path(args.output_dir, "draft_head.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
