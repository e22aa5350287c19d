"""What a lower-precision copy of a trained SentenceLM (and of its token model) costs in quality:
NLL per token on the same validation text in float32, bfloat16 and with int8 weights
(`sentence_lm.Int8WeightOnlyConfig`, bfloat16 activations), each loaded as a user loads it.

The SentenceLM's figure is its whole-text NLL per original token
(:func:`~sentence_lm.training_sentence_opt.text_nll`); the token model's is the NLL of the same
tokens in the same blocks (:func:`sentence_lm.baseline.token_nll`).

    python benchmarks/quantized_nll.py --sentence_lm runs/smollm2/stage2 --token_model runs/smollm2/baseline \\
        --validation_file ../shared/data/wikitext-2-raw/valid.txt --json benchmarks/results/quantized_nll_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sentence_lm import Int8WeightOnlyConfig
from sentence_lm.baseline import context_id_of, token_nll
from sentence_lm.corpus import text_paragraphs
from sentence_lm.data import first_tokens, tokenize_texts
from sentence_lm.machine import machine_info
from sentence_lm.training_sentence_opt import text_nll

LOADING = {
    "fp32": dict(dtype=torch.float32),
    "bf16": dict(dtype=torch.bfloat16),
    "int8": dict(dtype=torch.bfloat16, quantization_config=Int8WeightOnlyConfig()),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentence_lm", required=True, help="A trained SentenceLM checkpoint.")
    parser.add_argument("--token_model", help="Its token model (same tokenizer), scored on the same tokens.")
    parser.add_argument("--validation_file", required=True, help="Text, paragraphs separated by blank lines.")
    parser.add_argument("--detokenize", choices=["auto", "yes", "no"], default="auto", help="WikiText markup.")
    parser.add_argument("--eval_tokens", type=int, default=20_000)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--dtypes", default="fp32,bf16,int8")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", help="Write the results here.")
    return parser.parse_args(argv)


def validation_blocks(args, tokenizer, max_sentence_len: int):
    """The first text examples of ``--validation_file`` that hold ``--eval_tokens`` scored tokens."""
    paragraphs = text_paragraphs(args.validation_file, args.detokenize)
    blocks = tokenize_texts(datasets.Dataset.from_dict({"text": paragraphs}), tokenizer, args.block_size, max_sentence_len)
    return first_tokens(blocks, args.eval_tokens)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    began = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.sentence_lm, trust_remote_code=True)
    rows = []
    blocks = None
    for name in args.dtypes.split(","):
        row = {"dtype": name}
        model = AutoModelForCausalLM.from_pretrained(args.sentence_lm, **LOADING[name]).eval()
        if blocks is None:
            blocks = validation_blocks(args, tokenizer, model.config.sentence_vae.max_sentence_len)
        row["sentence_lm_nll"] = text_nll(model, blocks, args.batch_size)["nll_per_token"]
        del model
        if args.token_model:
            token = AutoModelForCausalLM.from_pretrained(args.token_model, **LOADING[name]).eval()
            row["token_nll"] = token_nll(token, blocks, context_id_of(tokenizer), args.batch_size)["nll_per_token"]
            del token
        rows.append(row)
        print(json.dumps(row), flush=True)
    for row in rows:
        for key in ("sentence_lm_nll", "token_nll"):
            if key in row:
                row[key.removesuffix("_nll") + "_change"] = row[key] - rows[0][key]
    return write_record("benchmarks/quantized_nll.py", argv, began, args.json, rows,
                        eval_tokens=sum(blocks["length"]) - len(blocks))


def write_record(script: str, argv, began: float, json_path: str | None, rows: list, **extra) -> dict:
    """A scoring script's record (command, date, machine, threads, ``extra``, rows, wall time),
    written to ``json_path`` when given."""
    results = {
        "command": shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(torch.device("cpu")),
        "threads": torch.get_num_threads(),
        **extra,
        "rows": rows,
        "wall_seconds": round(time.perf_counter() - began, 1),
    }
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
