"""What a trained SentenceLM's Sentence Decoder draws from the backbone: teacher-forced NLL per
sentence target on validation text when each sentence is written from the backbone's prediction,
from the mean prediction (no context), from another sentence's prediction, from the sentence's
own encoder vector, and from the previous sentence's encoder vector
(`sentence_lm.training_sentence_opt.conditioning_nll`).

    python benchmarks/conditioning.py --sentence_lm runs/smollm2/stage2 \\
        --validation_file ../shared/data/wikitext-2-raw/valid.txt --json benchmarks/results/conditioning_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # quantized_nll.py, beside this script

import torch  # noqa: E402
from quantized_nll import validation_blocks, write_record  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from sentence_lm.training_sentence_opt import conditioning_nll  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentence_lm", required=True, action="append", help="A trained SentenceLM (repeatable).")
    parser.add_argument("--validation_file", required=True, help="Text, paragraphs separated by blank lines.")
    parser.add_argument("--detokenize", choices=["auto", "yes", "no"], default="auto", help="WikiText markup.")
    parser.add_argument("--eval_tokens", type=int, default=20_000)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", help="Write the results here.")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    began = time.perf_counter()
    rows = []
    for path in args.sentence_lm:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        blocks = validation_blocks(args, tokenizer, model.config.sentence_vae.max_sentence_len)
        row = {"sentence_lm": path, **conditioning_nll(model, blocks, args.batch_size)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return write_record("benchmarks/conditioning.py", argv, began, args.json, rows)


if __name__ == "__main__":
    main()
