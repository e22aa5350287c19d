"""benchmarks/profile_generate.py on a tiny random model: every part of generation is timed, the
parts add up to the wall time, and instrumenting changes neither the text nor the package."""

import json

import pytest
from helpers import load_script


@pytest.fixture(scope="module")
def profile():
    return load_script("benchmarks/profile_generate.py")


@pytest.fixture(scope="module")
def results(profile, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile") / "profile.json"
    argv = [
        "--backbone", "llama", "--shape", "tiny", "--config", "num_key_value_heads=2", "--dtype", "int8",
        "--new_tokens", "32", "--prompt_tokens", "24", "--sentence_len", "4", "--repeats", "2", "--threads", "1",
        "--head_iters", "20", "--torch_profile", "5", "--quiet", "--out", str(out),
    ]  # fmt: skip
    return profile.run_profile(argv), out


def test_parts_add_up_to_the_wall_time(profile, results):
    res, _ = results
    assert [p["part"] for p in res["parts"]] == profile.PARTS
    assert all(p["ms_per_token"] >= 0 for p in res["parts"])
    assert sum(p["share"] for p in res["parts"]) == pytest.approx(1.0, abs=0.05)
    # Each instrumented run: the parts' seconds against the run's wall time measured outside them.
    tokens = res["meta"]["batch"] * res["meta"]["new_tokens"]
    assert res["sum_of_parts_ms_per_token"] == pytest.approx(res["total_ms_per_token"], rel=0.05, abs=1000 * 1e-3 / tokens)
    for run, wall in zip(res["runs"], res["instrumented_runs_s"]):
        assert sum(run["seconds"].values()) == pytest.approx(wall, rel=0.05, abs=1e-3)


def test_every_step_of_the_runtime_is_seen(profile, results):
    res, _ = results
    parts = {p["part"]: p for p in res["parts"]}
    for name in (profile.HEAD, profile.DECODER, profile.GLUE, profile.BACKBONE, profile.ENCODER, profile.PROMPT,
                 profile.SAMPLING, profile.PROCESSORS, profile.FORCING, profile.LOOP, profile.SETUP):  # fmt: skip
        assert parts[name]["ms_per_token"] > 0, name
    # Every sentence 4 tokens: one decoder pass per token plus one per sentence end, one backbone step per sentence.
    assert res["tokens_per_sentence"] == pytest.approx(4.0)
    assert parts[profile.HEAD]["calls_per_token"] == pytest.approx(res["decoder_passes_per_token"])
    assert res["decoder_passes_per_token"] == pytest.approx(1.25, abs=0.05)
    assert res["backbone_steps_per_token"] == pytest.approx(0.25, abs=0.05)
    assert res["head_alone_ms"] > 0
    assert res["head_bound_tokens_per_s"] == pytest.approx(1000 / res["head_bound_ms_per_token"])
    assert res["plain_tokens_per_s"] > 0 and res["instrumented_tokens_per_s"] > 0
    assert profile.HEAD in res["torch_profile"] or profile.LOOP in res["torch_profile"]


def test_table_and_json(profile, results):
    res, out = results
    table = profile.format_table(res)
    assert "output layer (lm_head)" in table and "bound" in table and "tok/s" in table
    saved = json.loads(out.read_text())
    assert saved["parts"] == res["parts"] and saved["meta"]["dtype"] == "int8"


def test_instrumentation_is_removed_afterwards(profile, results):
    """The wrappers go away when the profile ends: the package's functions are its own again."""
    from sentence_lm import generation_runtime, generation_sentence_lm
    from sentence_lm.generation_runtime import RowSteps

    assert not hasattr(generation_sentence_lm.generate_rows, "__wrapped__")
    for name in ("decoder_step", "decoder_prefill", "backbone_step", "encode", "backbone_prefill"):
        assert not hasattr(getattr(RowSteps, name), "__wrapped__"), name
    for name in ("running_text", "pick_next_token", "ban_empty_sentence", "stop_decision", "verify_draft"):
        assert not hasattr(getattr(generation_runtime, name), "__wrapped__"), name
