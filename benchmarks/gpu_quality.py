#!/usr/bin/env python
"""The quality comparisons of issue 17 on a GPU, in one command, sized for a short lent budget.

Runs, in this order (the SmolLM2 run first: it is what a CPU cannot answer):

1. ``examples/sentence_lm_from_smollm2.py`` with ``--device cuda --bf16``: the SentenceLM on
   SmolLM2-135M against SmolLM2 fine-tuned for the same minutes, with the conversion recipe of
   RESULTS section 12c (:data:`RECIPE`: no stage 1, a Sentence Decoder of SmolLM2's own layers
   reading the text's last 32 tokens), GPU-sized batches;
2. ``benchmarks/side_by_side.py``: both models' text on the same five prompts;
3. ``benchmarks/from_scratch.py`` with ``--device cuda --bf16``: the small SentenceLM against its
   same-shape token model at equal wall time.

``--budget_minutes`` is the training time of all of it (evaluations, loading and saving come on
top, a few minutes on a GPU): 30% each for stage 2 and SmolLM2's fine-tuning, 20% each for the two
models trained from scratch. Checkpoints go to ``--work_dir``; the reports, JSON,
curve plots and the text side by side to ``--results_dir``. A step that fails is reported and the
next one still runs; the exit status is that of the first failure. ``--dry_run`` prints the
commands and runs nothing. Example (on the device machine, results under ``$OUT``)::

    python benchmarks/gpu_quality.py --results_dir "$OUT" --budget_minutes 8
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SHARES = {"stage2": 0.30, "from_scratch": 0.20}
"""Each run's share of ``--budget_minutes`` (the baseline gets stage 2's; from scratch is per model)."""
RECIPE = [
    "--stage1_minutes", "0", "--copy_layers", "0,1,24,25,26,27,28,29",
    "--sentence_vae_config", "num_decoder_layers=8,context_window=32",
]  # fmt: skip
"""The SmolLM2 conversion (RESULTS 12c): no stage 1; the Sentence Decoder starts as SmolLM2's
first two and last six layers with its final norm and output layer, and reads the text's last 32
tokens before its sentence."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--results_dir", required=True, help="Reports, JSON, plots and text side by side go here.")
    p.add_argument("--work_dir", default="/tmp/sentence_lm_gpu_quality", help="Checkpoints go here.")
    p.add_argument("--budget_minutes", type=float, default=8.0, help="Training minutes of all runs together.")
    p.add_argument("--device", default="cuda")
    p.add_argument("--validation_file", default=str(SHARED_DATA / "wikitext-2-raw" / "valid.txt"))
    p.add_argument("--skip_from_scratch", action="store_true", help="Run the SmolLM2 comparison only.")
    p.add_argument("--dry_run", action="store_true", help="Print the commands; run nothing.")
    args = p.parse_args(argv)
    if args.budget_minutes <= 0:
        p.error("--budget_minutes must be positive")
    return args


def commands(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """``(script, argv)`` of each run, scripts relative to the repository root."""
    minutes = {name: round(share * args.budget_minutes, 2) for name, share in SHARES.items()}
    work, results = Path(args.work_dir), Path(args.results_dir)
    smollm2 = work / "smollm2"
    runs = [
        ("examples/sentence_lm_from_smollm2.py", [
            "--output_dir", str(smollm2), "--device", args.device, "--bf16",
            "--validation_file", args.validation_file,
            "--stage2_minutes", str(minutes["stage2"]), *RECIPE,
            "--batch_size", "16", "--eval_batch_size", "32", "--eval_steps", "10",
        ]),
        ("benchmarks/side_by_side.py", [
            "--checkpoint", str(smollm2 / "stage2"), "--label", "SentenceLM (c, stage 2)",
            "--token_model", f"SmolLM2 fine-tuned (d)={smollm2 / 'baseline'}",
            "--text", str(smollm2 / "data" / "valid.txt"), "--out", str(results / "smollm2_side_by_side.md"),
        ]),
    ]  # fmt: skip
    if not args.skip_from_scratch:
        runs.append(("benchmarks/from_scratch.py", [
            "--device", args.device, "--bf16", "--minutes", str(minutes["from_scratch"]), "--curve_minutes",
            str(round(minutes["from_scratch"] / 6, 2)), "--batch", "64", "--stage1_batch", "512",
            "--validation_file", args.validation_file, "--output_dir", str(work / "from_scratch"),
            "--json", str(results / "from_scratch.json"), "--report", str(results / "from_scratch.md"),
            "--plot", str(results / "from_scratch.png"),
        ]))  # fmt: skip
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = commands(args)
    if args.dry_run:
        for script, script_argv in runs:
            print(shlex.join(["python", script, *script_argv]))
        return 0
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    status = 0
    for script, script_argv in runs:
        print(f"==> python {script} {shlex.join(script_argv)}", flush=True)
        code = subprocess.call([sys.executable, str(ROOT / script), *script_argv], cwd=ROOT)
        if code:
            print(f"==> {script} failed with exit status {code}", flush=True)
            status = status or code
        if script == "examples/sentence_lm_from_smollm2.py":
            for name in ("report.json", "report.md", "nll_curve.png"):
                source = Path(args.work_dir) / "smollm2" / name
                if source.is_file():
                    shutil.copy(source, results / f"smollm2_{name}")
    return status


if __name__ == "__main__":
    sys.exit(main())
