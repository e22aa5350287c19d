"""The GPU quality command: every run it launches parses under its script, with the sizes asked for."""

import shlex

import pytest
from helpers import load_script


def test_gpu_quality_commands_parse_under_their_scripts(tmp_path, capsys):
    gpu = load_script("benchmarks/gpu_quality.py")
    args = gpu.parse_args(["--results_dir", str(tmp_path / "out"), "--work_dir", str(tmp_path / "work"),
                           "--budget_minutes", "10"])  # fmt: skip
    runs = dict(gpu.commands(args))
    assert list(runs) == ["examples/sentence_lm_from_smollm2.py", "benchmarks/side_by_side.py", "benchmarks/from_scratch.py"]

    smollm2 = load_script("examples/sentence_lm_from_smollm2.py").parse_args(runs["examples/sentence_lm_from_smollm2.py"])
    assert (smollm2.device, smollm2.bf16) == ("cuda", True)
    assert (smollm2.stage1_minutes, smollm2.stage2_minutes, smollm2.baseline_minutes) == (3.0, 1.5, 1.5)
    assert smollm2.stage1_args == "--freeze_token_embeddings True"
    sbs = load_script("benchmarks/side_by_side.py").parse_args(runs["benchmarks/side_by_side.py"])
    assert sbs.checkpoint == str(tmp_path / "work" / "smollm2" / "stage2")
    assert sbs.out.startswith(str(tmp_path / "out"))
    scratch = load_script("benchmarks/from_scratch.py").parse_args(runs["benchmarks/from_scratch.py"])
    assert (scratch.device, scratch.bf16, scratch.minutes) == ("cuda", True, 2.0)
    assert all(path.startswith(str(tmp_path / "out")) for path in (scratch.json, scratch.report, scratch.plot))

    assert gpu.main(["--results_dir", str(tmp_path / "out"), "--skip_from_scratch", "--dry_run"]) == 0
    printed = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert [line[1] for line in printed] == ["examples/sentence_lm_from_smollm2.py", "benchmarks/side_by_side.py"]
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        gpu.parse_args(["--results_dir", str(tmp_path), "--budget_minutes", "0"])
