"""benchmarks/scaling_study.py: every plan of the sweep on tiny sizes, and its report."""

from __future__ import annotations

import json

import pytest
from helpers import load_script

from sentence_lm.corpus import default_corpus


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from test_smollm2_script import _wikitext_like

    folder = tmp_path_factory.mktemp("scaling")
    paragraphs = [p for p in default_corpus() if p.strip()]
    (folder / "train.txt").write_text(_wikitext_like(paragraphs[:-15]), encoding="utf-8")
    (folder / "valid.txt").write_text(_wikitext_like(paragraphs[-15:]), encoding="utf-8")
    common = [
        "--records", str(folder / "records"), "--workdir", str(folder / "work"), "--train_file", str(folder / "train.txt"),
        "--validation_file", str(folder / "valid.txt"), "--selection_paragraphs", "40", "--curve_minutes", "0.005",
        "--eval_tokens", "300", "--curve_tokens", "100", "--vocab_size", "512", "--block_size", "64",
        "--max_sentence_len", "16", "--batch", "4", "--stage1_batch", "16", "--device", "cpu",
        "--output_dir", str(folder / "runs"), "--sizes", "1x32", "--lrs", "1e-3,3e-3", "--tune_minutes", "0.02",
        "--minutes", "0.03", "--cores", "0", "--poll_seconds", "0.2", "--speed_batches", "1,4", "--lr_extensions", "0",
    ]  # fmt: skip
    return load_script("benchmarks/scaling_study.py"), folder, common


def test_sweep_tunes_then_trains_at_the_chosen_rate_and_reports(study):
    script, folder, common = study
    assert script.main(["sweep", *common, "--plan", "tune"]) == []
    records = script.read_records(folder / "records")
    assert sorted(records) == ["tune-1x32-sentence-lr1e-3", "tune-1x32-sentence-lr3e-3",
                               "tune-1x32-token-lr1e-3", "tune-1x32-token-lr3e-3"]  # fmt: skip
    for record in records.values():
        assert record["steps"] >= 1 and 0 < record["selection_nll"] < 20 and record["clock"] == "cpu"
        assert record["threads"] == 1 and record["curve"][0]["nll"] > 0
    assert (folder / "work" / "logs" / "tune-1x32-token-lr1e-3.log").is_file()
    best = min((r for r in records.values() if r["model"] == "token"), key=lambda r: r["selection_nll"])["lr"]
    assert script.main(["sweep", *common, "--plan", "tune"]) == []  # nothing left to run

    assert script.main(["sweep", *common, "--plan", "final", "--save_final"]) == []
    final = json.loads((folder / "records" / "final-1x32-token.json").read_text())
    assert final["lr"] == best and final["minutes"] == 0.03
    assert set(final["generation_tokens_per_s"]) == {"1", "4"} and min(final["generation_tokens_per_s"].values()) > 0
    assert (folder / "work" / "checkpoints" / "final-1x32-sentence" / "config.json").is_file()

    found = script.main(["report", *common, "--report", str(folder / "r.md"), "--json", str(folder / "r.json"),
                         "--plot", str(folder / "curves.png"), "--speed_plot", str(folder / "frontier.png")])  # fmt: skip
    [pair] = found["pairs"]
    assert pair["gap_valid"] == pytest.approx(pair["sentence"]["valid_nll"] - pair["token"]["valid_nll"])
    text = (folder / "r.md").read_text()
    assert "| 1x32 | token model |" in text and "| 1x32 | SentenceLM |" in text and "lr 0.003" in text
    assert json.loads((folder / "r.json").read_text())["pairs"][0]["size"] == "1x32"
    if pytest.importorskip("matplotlib"):
        assert (folder / "curves.png").is_file() and (folder / "frontier.png").is_file()


def test_seed_and_lever_plans_change_one_setting_of_the_final_run(study):
    script, folder, common = study
    records = folder / "records"
    records.mkdir(parents=True, exist_ok=True)
    for model, lr in (("token", 3e-3), ("sentence", 1e-3)):
        (records / f"tune-9x64-{model}-lr{lr:g}.json").write_text(json.dumps(
            {"name": f"tune-9x64-{model}-lr{lr:g}", "size": "9x64", "model": model, "lr": lr, "selection_nll": 5.0}))
    args = script.parse_args(["sweep", *common, "--sizes", "9x64", "--plan", "seeds"])
    seeds = script.plan_jobs(args)
    assert [(j["name"], j["seed"], j["lr"]) for j in seeds] == [("seed1-9x64-token", 1, 3e-3), ("seed1-9x64-sentence", 1, 1e-3)]
    args.plan = "levers"
    levers = script.plan_jobs(args)
    assert len(levers) == len(script.LEVERS) and all(j["model"] == "sentence" and j["lr"] == 1e-3 for j in levers)
    assert {j["name"] for j in levers} >= {"lever-9x64-max_sentence_len=16", "lever-9x64-SentenceVAE2-2"}
    assert {j["lever"]: j.get("max_sentence_len") for j in levers}["max_sentence_len=16"] == 16
    args.sizes = "7x64"
    with pytest.raises(SystemExit, match="run the tune plan first"):
        script.plan_jobs(args)


def test_tune_brackets_a_best_rate_at_an_edge_of_the_grid(study, tmp_path):
    script, _, common = study
    args = script.parse_args(["sweep", *common, "--records", str(tmp_path), "--sizes", "9x64", "--lrs", "1e-3,2e-3",
                              "--lr_extensions", "2"])  # fmt: skip

    def record(model, lr, nll):
        name = f"tune-9x64-{model}-lr{script.lr_text(lr)}"
        (tmp_path / f"{name}.json").write_text(json.dumps(
            {"name": name, "size": "9x64", "model": model, "lr": lr, "selection_nll": nll}))  # fmt: skip

    def rates(model):
        return sorted(j["lr"] for j in script.plan_jobs(args) if j["model"] == model)

    assert rates("token") == [1e-3, 2e-3]  # nothing known yet: the grid
    record("token", 1e-3, 5.0)
    assert rates("token") == [1e-3, 2e-3]  # the grid first
    record("token", 2e-3, 4.0)
    assert rates("token") == [1e-3, 2e-3, 4e-3]  # the highest rate won: one twice past it
    record("token", 4e-3, 3.0)
    assert rates("token") == [1e-3, 2e-3, 4e-3, 8e-3]
    record("token", 8e-3, 2.0)
    assert rates("token") == [1e-3, 2e-3, 4e-3, 8e-3]  # two extensions at most
    record("sentence", 1e-3, 4.0)
    record("sentence", 2e-3, 4.5)
    assert rates("sentence") == [5e-4, 1e-3, 2e-3]  # the lowest won: half of it
    record("sentence", 5e-4, 4.2)
    assert rates("sentence") == [5e-4, 1e-3, 2e-3]  # bracketed
    assert script.lr_text(2.5e-4) == "2.5e-4" and script.tuned_lr(script.read_records(tmp_path), "9x64", "token") == 8e-3


def test_sizes_are_checked():
    script = load_script("benchmarks/scaling_study.py")
    assert script.parse_size("8x384") == {"num_layers": 8, "hidden_size": 384, "num_heads": 6, "ffn_dim": 1536}
    assert script.parse_size("1x32")["num_heads"] == 1
    for bad in ("4-256", "0x256", "x"):
        with pytest.raises(SystemExit, match="LAYERSxWIDTH"):
            script.parse_size(bad)
    with pytest.raises(SystemExit, match="heads of 64"):
        script.parse_size("2x200")
