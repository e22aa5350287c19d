#!/usr/bin/env python
"""Where a SentenceLM's generation time goes, per generated token.

`benchmarks/bench_generate.py` says how many tokens per second `generate()` writes; this script
says what each of them costs, split into the parts of the row-scheduled runtime
(`sentence_lm.generation_runtime`):

* **output layer** (the Sentence Decoder's ``lm_head``, one row per decoder pass),
* **Sentence Decoder layers** (its self-attention over the sentence so far, FFN, decoder cache),
* **decoder step glue** (token embedding, causal mask, logits to float32: the rest of
  ``RowSteps.decoder_step`` / ``decoder_prefill``),
* **backbone step** (``RowSteps.backbone_step``: one slot per finished sentence, slot cache
  included), **encoder** (``RowSteps.encode``: the finished sentence to its vector), and the
  per-sentence **stop head and decoder conditioning**,
* **prompt** (its segmentation and encoding, ``prompt_slots``, and the backbone prefill),
* **sampling** (the empty-sentence ban, argmax or multinomial, the stop decision),
* **logits processors** (the library's, and the running text they are handed), and apart from
  them the benchmark's own **sentence-length forcing** (a random-weight model only: it makes a
  random decoder end sentences at the corpus's lengths; a trained model does not pay it),
* **runtime loop bookkeeping** (what ``generate_rows`` does between those calls: the per-row
  state, the one host synchronisation per pass, cache growth) and **generate() setup and
  output** (argument checks, building the processors, assembling the output).

How: the script wraps those functions and modules from the outside for the instrumented runs
only (nothing in the package changes; a plain run calls the unwrapped code) and accumulates each
part's *exclusive* time with `time.perf_counter` (a part's nested parts are subtracted from it),
so the parts add up to the wall time of the `generate` call. It alternates plain and
instrumented runs after a warm-up, and reports the plain runs' tokens/s beside the instrumented
total (the cost of the timers). It also times the output layer alone on one row
(``lm_head(x)``, median of ``--head_iters`` calls): the **output-layer bound**, the tokens/s that
no sentence model can exceed at batch 1 with this head, since every token needs one full
vocabulary product. ``--torch_profile N`` adds one run under `torch.profiler` with the same parts
as ``record_function`` ranges and prints its N most expensive operators (``--trace FILE``: a
Chrome trace).

Models, prompts and sentence lengths are bench_generate.py's (imported, not copied): random
weights of a ``--backbone`` / ``--shape`` preset with sentence lengths forced to the corpus's
distribution, or a trained ``--checkpoint``; ``--dtype int8`` is the model loaded with
`Int8WeightOnlyConfig` as a user loads it.

Example (issue 28's profile: SmolLM2-135M shape, int8, batch 1, WikiText-2 sentence lengths)::

    python benchmarks/profile_generate.py --backbone llama --shape smollm2-135m --dtype int8 \\
        --corpus ../shared/data/wikitext-2-raw/valid.txt --threads 2 \\
        --out benchmarks/results/profile_smollm2_135m_int8_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import shlex
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_generate.py, beside this script (also when imported by the tests)

import bench_generate as bench  # noqa: E402  (it puts the package on the path in a bare checkout)
import torch  # noqa: E402

from sentence_lm import generation_runtime, generation_sentence_lm  # noqa: E402
from sentence_lm.generation_runtime import RowSteps  # noqa: E402
from sentence_lm.machine import machine_info  # noqa: E402

HEAD = "output layer (lm_head)"
DECODER = "Sentence Decoder layers"
GLUE = "decoder step glue (embedding, mask, logits to fp32)"
BACKBONE = "backbone step (per sentence)"
ENCODER = "encoder (per sentence)"
HEADS = "stop head + decoder conditioning (per sentence)"
PROMPT = "prompt (segmentation, encoding, backbone prefill)"
SAMPLING = "sampling (empty-sentence ban, argmax, stop decision)"
PROCESSORS = "logits processors (library) + running text"
FORCING = "sentence-length forcing (benchmark only)"
LOOP = "runtime loop bookkeeping (generate_rows)"
SETUP = "generate() setup and output"
UNATTRIBUTED = "outside generate() (the benchmark's call)"
PARTS = [HEAD, DECODER, GLUE, BACKBONE, ENCODER, HEADS, PROMPT, SAMPLING, PROCESSORS, FORCING, LOOP, SETUP, UNATTRIBUTED]
"""Every part, in the order the table prints them; they add up to the wall time of the call."""


# ---------------------------------------------------------------------------------- timing
class PartTimer:
    """Exclusive time per named part: a part entered inside another is subtracted from it, so
    that the parts add up to the time spent inside the outermost one. With ``record``, each part
    is also a `torch.profiler.record_function` range."""

    def __init__(self, record: bool = False):
        self.record = record
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list] = []

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def enter(self, name: str) -> None:
        ranged = None
        if self.record:
            ranged = torch.profiler.record_function(name)
            ranged.__enter__()
        self._stack.append([name, time.perf_counter(), 0.0, ranged])

    def exit(self) -> None:
        name, start, inner, ranged = self._stack.pop()
        elapsed = time.perf_counter() - start
        if ranged is not None:
            ranged.__exit__(None, None, None)
        self.seconds[name] += elapsed - inner
        self.calls[name] += 1
        if self._stack:
            self._stack[-1][2] += elapsed

    def wrap(self, name: str, function):
        def timed(*args, **kwargs):
            self.enter(name)
            try:
                return function(*args, **kwargs)
            finally:
                self.exit()

        timed.__wrapped__ = function
        return timed


class _TimedProcessors:
    """The processors `generate()` hands the runtime, timed as one part."""

    def __init__(self, processors, timer: PartTimer):
        self.processors, self.timer = processors, timer

    def __call__(self, input_ids, scores):
        self.timer.enter(PROCESSORS)
        try:
            return self.processors(input_ids, scores)
        finally:
            self.timer.exit()

    def __len__(self):
        return len(self.processors)


@contextlib.contextmanager
def instrumented(model, timer: PartTimer):
    """Wrap the runtime's parts with ``timer`` (from the outside: module attributes, instance
    attributes and module hooks), and put everything back on exit."""
    patches: list[tuple[object, str, bool, object]] = []  # (owner, name, was own attribute, original)
    handles = []

    def patch(owner, name: str, part: str, replacement=None) -> None:
        own = name in vars(owner)
        original = getattr(owner, name)
        patches.append((owner, name, own, vars(owner).get(name) if own else None))
        setattr(owner, name, replacement if replacement is not None else timer.wrap(part, original))

    def hook(module, part: str) -> None:
        handles.append(module.register_forward_pre_hook(lambda *_: timer.enter(part)))
        handles.append(module.register_forward_hook(lambda *_: timer.exit()))

    vae = model.sentence_vae
    original_rows = generation_sentence_lm.generate_rows

    def generate_rows(model_, input_ids, mask, max_new, min_new, do_sample, processors, *args, **kwargs):
        if processors is not None:
            processors = _TimedProcessors(processors, timer)
        return original_rows(model_, input_ids, mask, max_new, min_new, do_sample, processors, *args, **kwargs)

    try:
        patch(model, "generate", SETUP)
        patch(generation_sentence_lm, "generate_rows", LOOP, timer.wrap(LOOP, generate_rows))
        for name in ("decoder_step", "decoder_prefill"):
            patch(RowSteps, name, GLUE)
        patch(RowSteps, "backbone_step", BACKBONE)
        patch(RowSteps, "encode", ENCODER)
        patch(RowSteps, "backbone_prefill", PROMPT)
        patch(model.model, "prompt_slots", PROMPT)
        for name in ("ban_empty_sentence", "pick_next_token", "stop_decision", "verify_draft"):
            patch(generation_runtime, name, SAMPLING)
        patch(generation_runtime, "running_text", PROCESSORS)
        patch(bench.CorpusSentenceLengths, "__call__", FORCING)
        patch(vae.decoder, "conditioning", HEADS)
        hook(model.stop_head, HEADS)
        hook(vae.lm_head, HEAD)
        hook(vae.decoder, DECODER)
        yield timer
    finally:
        for handle in handles:
            handle.remove()
        for owner, name, own, original in reversed(patches):
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)


def head_alone_ms(model, batch: int, iterations: int) -> float:
    """Median milliseconds of one call of the Sentence Decoder's output layer on ``batch`` rows of
    one position (the product every decoder pass makes), in the model's activation dtype."""
    vae = model.sentence_vae
    dtype = vae.decoder_token_embeddings().weight.dtype
    x = torch.randn(batch, 1, vae.config.hidden_size, dtype=dtype, device=model.device)
    times = []
    with torch.inference_mode():
        for _ in range(max(3, iterations // 10)):
            vae.lm_head(x)
        for _ in range(iterations):
            start = time.perf_counter()
            vae.lm_head(x)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


# ---------------------------------------------------------------------------------- the run
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Per-token profile of a SentenceLM's generate(): output layer, decoder layers, backbone step, "
        "encoder, processors, bookkeeping.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", default=None, help="Trained SentenceLM directory (else random weights).")
    parser.add_argument("--backbone", default="llama", help="Random weights: the backbone's model_type.")
    parser.add_argument("--shape", default="smollm2-135m", choices=sorted(bench.SHAPES), help="Random-weight shape preset.")
    parser.add_argument("--config", default="", help="Random-weight overrides of the shape, e.g. 'num_hidden_layers=6'.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="int8", choices=sorted(bench.DTYPES), help="int8: int8 weights, bf16 activations.")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--prompt_tokens", type=int, default=128, help="Prompt length in tokens (BOS included).")
    parser.add_argument(
        "--sentence_len", default="corpus", help="Random weights: 'corpus' (the corpus's distribution) or a fixed length."
    )
    parser.add_argument("--corpus", default=None, help="Text file for prompts and sentence lengths, or 'builtin'.")
    parser.add_argument("--repeats", type=int, default=5, help="Plain and instrumented runs each (alternating).")
    parser.add_argument("--head_iters", type=int, default=200, help="Calls of the output layer alone.")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--torch_profile", type=int, default=0, help="Also one run under torch.profiler; print its N costliest operators."
    )
    parser.add_argument("--trace", default=None, help="With --torch_profile: write a Chrome trace here.")
    parser.add_argument("--out", default=None, help="Write the results as JSON here.")
    parser.add_argument("--quiet", action="store_true", help="Print only the table.")
    return parser


def run_profile(argv: list[str] | None = None) -> dict:
    """Measure; returns the results (also written to ``--out``)."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = machine_info(device)  # the load average before the runs
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    paragraphs, corpus_name = bench.load_corpus(args.corpus)
    model_args = argparse.Namespace(**vars(args), token_checkpoint=None)
    built = bench.build_models(model_args, paragraphs, token_model=False)
    sllm, tokenizer = built["sllm"], built["tokenizer"]
    log(f"SLLM: {built['sllm_label']}\nprompts from {corpus_name}")
    ids = bench.corpus_ids(tokenizer, paragraphs)
    starts, lengths = bench.sentence_starts(sllm, ids), bench.sentence_lengths(sllm, ids)
    prompts = bench.make_prompts(ids, starts, args.batch_size, args.prompt_tokens, sllm.config.bos_token_id).to(device)
    processors = None
    if not built["trained"]:
        table = [min(n, sllm.config.sentence_vae.max_sentence_len) for n in lengths]
        if args.sentence_len != "corpus":
            table = [int(args.sentence_len)]
        c = sllm.config
        processors = [bench.CorpusSentenceLengths(table, c.pad_token_id, c.sentence_vae.eos_token_id, device)]
    if args.dtype == "int8":
        model = bench.int8_copy(sllm, device)
        del sllm
    else:
        model = sllm.to(device=device, dtype=bench.DTYPES[args.dtype])
    gc.collect()
    runner = bench.Runner("sllm", model, "eager", processors)
    tokens = args.batch_size * args.new_tokens

    log(f"[{args.dtype} batch {args.batch_size} new {args.new_tokens}] warm-up ...")
    runner(prompts, args.new_tokens)
    timer = PartTimer()
    plain_s, timed_s, runs = [], [], []
    out = None
    for repeat in range(args.repeats):
        gc.collect()
        bench.synchronize(device)
        start = time.perf_counter()
        out = runner(prompts, args.new_tokens)
        bench.synchronize(device)
        plain_s.append(time.perf_counter() - start)
        gc.collect()
        with instrumented(model, timer):
            timer.reset()
            bench.synchronize(device)
            start = time.perf_counter()
            timer.enter(UNATTRIBUTED)
            instrumented_out = runner(prompts, args.new_tokens)
            timer.exit()
            bench.synchronize(device)
            timed_s.append(time.perf_counter() - start)
        runs.append(dict(seconds=dict(timer.seconds), calls=dict(timer.calls)))
        if not torch.equal(instrumented_out.sequences, out.sequences):
            raise RuntimeError("The instrumented run generated other tokens than the plain one.")
        log(f"   run {repeat + 1}: plain {plain_s[-1]:.3f} s, instrumented {timed_s[-1]:.3f} s")
    sentences = int(out.num_sentences.sum())
    passes = int(out.decoder_passes.sum())
    head_ms = head_alone_ms(model, args.batch_size, args.head_iters)

    mean_s = {p: statistics.mean(r["seconds"].get(p, 0.0) for r in runs) for p in PARTS}
    calls = {p: statistics.mean(r["calls"].get(p, 0) for r in runs) for p in PARTS}
    total_ms = 1000 * statistics.mean(timed_s) / tokens
    parts = [
        dict(part=p, ms_per_token=1000 * mean_s[p] / tokens, share=1000 * mean_s[p] / tokens / total_ms, calls_per_token=calls[p] / tokens)
        for p in PARTS
    ]  # fmt: skip
    plain_ms = 1000 * statistics.median(plain_s) / tokens
    results = dict(
        meta=dict(
            command=" ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]) if argv is None else None,
            argv=list(sys.argv[1:]) if argv is None else list(argv),
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            machine=machine,
            sllm=built["sllm_label"],
            parameters=bench.count_parameters(model),
            backbone=bench.backbone_shape(model.config.backbone),
            corpus=corpus_name,
            corpus_tokens_per_sentence=statistics.mean(lengths),
            dtype=args.dtype,
            batch=args.batch_size,
            prompt_tokens=args.prompt_tokens,
            new_tokens=args.new_tokens,
            repeats=args.repeats,
            decoding="greedy, min_new_tokens == max_new_tokens",
        ),
        parts=parts,
        total_ms_per_token=total_ms,
        sum_of_parts_ms_per_token=sum(p["ms_per_token"] for p in parts),
        plain_ms_per_token=plain_ms,
        plain_tokens_per_s=1000 / plain_ms,
        instrumented_tokens_per_s=1000 / total_ms,
        instrumentation_overhead=total_ms / plain_ms - 1,
        plain_runs_s=plain_s,
        instrumented_runs_s=timed_s,
        runs=runs,
        tokens_per_sentence=tokens / max(1, sentences),
        decoder_passes_per_token=passes / tokens,
        backbone_steps_per_token=calls[BACKBONE] / tokens,
        head_alone_ms=head_ms,
        head_bound_ms_per_token=head_ms * passes / tokens / args.batch_size,
        head_bound_tokens_per_s=1000 * tokens / (head_ms * passes / args.batch_size),
    )
    results["plain_over_head_bound"] = results["head_bound_tokens_per_s"] / results["plain_tokens_per_s"]

    if args.torch_profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof, instrumented(model, PartTimer(record=True)):
            runner(prompts, args.new_tokens)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.torch_profile)
        results["torch_profile"] = table
        if args.trace:
            prof.export_chrome_trace(args.trace)
    with contextlib.suppress(OSError):
        results["meta"]["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    return results


def format_table(results: dict) -> str:
    """The parts as a Markdown table, with the totals and the output-layer bound under it."""
    rows = [
        [p["part"], f"{p['ms_per_token']:.3f}", f"{100 * p['share']:.1f}%", f"{p['calls_per_token']:.2f}"]
        for p in results["parts"]
    ]
    rows.append(["**total (instrumented)**", f"{results['total_ms_per_token']:.3f}", "100.0%", ""])
    table = bench._table(["part", "ms / token", "share", "calls / token"], rows)
    r = results
    return "\n".join(
        [
            table,
            "",
            f"sum of parts {r['sum_of_parts_ms_per_token']:.3f} ms/token against the instrumented wall time "
            f"{r['total_ms_per_token']:.3f}",
            f"plain runs: {r['plain_ms_per_token']:.3f} ms/token = {r['plain_tokens_per_s']:.1f} tok/s "
            f"(instrumented {r['instrumented_tokens_per_s']:.1f} tok/s, timers cost {100 * r['instrumentation_overhead']:+.1f}%)",
            f"{r['tokens_per_sentence']:.2f} tokens per sentence; {r['decoder_passes_per_token']:.3f} decoder passes and "
            f"{r['backbone_steps_per_token']:.3f} backbone steps per token",
            f"output layer alone: {r['head_alone_ms']:.3f} ms per call; {r['head_bound_ms_per_token']:.3f} ms per token "
            f"at {r['decoder_passes_per_token']:.3f} passes per token = bound {r['head_bound_tokens_per_s']:.1f} tok/s "
            f"({r['plain_over_head_bound']:.2f}x the plain runs' tok/s)",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    results = run_profile(argv)
    meta, m = results["meta"], results["meta"]["machine"]
    print(f"SLLM: {meta['sllm']} ({meta['parameters'] / 1e6:.1f}M parameters), {meta['dtype']}")
    print(f"prompts: {meta['corpus']}, {meta['prompt_tokens']} tokens, batch {meta['batch']}, {meta['new_tokens']} new tokens; {meta['decoding']}")
    print(f"machine: {m.get('gpu') or m['cpu']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), torch {m['torch']}, transformers {m['transformers']}, load {m['load_average_at_start']}")
    print()
    print(format_table(results))
    if "torch_profile" in results:
        print("\ntorch.profiler, one instrumented run (parts as record_function ranges):\n")
        print(results["torch_profile"])


if __name__ == "__main__":
    main()
