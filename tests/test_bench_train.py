"""benchmarks/bench_train.py end to end on a tiny random Llama: the three models train on the same
tokens, and every figure it reports exists and agrees with the others."""

import json

import pytest
from helpers import load_script


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    bench = load_script("benchmarks/bench_train.py")
    out = tmp_path_factory.mktemp("bench_train") / "train.json"
    argv = ["--model", "tiny", "--dtypes", "fp32,bf16", "--steps", "1", "--batch_size", "2", "--block_size", "64",
            "--threads", "1", "--profile", "--out", str(out)]  # fmt: skip
    return bench, bench.run_benchmark(argv), out


def test_rows_cover_every_model_and_dtype_with_consistent_figures(run):
    _, results, out = run
    assert json.loads(out.read_text()) == results
    rows = results["rows"]
    assert {(r["model"], r["dtype"]) for r in rows} == {
        (m, d) for m in ("sentence_lm", "token_model", "sentence_vae") for d in ("fp32", "bf16")
    }
    batch = results["meta"]["batch"]
    assert batch["tokens"] == 2 * 64 and batch["sentences"] > 1
    assert 0 < batch["stage1_tokens"] <= batch["tokens"]  # stage 1 leaves special tokens out
    for r in rows:
        assert len(r["step_runs_s"]) == 1 and r["step_s"] == r["step_runs_s"][0] > 0
        assert r["tokens"] == (batch["stage1_tokens"] if r["model"] == "sentence_vae" else batch["tokens"])
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["step_s"])
        assert r["flops_per_token"] > 0 and r["counted_flops_per_token"] > 0
        assert r["flop_bound_tokens_per_s"] == pytest.approx(r["matmul_flop_per_s"] / r["flops_per_token"])
        assert r["profile"] and all(e["self_ms"] >= 0 and e["calls"] > 0 for e in r["profile"])
        token = next(t for t in rows if t["model"] == "token_model" and t["dtype"] == r["dtype"])
        assert r["ratio_to_token_model"] == pytest.approx(r["tokens_per_s"] / token["tokens_per_s"])
        assert r["flop_ratio_to_token_model"] == pytest.approx(token["flops_per_token"] / r["flops_per_token"])
    # The SentenceLM's step holds its SentenceVAE's work and the backbone's on top.
    for dtype in ("fp32", "bf16"):
        by_model = {r["model"]: r for r in rows if r["dtype"] == dtype}
        assert by_model["sentence_lm"]["flops_per_token"] > by_model["sentence_vae"]["flops_per_token"]


def test_flop_estimates_match_the_counted_flops_of_a_token_model(run):
    """For the token model (no padding, nothing skipped) the analytic estimate is what the kernels run."""
    _, results, _ = run
    row = next(r for r in results["rows"] if r["model"] == "token_model" and r["dtype"] == "fp32")
    assert row["counted_flops_per_token"] == pytest.approx(row["flops_per_token"], rel=0.15)


def test_tables_name_the_models_and_the_batch(run):
    bench, results, _ = run
    text = bench.format_tables(results)
    assert "tiny Llama" in text and "2 x 64 tokens" in text
    assert text.count("| sentence_lm |") == 2 and "Profile of one token_model step (bf16)" in text


def test_unknown_dtype_is_refused(run):
    bench, _, _ = run
    with pytest.raises(SystemExit, match="fp16"):
        bench.run_benchmark(["--model", "tiny", "--dtypes", "fp16"])
