#!/usr/bin/env python
"""The equal-compute claim at several sizes: a SentenceLM against its same-shape token model, from
scratch, at each size, with learning rates tuned for both, seed noise and the quality-speed frontier.

The setting is `benchmarks/from_scratch.py`'s (a Llama backbone, one byte-level BPE of
``--vocab_size`` tokens trained on the training text, WikiText-2 train in blocks of
``--block_size`` tokens; its training functions); a size ``LxH`` is ``L`` layers of width ``H``
with ``H / 64`` heads (at least one) and a ``4 H`` feed-forward layer. Curves are scored on the
*selection split* (the training file's last ``--selection_paragraphs`` paragraphs, never trained
on), where learning rates and levers are chosen; each final model is also scored on WikiText-2
raw valid (``--eval_tokens``), the figure reported.

Steps:

* ``run``: one model (``--model token`` or ``sentence``) of one ``--size`` at one ``--lr`` (and
  ``--seed``, ``--stage1_share``, ``--max_sentence_len``, ``--sentence_vae_config``) for
  ``--minutes``; its record (curve, scores, greedy generation tokens/s at the batch sizes
  ``--speed_batches`` with ``--speed``) goes to ``--records/NAME.json``.
* ``sweep --plan P``: the runs of a plan that have no record yet, side by side, one process per
  core of ``--cores`` (pinned, one thread each, budgets in CPU seconds so that work beside them
  does not shorten them); logs in ``--workdir``. Plans: ``tune`` (every size, both models, every
  learning rate of ``--lrs``, ``--tune_minutes`` each; where the best is at an edge of the rates
  tried, one twice past it, up to ``--lr_extensions`` times), ``final`` (every size, both models, at the
  learning rate ``tune`` chose on the selection split, ``--minutes`` each, speed timed),
  ``seeds`` (the middle size's final pair again with seed 1), ``levers`` (the middle size's
  SentenceLM with one setting changed: ``max_sentence_len`` 16 / 32, ``stage1_share`` 0.1 / 0.4,
  a 2 + 2 layer SentenceVAE; its final run is the reference).
* ``report``: the tables (every learning rate tried; the final pairs with their power-law fits
  and what they say at ten times the budget; seeds; levers) and two plots: NLL against training
  seconds, and NLL against generation tokens/s.

Example (the recorded study; one core per run)::

    R=benchmarks/results/scaling_cpu
    for plan in tune final seeds levers; do
        python benchmarks/scaling_study.py sweep --plan $plan --records $R/runs --workdir /tmp/scaling --cores 0,1
    done
    python benchmarks/scaling_study.py report --records $R/runs --report $R/report.md --json $R/report.json \\
        --plot $R/curves.png --speed_plot $R/frontier.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # from_scratch.py and conversion_study.py, beside this script
try:
    import sentence_lm  # noqa: F401
except ImportError:  # a source checkout that is not installed
    sys.path.insert(0, str(HERE.parent))

import torch
from conversion_study import generation_speed, load_blocks, minutes_to_reach
from from_scratch import add_setting_arguments, sentence_lm_config, sentence_lm_nll, token_model_nll, train_sentence_lm
from from_scratch import train_token_model

from sentence_lm.corpus import text_paragraphs
from sentence_lm.learning_curves import fit_text, meeting, outlook_lines, plot_curves, power_law, pyplot, save_figure
from sentence_lm.machine import machine_info
from sentence_lm.tokenization_sentence_lm import train_sentence_tokenizer

MODELS = {"token": "token model", "sentence": "SentenceLM"}
LEVERS = {
    "max_sentence_len=16": {"max_sentence_len": 16}, "max_sentence_len=32": {"max_sentence_len": 32},
    "stage1_share=0.1": {"stage1_share": 0.1}, "stage1_share=0.4": {"stage1_share": 0.4},
    "SentenceVAE 2+2": {"sentence_vae_config": "num_encoder_layers=2,num_decoder_layers=2"},
}  # fmt: skip


def parse_size(text: str) -> dict:
    """``"LxH"`` into the shape arguments: L layers, width H, H / 64 heads (at least one), 4 H
    feed-forward."""
    found = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not found or min(int(found[1]), int(found[2])) < 1:
        raise SystemExit(f"A size is LAYERSxWIDTH, e.g. 4x256; got {text!r}.")
    layers, width = int(found[1]), int(found[2])
    heads = max(1, width // 64)
    if width % heads:
        raise SystemExit(f"Size {text!r}: width {width} does not split into {heads} heads of 64.")
    return {"num_layers": layers, "hidden_size": width, "num_heads": heads, "ffn_dim": 4 * width}


def run(args) -> dict:
    """Train one model and write its record."""
    began = time.perf_counter()
    for key, value in parse_size(args.size).items():
        setattr(args, key, value)
    paragraphs = text_paragraphs(args.train_file)[: args.train_paragraphs][: -args.selection_paragraphs]
    # The tokenizer is trained on the training split in every run: its training is deterministic, so
    # every run of a study (and of a later session) has the same one.
    tokenizer = train_sentence_tokenizer(paragraphs, vocab_size=args.vocab_size, max_sentence_len=args.max_sentence_len)
    blocks = load_blocks(args, tokenizer)
    train, score = (train_token_model, token_model_nll) if args.model == "token" else (train_sentence_lm, sentence_lm_nll)
    model, record = train(args, sentence_lm_config(args, tokenizer), tokenizer, blocks, blocks["curve"])
    model.eval()
    record.update(
        name=args.name, model=args.model, size=args.size, lr=args.lr, seed=args.seed, minutes=args.minutes,
        stage1_share=args.stage1_share, max_sentence_len=args.max_sentence_len,
        sentence_vae_config=args.sentence_vae_config, lever=args.lever, clock=args.clock,
        selection_nll=score(model, blocks["curve"]), valid_nll=score(model, blocks["final"]),
        valid_tokens=sum(blocks["final"]["length"]) - len(blocks["final"]),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=machine_info(torch.device(args.device)), threads=torch.get_num_threads(),
        command=shlex.join(["python", "benchmarks/scaling_study.py", *args.argv]),
    )  # fmt: skip
    if args.speed:
        record["generation_tokens_per_s"] = {b: generation_speed(model, blocks, int(b)) for b in args.speed_batches.split(",")}
    if args.save:
        model.save_pretrained(Path(args.save) / args.name)
        tokenizer.save_pretrained(Path(args.save) / args.name)
    record["wall_seconds"] = round(time.perf_counter() - began, 1)
    path = Path(args.records) / f"{args.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part")
    partial.write_text(json.dumps(record, indent=1))
    partial.replace(path)  # a record is whole or absent: an interrupted sweep reruns only what is missing
    print(json.dumps({k: record[k] for k in ("name", "steps", "tokens", "selection_nll", "valid_nll")}))
    return record


def read_records(folder) -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(Path(folder).glob("*.json"))}


def tuned_lr(records: dict, size: str, model: str) -> float:
    """The learning rate whose ``tune`` run scored best on the selection split."""
    tried = [r for r in records.values() if r["name"].startswith("tune-") and r["size"] == size and r["model"] == model]
    if not tried:
        raise SystemExit(f"No tune run of the {MODELS[model]} at size {size}: run the tune plan first.")
    return min(tried, key=lambda r: r["selection_nll"])["lr"]


def lr_text(lr: float) -> str:
    """A learning rate as a run names it: ``5e-4``, ``2.5e-4``."""
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def plan_jobs(args) -> list[dict]:
    """The runs of ``args.plan``, each as the ``run`` settings it changes (``name`` first)."""
    sizes = args.sizes.split(",")
    middle = sizes[len(sizes) // 2]
    records = read_records(args.records)
    if args.plan == "tune":
        grid = sorted(float(lr) for lr in args.lrs.split(","))
        jobs = []
        for size in sizes:
            for model in MODELS:
                tried = {r["lr"]: r["selection_nll"] for r in records.values()
                         if r["name"].startswith("tune-") and r["size"] == size and r["model"] == model}  # fmt: skip
                lrs = list(grid)
                if set(grid) <= set(tried):  # bracket the best: one more rate past an edge that won
                    best, low, high = min(tried, key=tried.get), min(tried), max(tried)
                    reach = 2.0**args.lr_extensions
                    if best == high and high * 2 <= grid[-1] * reach:
                        lrs.append(high * 2)
                    elif best == low and low / 2 >= grid[0] / reach:
                        lrs.append(low / 2)
                jobs += [{"name": f"tune-{size}-{model}-lr{lr_text(lr)}", "size": size, "model": model, "lr": lr,
                          "minutes": args.tune_minutes} for lr in sorted(set(lrs) | set(tried))]  # fmt: skip
        return jobs
    final = lambda size, model, **extra: {"size": size, "model": model, "lr": tuned_lr(records, size, model),  # noqa: E731
                                          "minutes": args.minutes, "speed": True, **extra}  # fmt: skip
    if args.plan == "final":
        return [{"name": f"final-{size}-{model}", **final(size, model)} for size in sizes for model in MODELS]
    if args.plan == "seeds":
        return [{"name": f"seed1-{middle}-{model}", **final(middle, model, seed=1)} for model in MODELS]
    return [{"name": f"lever-{middle}-{lever.replace(' ', '').replace('+', '-')}", "lever": lever,
             **final(middle, "sentence", **changes)} for lever, changes in LEVERS.items()]  # fmt: skip


def sweep(args) -> list[str]:
    """Run the plan's missing runs, one per core at a time, until it has none (``tune`` adds a run
    past an edge of the grid that won); the names of those that failed."""
    failed = []
    while True:
        jobs = [job for job in plan_jobs(args)
                if not (Path(args.records) / f"{job['name']}.json").exists() and job["name"] not in failed]  # fmt: skip
        if not jobs:
            return failed
        failed += run_jobs(args, jobs)


def run_jobs(args, jobs: list[dict]) -> list[str]:
    """Run ``jobs`` side by side, one per core of ``--cores``; the names of those that failed."""
    cores = [int(c) for c in args.cores.split(",")]
    logs = Path(args.workdir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"{args.plan}: {len(jobs)} run(s) to go on core(s) {cores}: {', '.join(j['name'] for j in jobs) or '-'}")
    settings = list(args.argv)
    settings.remove("sweep")  # the sweep's own options are the runs' settings; a run's own come after them
    running, failed = {}, []
    while jobs or running:
        for core in [c for c in cores if c not in running][: len(jobs)]:
            job = jobs.pop(0)
            argv = ["run", *settings, *job_argv(job), "--records", args.records, "--threads", "1", "--clock", "cpu"]
            if args.save_final and job["name"].startswith("final-"):
                argv += ["--save", str(Path(args.workdir) / "checkpoints")]
            with open(logs / f"{job['name']}.log", "w") as log:
                process = subprocess.Popen([sys.executable, __file__, *argv], stdout=log, stderr=subprocess.STDOUT,
                                           preexec_fn=pinned_to(core))  # fmt: skip
            running[core] = (job["name"], process, time.perf_counter())
        time.sleep(args.poll_seconds)
        for core, (name, process, started) in list(running.items()):
            if process.poll() is None:
                continue
            del running[core]
            ok = process.returncode == 0
            status = "done" if ok else f"FAILED (exit {process.returncode}; see {logs / name}.log)"
            print(f"  {name} on core {core}: {status} after {time.perf_counter() - started:.0f} s", flush=True)
            if not ok:
                failed.append(name)
    return failed


def pinned_to(core: int):
    """What a child runs before the script: keep to ``core`` (where the OS can pin)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    return lambda: os.sched_setaffinity(0, {core})


def job_argv(job: dict) -> list[str]:
    """The ``run`` options a job sets."""
    argv = []
    for key, value in job.items():
        argv += ["--speed"] if key == "speed" else [f"--{key}", str(value)]
    return argv


def summary(records: dict) -> dict:
    """The report's rows: tuning grid, final pairs (fits, outlook, time to the token model's NLL),
    seeds and levers."""
    tuning, tune_minutes = {}, set()
    for r in records.values():
        if r["name"].startswith("tune-"):
            tuning.setdefault((r["size"], r["model"]), {})[r["lr"]] = r["selection_nll"]
            tune_minutes.add(r["minutes"])
    finals = {(r["size"], r["model"]): r for r in records.values() if r["name"].startswith("final-")}
    pairs = []
    for size in sorted({size for size, _ in finals}, key=lambda s: parse_size(s)["hidden_size"] * parse_size(s)["num_layers"]):
        token, sentence = finals.get((size, "token")), finals.get((size, "sentence"))
        if not token or not sentence:
            continue
        fits = {name: power_law(r["curve"][1:], "seconds") for name, r in (("token", token), ("sentence", sentence))}
        needed, how = minutes_to_reach({**sentence, "offset_seconds": 0.0}, token["selection_nll"])
        pairs.append({
            "size": size, "token": token, "sentence": sentence, "fits": fits,
            "gap_valid": sentence["valid_nll"] - token["valid_nll"],
            "outlook": meeting(fits["sentence"], fits["token"], 60 * token["minutes"]),
            "minutes_to_token_nll": needed, "how": how,
        })  # fmt: skip
    seeds = [(r, finals.get((r["size"], r["model"]))) for r in records.values() if r["name"].startswith("seed1-")]
    levers = [r for r in records.values() if r["name"].startswith("lever-")]
    return {"tuning": tuning, "tune_minutes": sorted(tune_minutes), "pairs": pairs, "seeds": seeds, "levers": levers,
            "finals": finals}  # fmt: skip


def timed_batches(pairs: list[dict]) -> list[str]:
    """The batch sizes whose generation speed the final runs recorded."""
    return sorted({b for p in pairs for m in MODELS for b in p[m].get("generation_tokens_per_s", {})}, key=int)


def speed_text(record: dict, batch: str) -> str:
    speed = record.get("generation_tokens_per_s", {}).get(batch)
    return "-" if speed is None else f"{speed:.0f}"


def markdown(found: dict) -> str:
    lines = []
    if found["tuning"]:
        lrs = sorted({lr for grid in found["tuning"].values() for lr in grid})
        minutes = " / ".join(f"{m:g}" for m in found["tune_minutes"])
        lines += [f"Learning rates tried ({minutes}-minute runs; NLL per token on the selection split, best in bold):", "",
                  "| size | model | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|---|" + "---|" * len(lrs)]
        order = lambda item: (parse_size(item[0][0])["hidden_size"], item[0][1] != "token")  # noqa: E731
        for (size, model), grid in sorted(found["tuning"].items(), key=order):
            best = min(grid.values())
            cells = ["-" if lr not in grid else (f"**{grid[lr]:.4f}**" if grid[lr] == best else f"{grid[lr]:.4f}")
                     for lr in lrs]  # fmt: skip
            lines.append(f"| {size} | {MODELS[model]} | " + " | ".join(cells) + " |")
        lines.append("")
    if found["pairs"]:
        batches = timed_batches(found["pairs"])
        lines += ["Final runs (NLL per token on the selection split and on WikiText-2 raw valid; greedy generation "
                  "tokens/s at each batch size, one core):", "",
                  "| size | model | parameters | lr | steps | training tokens | NLL selection | NLL valid | "
                  "SentenceLM - token (valid) | fit vs seconds (a, b) | "
                  + " | ".join(f"tok/s b{b}" for b in batches) + " |", "|---|---|---|---|---|---|---|---|---|---|"
                  + "---|" * len(batches)]  # fmt: skip
        for pair in found["pairs"]:
            for model in MODELS:
                r = pair[model]
                tokens = f"{r['tokens']:,}" + (f" (+{r['stage1_tokens']:,} stage 1)" if "stage1_tokens" in r else "")
                gap = f"{pair['gap_valid']:+.3f}" if model == "sentence" else ""
                lines.append(f"| {pair['size']} | {MODELS[model]} | {r['parameters'] / 1e6:.2f}M | {r['lr']:g} | "
                             f"{r['steps']} | {tokens} | {r['selection_nll']:.4f} | {r['valid_nll']:.4f} | {gap} | "
                             f"{fit_text(pair['fits'][model])} | "
                             + " | ".join(speed_text(r, b) for b in batches) + " |")  # fmt: skip
        lines.append("")
        for pair in found["pairs"]:
            needed = pair["minutes_to_token_nll"]
            share = "-" if needed is None else f"{needed:.3g} min ({pair['how']}), {needed / pair['token']['minutes']:.0%}"
            lines.append(f"- {pair['size']}: the SentenceLM reaches the token model's final selection NLL after {share} "
                         f"of the token model's {pair['token']['minutes']:g} minutes.")  # fmt: skip
            lines += outlook_lines({"seconds": pair["outlook"]}, "the SentenceLM", "the token model")
        lines.append("")
    if found["seeds"]:
        lines += ["Seed noise (the same run with seed 1):", "", "| size | model | seed 0 valid | seed 1 valid | difference |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for again, first in found["seeds"]:
            base = "-" if first is None else f"{first['valid_nll']:.4f}"
            diff = "-" if first is None else f"{again['valid_nll'] - first['valid_nll']:+.4f}"
            lines.append(f"| {again['size']} | {MODELS[again['model']]} | {base} | {again['valid_nll']:.4f} | {diff} |")
        lines.append("")
    if found["levers"]:
        lines += ["SentenceLM levers at the middle size (one setting changed from the final run):", "",
                  "| run | setting | steps | NLL selection | NLL valid | vs final (valid) |", "|---|---|---|---|---|---|"]
        for r in found["levers"]:
            base = found["finals"].get((r["size"], "sentence"))
            diff = "-" if base is None else f"{r['valid_nll'] - base['valid_nll']:+.4f}"
            lines.append(f"| {r['name']} | {r['lever']} | {r['steps']} | {r['selection_nll']:.4f} | {r['valid_nll']:.4f} | "
                         f"{diff} |")  # fmt: skip
    return "\n".join(lines).rstrip()


def plot_frontier(pairs: list[dict], path) -> str | None:
    """NLL on valid against greedy generation tokens/s, one panel per batch size timed, a point
    per model and size; ``None`` (nothing written) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    batches = timed_batches(pairs)
    figure, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for model, marker in (("token", "s"), ("sentence", "o")):
            points = [(p[model]["generation_tokens_per_s"][batch], p[model]["valid_nll"], p["size"])
                      for p in pairs if batch in p[model].get("generation_tokens_per_s", {})]  # fmt: skip
            if not points:
                continue
            ax.semilogx([x for x, _, _ in points], [y for _, y, _ in points], marker + "-", label=MODELS[model])
            for x, y, size in points:
                ax.annotate(size, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(f"greedy generation tokens/s, batch {batch}")
        ax.set_ylabel("valid NLL per token")
    return save_figure(figure, path)


def report(args) -> dict:
    records = read_records(args.records)
    found = summary(records)
    text = markdown(found)
    print(text)
    if args.report:
        Path(args.report).write_text(text + "\n")
    if args.json:
        rows = [{"size": p["size"], "gap_valid": p["gap_valid"], "outlook": p["outlook"],
                 "minutes_to_token_nll": p["minutes_to_token_nll"], "how": p["how"],
                 **{f"{m}_{k}": p[m][k] for m in MODELS for k in ("lr", "steps", "selection_nll", "valid_nll")}}
                for p in found["pairs"]]  # fmt: skip
        tuning = [{"size": s, "model": m, "lr": lr, "selection_nll": v}
                  for (s, m), grid in found["tuning"].items() for lr, v in grid.items()]  # fmt: skip
        Path(args.json).write_text(json.dumps({"pairs": rows, "tuning": tuning}, indent=1))
    if args.plot and found["pairs"]:
        curves = {f"{MODELS[m]} {p['size']}": p[m]["curve"] for p in found["pairs"] for m in MODELS}
        fits = {f"{MODELS[m]} {p['size']}": {"tokens": power_law(p[m]["curve"][1:], "tokens"),
                                             "seconds": p["fits"][m]} for p in found["pairs"] for m in MODELS}  # fmt: skip
        plot_curves(curves, fits, args.plot, ylabel="selection NLL per token")
    if args.speed_plot and found["pairs"]:
        plot_frontier(found["pairs"], args.speed_plot)
    return found


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)  # fmt: skip
    p.add_argument("step", choices=["run", "sweep", "report"])
    p.add_argument("--records", required=True, help="Folder of the run records (one JSON file per run).")
    p.add_argument("--selection_paragraphs", type=int, default=200, help="Held-out tail of the training file.")
    p.add_argument("--output_dir", default="runs/scaling_study", help="The Trainer's folders (it saves nothing there).")
    p.add_argument("--minutes", type=float, default=20.0, help="run: training minutes; sweep: those of a final run.")
    run_options = p.add_argument_group("run")
    run_options.add_argument("--size", default="4x256", help="LAYERSxWIDTH.")
    run_options.add_argument("--model", choices=list(MODELS), default="sentence")
    run_options.add_argument("--name", help="The record's name (default: MODEL-SIZE-lrLR-seedSEED).")
    run_options.add_argument("--lever", help="The lever this run tests (its name in the report).")
    run_options.add_argument("--speed", action="store_true", help="Time greedy generation (--speed_batches).")
    run_options.add_argument("--speed_batches", default="1,32", help="Batch sizes --speed times.")
    run_options.add_argument("--save", help="Save the trained model and tokenizer to SAVE/NAME.")
    sweep_options = p.add_argument_group("sweep")
    sweep_options.add_argument("--plan", choices=["tune", "final", "seeds", "levers"], default="tune")
    sweep_options.add_argument("--sizes", default="2x128,4x256,8x384", help="The sizes, smallest first.")
    sweep_options.add_argument("--lrs", default="5e-4,1e-3,2e-3", help="The learning rates tune tries.")
    sweep_options.add_argument("--tune_minutes", type=float, default=5.0)
    sweep_options.add_argument("--lr_extensions", type=int, default=2,
                               help="tune: rates tried past an edge of --lrs that wins, at most (each 2x further).")
    sweep_options.add_argument("--cores", default="0", help="Cores to run on, one run each at a time (e.g. 0,1).")
    sweep_options.add_argument("--workdir", default="runs/scaling_study", help="Logs (and checkpoints) of a sweep.")
    sweep_options.add_argument("--save_final", action="store_true", help="Keep the final runs' models in WORKDIR.")
    sweep_options.add_argument("--poll_seconds", type=float, default=5.0)
    report_options = p.add_argument_group("report")
    report_options.add_argument("--speed_plot", help="PNG of NLL against generation tokens/s.")
    add_setting_arguments(p)  # from_scratch.py's data, shape, training and output options
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not 0 < args.stage1_share < 1:
        p.error("--stage1_share must be between 0 and 1 (both stages need time)")
    if args.step == "run":
        parse_size(args.size)
        args.name = args.name or f"{args.model}-{args.size}-lr{args.lr:g}-seed{args.seed}"
    if args.step == "sweep":
        for size in args.sizes.split(","):
            parse_size(size)
    return args


def main(argv=None):
    began = time.perf_counter()
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"run": run, "sweep": sweep, "report": report}[args.step](args)
    print(f"({args.step}: {time.perf_counter() - began:.0f} s)")
    if args.step == "sweep" and result:
        raise SystemExit(f"{len(result)} run(s) failed: {', '.join(result)}")
    return result


if __name__ == "__main__":
    main()
