"""Stage-2 training: a few Trainer steps, saving, resuming, and two processes under accelerate."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import assert_same_weights
from transformers import AutoModelForCausalLM, AutoTokenizer

from sentence_lm.corpus import default_corpus
from sentence_lm.training_sentence_opt import train_sentence_opt

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("\n\n".join(default_corpus()[:120]))
    return path


def backbone_arguments(text_file, output_dir, backbone_dir, *extra):
    """`arguments` with the backbone taken from a saved token model instead of a new tiny OPT."""
    args = arguments(text_file, output_dir, *extra)
    at = args.index("--backbone_config")
    del args[at : at + 2]
    return [*args, "--backbone_name_or_path", str(backbone_dir)]


def arguments(text_file, output_dir, *extra):
    return [
        "--train_file", str(text_file),
        "--output_dir", str(output_dir),
        "--vocab_size", "512",
        "--max_sentence_len", "16",
        "--block_size", "64",
        "--backbone_config", "num_hidden_layers=1,ffn_dim=128",
        "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "8",
        "--max_eval_samples", "8",
        "--logging_steps", "1",
        "--report_to", "none",
        "--disable_tqdm", "true",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


def test_training_lowers_the_loss_and_saves_a_loadable_model(text_file, tmp_path):
    results = train_sentence_opt(arguments(text_file, tmp_path, "--max_steps", "12", "--learning_rate", "3e-3"))
    losses = [loss for _, loss in results["loss_curve"]]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert results["eval"]["num_tokens"] > 0 and results["eval"]["perplexity"] > 1
    for name in ("model.safetensors", "tokenizer.json", "README.md", "generation_config.json"):
        assert (tmp_path / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    out = model.generate(**tokenizer("The value", return_tensors="pt"), max_new_tokens=5, min_new_tokens=5)
    assert out.shape[1] == len(tokenizer("The value")["input_ids"]) + 5
    assert "held-out perplexity" in (tmp_path / "README.md").read_text()


def test_training_resumes_from_its_last_checkpoint(text_file, tmp_path):
    common = ("--save_steps", "3", "--do_eval", "false")
    train_sentence_opt(arguments(text_file, tmp_path, "--max_steps", "3", *common))
    assert (tmp_path / "checkpoint-3").is_dir()
    resumed = train_sentence_opt(
        arguments(text_file, tmp_path, "--max_steps", "5", "--resume_from_checkpoint", "latest", *common)
    )
    assert resumed["global_step"] == 5
    assert [step for step, _ in resumed["loss_curve"]][-2:] == [4, 5]


def test_frozen_sentence_vae_stays_unchanged(text_file, tmp_path):
    stage1 = tmp_path / "first"
    first = train_sentence_opt(arguments(text_file, stage1, "--max_steps", "2", "--do_eval", "false"))
    vae_before = {k: v.clone() for k, v in first["model"].sentence_vae.state_dict().items()}
    second = train_sentence_opt(
        arguments(text_file, tmp_path / "second", "--max_steps", "3", "--do_eval", "false", "--freeze_sentence_vae")
        + ["--model_name_or_path", str(stage1)]
    )
    assert_same_weights(second["model"].sentence_vae, vae_before, close=True)



def test_frozen_token_embeddings_and_a_chunked_loss(text_file, tmp_path):
    """--freeze_token_embeddings keeps the embeddings and the tied output layer as they were and
    trains the rest; --loss_chunk_size reaches the SentenceVAE config the loss reads."""
    stage1 = tmp_path / "first"
    first = train_sentence_opt(arguments(text_file, stage1, "--max_steps", "2", "--do_eval", "false"))
    before = first["model"].state_dict()
    before = {k: v.clone() for k, v in before.items()}
    second = train_sentence_opt(
        arguments(text_file, tmp_path / "second", "--max_steps", "3", "--do_eval", "false",
                  "--freeze_token_embeddings", "True", "--loss_chunk_size", "8")
        + ["--model_name_or_path", str(stage1)]
    )  # fmt: skip
    model = second["model"]
    assert model.config.sentence_vae.loss_chunk_size == 8 == model.sentence_vae.config.loss_chunk_size
    after = model.state_dict()
    torch.testing.assert_close(after["model.sentence_vae.embed_tokens.weight"], before["model.sentence_vae.embed_tokens.weight"])
    assert not torch.equal(after["stop_head.weight"], before["stop_head.weight"])


DISTRIBUTED = """
import hashlib, json, os, sys
import torch
from accelerate import PartialState
import sentence_lm.training_sentence_opt as stage2

seen = []
collate = stage2.PaddingCollator.__call__

def recording(self, features):
    batch = collate(self, features)
    seen.append(batch["input_ids"][:, :12].tolist())
    return batch

stage2.PaddingCollator.__call__ = recording
results = stage2.train_sentence_opt(sys.argv[1:])
state = results["model"].state_dict()
digest = hashlib.sha256(b"".join(state[k].detach().cpu().numpy().tobytes() for k in sorted(state))).hexdigest()
rank = PartialState().process_index
with open(os.path.join(os.environ["RECORD_DIR"], f"rank{rank}.json"), "w") as f:
    json.dump({"batches": seen, "weights": digest, "world": PartialState().num_processes,
               "losses": [loss for _, loss in results["loss_curve"]]}, f)
"""


def weights_digest(model):
    """The DISTRIBUTED script's digest of a model's weights."""
    state = model.state_dict()
    return hashlib.sha256(b"".join(state[k].detach().cpu().numpy().tobytes() for k in sorted(state))).hexdigest()


@pytest.mark.parametrize("backbone", ["opt", "llama"])
def test_two_processes_see_different_data_and_end_with_identical_weights(backbone, text_file, tmp_path, request):
    """Both the default SentenceOPT and a SentenceLM over a saved Llama (--backbone_name_or_path)."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(DISTRIBUTED))
    env = dict(os.environ, RECORD_DIR=str(tmp_path), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    command = [
        # torch.distributed's launcher; on CPU the processes talk over gloo (`--use_cpu`).
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
    ]  # fmt: skip
    extra = ("--max_steps", "4", "--do_eval", "false", "--use_cpu", "true")
    if backbone == "llama":
        llama_dir = request.getfixturevalue("llama_dir")
        command += backbone_arguments(text_file, tmp_path / "out", llama_dir, *extra)
    else:
        command += arguments(text_file, tmp_path / "out", *extra)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["batches"] and ranks[0]["batches"] != ranks[1]["batches"]
    assert ranks[0]["losses"] == ranks[1]["losses"]  # the logged loss is averaged over both processes
    assert len(ranks[0]["losses"]) == 4 and all(0 < loss < float("inf") for loss in ranks[0]["losses"])
    assert (tmp_path / "out" / "model.safetensors").is_file()
    # The saved checkpoint is the trained model, and loads through the auto classes.
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert weights_digest(model) == ranks[0]["weights"]
    if backbone == "llama":
        assert saved["model_type"] == "sentence_lm" and saved["backbone"]["model_type"] == "llama"
        assert type(model.model.backbone).__name__ == "LlamaModel"
        # It trained: the backbone's layers moved away from the token model's.
        start = AutoModelForCausalLM.from_pretrained(llama_dir).model.state_dict()
        moved = [k for k, v in model.model.backbone.state_dict().items() if not torch.equal(v, start[k])]
        assert any(k.startswith("layers.") for k in moved), moved
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
        assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(llama_dir).get_vocab()
        out = model.generate(**tokenizer("The value", return_tensors="pt"), max_new_tokens=5, min_new_tokens=5)
        assert out.shape[1] == len(tokenizer("The value")["input_ids"]) + 5
    else:
        assert saved["model_type"] == "sentence_opt"


def test_training_from_a_llama_token_model_uses_its_tokenizer(text_file, llama_dir, tmp_path):
    results = train_sentence_opt(backbone_arguments(text_file, tmp_path / "run", llama_dir, "--max_steps", "4"))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model_type"] == "sentence_lm" and saved["backbone"]["model_type"] == "llama"
    assert saved["base_model"] == str(llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    assert type(model.model.backbone).__name__ == "LlamaModel"
    assert AutoTokenizer.from_pretrained(tmp_path / "run").get_vocab() == AutoTokenizer.from_pretrained(llama_dir).get_vocab()
    assert results["eval"]["num_tokens"] > 0
