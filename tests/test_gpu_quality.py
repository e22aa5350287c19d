"""The GPU quality command: every run it launches parses under its own script's parser, the
training minutes it hands out add up to ``--budget_minutes`` and grow with it, and the runs find
each other's outputs. Nothing here repeats the script's shares: the checks hold for any split."""

import shlex
from pathlib import Path

import pytest
from helpers import load_script

GPU = "benchmarks/gpu_quality.py"


@pytest.fixture(scope="module")
def gpu():
    return load_script(GPU)


def parsed_runs(gpu, tmp_path, *extra):
    """Each launched run's arguments, parsed by the ``parse_args`` of the script it launches."""
    args = gpu.parse_args(["--results_dir", str(tmp_path / "out"), "--work_dir", str(tmp_path / "work"), *extra])
    runs = gpu.commands(args)
    scripts = [script for script, _ in runs]
    assert len(set(scripts)) == len(scripts), scripts
    parsed = {}
    for script, argv in runs:
        assert (Path(gpu.ROOT) / script).is_file(), script
        parsed[script] = load_script(script).parse_args(argv)  # an unknown or malformed flag exits here
    return args, parsed


def training_minutes(parsed):
    """What each run trains for, in minutes, as its own script reads its arguments."""
    smollm2 = parsed["examples/sentence_lm_from_smollm2.py"]
    minutes = {
        "stage1": smollm2.stage1_minutes,
        "stage2": smollm2.stage2_minutes,
        "baseline": smollm2.baseline_minutes,
    }
    if "benchmarks/from_scratch.py" in parsed:
        scratch = parsed["benchmarks/from_scratch.py"]
        minutes["from_scratch"] = 2 * scratch.minutes  # --minutes is each of its two models'
    return minutes


@pytest.mark.parametrize("budget", [3.0, 10.0, 37.5])
def test_the_runs_share_out_the_whole_budget(gpu, tmp_path, budget):
    _, parsed = parsed_runs(gpu, tmp_path, "--budget_minutes", str(budget))
    minutes = training_minutes(parsed)
    assert set(minutes) == {"stage1", "stage2", "baseline", "from_scratch"}
    assert minutes["stage1"] >= 0 and all(minutes[k] > 0 for k in ("stage2", "baseline", "from_scratch")), minutes
    assert sum(minutes.values()) == pytest.approx(budget, abs=0.05)  # rounded to hundredths of a minute
    # The fair comparison: SmolLM2's fine-tuning gets the minutes of the SentenceLM's stage 2.
    assert minutes["baseline"] == minutes["stage2"]
    scratch = parsed["benchmarks/from_scratch.py"]
    assert 0 < scratch.curve_minutes < scratch.minutes


def test_a_larger_budget_gives_proportionally_longer_runs(gpu, tmp_path):
    _, small = parsed_runs(gpu, tmp_path / "small", "--budget_minutes", "4")
    _, large = parsed_runs(gpu, tmp_path / "large", "--budget_minutes", "20")
    small_minutes, large_minutes = training_minutes(small), training_minutes(large)
    assert small_minutes.keys() == large_minutes.keys()
    for name, m in small_minutes.items():
        assert large_minutes[name] == pytest.approx(5 * m, abs=0.05), name  # minutes are rounded to 0.01
    curve = small["benchmarks/from_scratch.py"].curve_minutes, large["benchmarks/from_scratch.py"].curve_minutes
    assert curve[1] == pytest.approx(5 * curve[0], abs=0.05)


def test_the_runs_use_the_device_and_find_each_others_outputs(gpu, tmp_path):
    args, parsed = parsed_runs(gpu, tmp_path, "--device", "cuda:1", "--validation_file", str(tmp_path / "v.txt"))
    assert list(parsed) == ["examples/sentence_lm_from_smollm2.py", "benchmarks/side_by_side.py", "benchmarks/from_scratch.py"]
    smollm2, sbs, scratch = parsed.values()
    for run in (smollm2, scratch):  # both train on the device asked for, in bfloat16
        assert (run.device, run.bf16, run.validation_file) == ("cuda:1", True, args.validation_file)
    # The text side by side reads the checkpoints the SmolLM2 run writes.
    assert Path(sbs.checkpoint) == Path(smollm2.output_dir) / "stage2"
    assert any(spec.endswith("=" + str(Path(smollm2.output_dir) / "baseline")) for spec in sbs.token_model)
    # Checkpoints under --work_dir, reports under --results_dir.
    work, results = tmp_path / "work", tmp_path / "out"
    assert Path(smollm2.output_dir).is_relative_to(work) and Path(scratch.output_dir).is_relative_to(work)
    assert Path(sbs.out).is_relative_to(results)
    assert all(Path(p).is_relative_to(results) for p in (scratch.json, scratch.report, scratch.plot))


def test_skip_from_scratch_and_dry_run(gpu, tmp_path, capsys):
    _, parsed = parsed_runs(gpu, tmp_path, "--skip_from_scratch")
    assert "benchmarks/from_scratch.py" not in parsed and len(parsed) == 2
    argv = ["--results_dir", str(tmp_path / "out"), "--work_dir", str(tmp_path / "work"), "--skip_from_scratch"]
    assert gpu.main([*argv, "--dry_run"]) == 0
    printed = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    # The dry run prints exactly the commands a real run launches, and creates nothing.
    assert printed == [["python", script, *script_argv] for script, script_argv in gpu.commands(gpu.parse_args(argv))]
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


@pytest.mark.parametrize("budget", ["0", "-1"])
def test_a_budget_that_is_not_positive_is_refused(gpu, tmp_path, budget):
    with pytest.raises(SystemExit):
        gpu.parse_args(["--results_dir", str(tmp_path), "--budget_minutes", budget])
