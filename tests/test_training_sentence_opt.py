"""Stage-2 training: a few Trainer steps, saving, resuming, and two processes under accelerate."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sentence_lm.corpus import default_corpus
from sentence_lm.training_sentence_opt import train_sentence_opt

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("\n\n".join(default_corpus()[:120]))
    return path


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
    for name, tensor in second["model"].sentence_vae.state_dict().items():
        torch.testing.assert_close(tensor, vae_before[name], msg=name)


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
    json.dump({"batches": seen, "weights": digest, "world": PartialState().num_processes}, f)
"""


def test_two_processes_see_different_data_and_end_with_identical_weights(text_file, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(DISTRIBUTED))
    env = dict(os.environ, RECORD_DIR=str(tmp_path), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    command = [
        # torch.distributed's launcher; on CPU the processes talk over gloo (`--use_cpu`).
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
        *arguments(text_file, tmp_path / "out", "--max_steps", "4", "--do_eval", "false", "--use_cpu", "true"),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["batches"] and ranks[0]["batches"] != ranks[1]["batches"]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_training_from_a_llama_token_model_uses_its_tokenizer_and_embeddings(text_file, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from sentence_lm.tokenization_sentence_lm import train_sentence_tokenizer

    tokenizer = train_sentence_tokenizer(default_corpus(), vocab_size=512, max_sentence_len=16)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )  # fmt: skip
    llama.save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    args = [a for a in arguments(text_file, tmp_path / "run", "--max_steps", "4") if a != "num_hidden_layers=1,ffn_dim=128"]
    args.remove("--backbone_config")
    results = train_sentence_opt([*args, "--backbone_name_or_path", str(tmp_path / "llama")])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model_type"] == "sentence_lm" and saved["backbone"]["model_type"] == "llama"
    assert saved["base_model"] == str(tmp_path / "llama")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    assert type(model.model.backbone).__name__ == "LlamaModel"
    assert results["eval"]["num_tokens"] > 0
