#!/usr/bin/env python
"""The main job, on a CPU in a few minutes with no download:

1. train a tiny SentenceVAE (stage 1) and a tiny SentenceOPT (stage 2) on the built-in corpus
   (the English prose of the standard library's `pydoc_data.topics`),
2. save them (to `--output_dir`: `outputs/quickstart/sentence_vae` and
   `outputs/quickstart/sentence_opt` by default; the paths are printed at the end), load the
   SentenceOPT back through `AutoModelForCausalLM` and `pipeline`,
3. generate from a few prompts (models this small, trained for a few minutes, repeat themselves:
   this shows the mechanics and the speed, not the quality),
4. train a same-size `OPTForCausalLM` on the same text for the same steps and compare output
   tokens per second (batch 1, greedy, same number of new tokens), with the mean number of
   tokens per generated sentence, on which the speed-up depends.

    python examples/quickstart.py [--output_dir outputs/quickstart] [--steps 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import sentence_lm  # noqa: F401
except ImportError:  # a source checkout that is not installed: use the package next to this folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments, pipeline

from sentence_lm.baseline import token_config_like, train_token_baseline
from sentence_lm.data import DataArguments, load_texts, tokenize_texts
from sentence_lm.training_sentence_vae import train_sentence_vae
from sentence_lm.training_sentence_opt import train_sentence_opt

PROMPTS = ["The return value of the function", "A class definition creates a new object.", ""]


def tokens_per_second(model, input_ids: torch.Tensor, new_tokens: int, repeats: int = 3) -> float:
    """Median output tokens per second of greedy generation of exactly ``new_tokens`` tokens."""
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    model.generate(input_ids, **settings)  # warm-up with the same lengths
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = model.generate(input_ids, **settings)
        times.append(time.perf_counter() - start)
    assert out.shape[1] - input_ids.shape[1] == new_tokens
    return new_tokens * input_ids.shape[0] / statistics.median(times)


def mean_tokens_per_sentence(model, tokenizer, prompts: list[str], max_new_tokens: int) -> float:
    """Tokens per sentence of what the model writes (free stopping, greedy)."""
    tokens = sentences = 0
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt", return_sentence_ids=False)
        new = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)[:, enc.input_ids.shape[1] :]
        if new.numel():
            tokens += new.shape[1]
            sentences += int(tokenizer.segment(new).max()) + 1
    return tokens / max(sentences, 1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/quickstart")
    parser.add_argument("--vae_steps", type=int, default=300, help="Stage-1 training steps.")
    parser.add_argument("--steps", type=int, default=200, help="Stage-2 (and OPT baseline) training steps.")
    parser.add_argument("--new_tokens", type=int, default=64, help="Tokens generated per timed run.")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    out = Path(args.output_dir)
    common = ["--report_to", "none", "--logging_steps", "50", "--save_strategy", "no", "--seed", "0"]

    vae_dir, sopt_dir = out / "sentence_vae", out / "sentence_opt"

    print("== Stage 1: SentenceVAE on the built-in corpus ==")
    stage1 = train_sentence_vae(
        ["--output_dir", str(vae_dir), "--max_steps", str(args.vae_steps), *common,
         "--max_reconstruction_sentences", "500"]
    )  # fmt: skip
    print(f"  SentenceVAE and its tokenizer saved to {vae_dir}")
    print("== Stage 2: SentenceOPT on the same corpus ==")
    block = ["--block_size", "128", "--per_device_train_batch_size", "8"]
    stage2 = train_sentence_opt(
        ["--sentence_vae_name_or_path", str(vae_dir), "--output_dir", str(sopt_dir),
         "--max_steps", str(args.steps), *block, *common]
    )  # fmt: skip
    print(f"  SentenceOPT, its tokenizer and model card saved to {sopt_dir}")

    print(f"== Loading the SentenceOPT back from {sopt_dir} through AutoModelForCausalLM and pipeline ==")
    model = AutoModelForCausalLM.from_pretrained(sopt_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(sopt_dir)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    print("  (a tiny model trained for minutes on a small corpus: expect repetitive text; this shows the")
    print("   mechanics and the speed, not the quality)")
    for prompt in PROMPTS:
        text = generator(prompt, max_new_tokens=40, do_sample=False)[0]["generated_text"]
        print(f"  {prompt!r} -> {text!r}")

    print("== Same-size OPTForCausalLM, same text, same steps ==")
    data = DataArguments(block_size=128)
    texts = tokenize_texts(load_texts(data)["train"], tokenizer, 128, model.config.sentence_vae.max_sentence_len)
    opt_args = TrainingArguments(
        output_dir=str(out / "opt_baseline"),
        max_steps=args.steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        lr_scheduler_type="cosine",
        report_to="none",
        logging_steps=50,
        save_strategy="no",
        seed=0,
    )
    opt = train_token_baseline(token_config_like(model.config), tokenizer, texts, opt_args).eval()

    prompt = tokenizer(PROMPTS[0], return_tensors="pt", return_sentence_ids=False).input_ids
    with torch.inference_mode():
        sllm_speed = tokens_per_second(model, prompt, args.new_tokens)
        opt_speed = tokens_per_second(opt, prompt, args.new_tokens)
        per_sentence = mean_tokens_per_sentence(model, tokenizer, PROMPTS, args.new_tokens)
    results = {
        "sentence_vae_reconstruction": stage1.get("reconstruction", {}),
        "sentence_opt_heldout": stage2.get("eval", {}),
        "sllm_tokens_per_second": sllm_speed,
        "opt_tokens_per_second": opt_speed,
        "speedup": sllm_speed / opt_speed,
        "mean_tokens_per_sentence": per_sentence,
        "saved": {"sentence_vae": str(vae_dir), "sentence_opt": str(sopt_dir)},
    }
    recon = results["sentence_vae_reconstruction"]
    print("== Results (batch 1, greedy, fp32, this CPU) ==")
    if recon:
        print(f"  SentenceVAE held-out token accuracy {recon['token_accuracy']:.3f}, exact match {recon['exact_match']:.3f}")
    if results["sentence_opt_heldout"]:
        print(f"  SentenceOPT held-out perplexity per token {results['sentence_opt_heldout']['perplexity']:.2f}")
    print(f"  SentenceOPT: {sllm_speed:8.1f} output tokens/s")
    print(f"  OPT:         {opt_speed:8.1f} output tokens/s")
    print(f"  speed-up:    {results['speedup']:8.2f}x   (mean {per_sentence:.1f} tokens per generated sentence)")
    print("== Saved models ==")
    print(f"  SentenceVAE (stage 1) and tokenizer:                {vae_dir}")
    print(f"  SentenceOPT (stage 2), tokenizer and model card:    {sopt_dir}  (card: {sopt_dir / 'README.md'})")
    print(f'  Load it: import sentence_lm; AutoModelForCausalLM.from_pretrained("{sopt_dir.as_posix()}")')
    return results


if __name__ == "__main__":
    main()
