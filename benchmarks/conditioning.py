"""What a trained SentenceLM's Sentence Decoder draws from the backbone: teacher-forced NLL per
sentence target on validation text when each sentence is written from the backbone's prediction,
from the mean prediction (no context), from another sentence's prediction, and from the
sentence's own encoder vector (`sentence_lm.training_sentence_opt.conditioning_nll`).

    python benchmarks/conditioning.py --sentence_lm runs/smollm2/stage2 \\
        --validation_file ../shared/data/wikitext-2-raw/valid.txt --json benchmarks/results/conditioning_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "examples")]

import torch  # noqa: E402
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
    from bench_generate import machine_info
    from quantized_nll import validation_blocks

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
        row["context_gain"] = row["mean"] - row["predicted"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    results = {
        "command": shlex.join(["python", "benchmarks/conditioning.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(torch.device("cpu")),
        "threads": torch.get_num_threads(),
        "rows": rows,
        "wall_seconds": round(time.perf_counter() - began, 1),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
