"""FSDP: stage-2 training under accelerate's FSDP plugin (FSDP2, `fully_shard`) in two processes
on CPU (gloo), and the checkpoint it saves loads with `from_pretrained`.

accelerate (1.16) turns its FSDP plugin on only for GPU-like devices: on CPU, `accelerate launch
--use_fsdp` silently trains data-parallel (`DistributedType.MULTI_CPU` with the Trainer's
`--use_cpu true`, or independent single processes without it). torch's FSDP2 itself runs on CPU
over gloo, so the script below lifts only that device gate (the distributed type becomes FSDP with
the plugin accelerate built from the launch flags) and everything else is the code a GPU run
goes through: accelerate's auto wrap policy (`_no_split_modules`), `fsdp2_prepare_model`, the
Trainer's FSDP steps and its `save_model` (`accelerator.get_state_dict`, the full state dict
gathered on rank 0, with `--fsdp_state_dict_type FULL_STATE_DICT`). The README's command is the
same launch on GPUs without the gate.

FSDP units: the backbone's decoder layers (its `_no_split_modules`) and, as accelerate adds them,
the SentenceVAE's token embeddings and output layer; the rest (the SentenceVAE's layers, the stop
head) stay in the root unit. `SentenceEncoderLayer` can be named as a unit too
(`--fsdp_transformer_layer_cls_to_wrap SentenceEncoderLayer,OPTDecoderLayer` trains), but
`SentenceDecoderLayer` cannot: the SentenceVAE calls its `cross_attention_state` outside
`forward`, where FSDP2 has not gathered its parameters (`RuntimeError: aten.addmm.default got
mixed torch.Tensor and DTensor`).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import assert_same_weights
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from sentence_lm import SentenceLMForCausalLM, SentenceOPTForCausalLM
from sentence_lm.corpus import default_corpus

REPO = Path(__file__).resolve().parents[1]

# The launch flags of README's FSDP command (there on GPUs, with --num_processes per machine).
FSDP_FLAGS = [
    "--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
    "--fsdp_state_dict_type", "FULL_STATE_DICT",
]  # fmt: skip

SCRIPT = """
import json, os, sys
import torch
import accelerate.state as accelerate_state
from accelerate.utils import DistributedType

# accelerate enables FSDP only on GPU-like devices; on CPU it would fall back to MULTI_CPU
# (data parallel). Lift that gate alone: the plugin accelerate built from the launch flags is kept.
_init = accelerate_state.AcceleratorState.__init__

def init(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        accelerate_state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

accelerate_state.AcceleratorState.__init__ = init

from accelerate import PartialState
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback
import sentence_lm.training_sentence_opt as stage2

RECORD = os.environ["RECORD_DIR"]
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on every rank, on CPU
record = {}


class Probe(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        state_ = PartialState()
        record["distributed_type"] = str(state_.distributed_type)
        record["world"] = state_.num_processes
        record["units"] = sorted(name for name, module in model.named_modules() if isinstance(module, FSDPModule))
        record["sharded"] = {
            name: [list(p.shape), list(p.to_local().shape)] if isinstance(p, DTensor) else None
            for name, p in model.named_parameters()
        }
        initial = get_model_state_dict(model, options=FULL)  # a collective: every rank calls it
        if state_.is_main_process:
            torch.save(initial, os.path.join(RECORD, "initial.pt"))


results = stage2.train_sentence_opt(sys.argv[1:], callbacks=[Probe()])
trained = get_model_state_dict(results["model"], options=FULL)
record["losses"] = [loss for _, loss in results["loss_curve"]]
rank = PartialState().process_index
if rank == 0:
    torch.save(trained, os.path.join(RECORD, "trained.pt"))
with open(os.path.join(RECORD, f"rank{rank}.json"), "w") as f:
    json.dump(record, f)
"""


def arguments(text_file, output_dir, *extra):
    return [
        "--train_file", str(text_file), "--output_dir", str(output_dir),
        "--vocab_size", "512", "--max_sentence_len", "16", "--block_size", "64",
        "--backbone_config", "num_hidden_layers=1,ffn_dim=128",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--max_eval_samples", "8",
        "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true", "--seed", "0",
        *extra,
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["opt", "llama"])
def test_fsdp2_training_in_two_processes_saves_a_checkpoint_that_loads(backbone, tmp_path, request):
    """The default SentenceOPT (a new tiny OPT backbone) and a SentenceLM over a saved Llama."""
    text_file = tmp_path / "text.txt"
    text_file.write_text("\n\n".join(default_corpus()[:120]))
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = dict(os.environ, RECORD_DIR=str(tmp_path), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    out = tmp_path / "out"
    train_arguments = arguments(text_file, out, "--max_steps", "4", "--learning_rate", "3e-3", "--use_cpu", "true")
    layer = "model.backbone.decoder.layers.0"
    if backbone == "llama":  # the backbone from a saved token model, as --backbone_name_or_path takes it
        at = train_arguments.index("--backbone_config")
        del train_arguments[at : at + 2]
        train_arguments += ["--backbone_name_or_path", str(request.getfixturevalue("llama_dir"))]
        layer = "model.backbone.layers.0"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *FSDP_FLAGS, "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
        *train_arguments,
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    # It ran as FSDP2 in two processes: the backbone's layers are units of their own, and every
    # parameter is a DTensor of which each process holds a part (dim 0 split in two).
    for record in ranks:
        assert record["distributed_type"] == "DistributedType.FSDP" and record["world"] == 2
        assert "" in record["units"] and layer in record["units"], record["units"]
        assert all(shapes is not None for shapes in record["sharded"].values()), record["sharded"]
        name = f"{layer}.fc1.weight" if backbone == "opt" else f"{layer}.mlp.up_proj.weight"
        full, local = record["sharded"][name]
        assert local[0] == full[0] // 2 and local[1:] == full[1:]
    losses = ranks[0]["losses"]
    assert losses == ranks[1]["losses"] and len(losses) == 4 and all(0 < loss < float("inf") for loss in losses)

    # The Trainer saved the gathered full state dict; it loads through the auto classes and the
    # model's own class, and holds exactly the trained weights that FSDP gathers.
    trained, initial = torch.load(tmp_path / "trained.pt"), torch.load(tmp_path / "initial.pt")
    assert (out / "model.safetensors").is_file() and not list(out.glob("pytorch_model_fsdp*"))
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert_same_weights(model, {k: trained[k] for k in model.state_dict()})
    own_class = SentenceOPTForCausalLM if backbone == "opt" else SentenceLMForCausalLM
    assert type(model) is own_class
    assert_same_weights(own_class.from_pretrained(out), model)
    # It trained: the weights moved away from where they started, in the backbone and the SentenceVAE.
    moved = {k for k in initial if not torch.equal(initial[k], trained[k])}
    assert any(k.startswith(layer) for k in moved), moved
    assert any(k.startswith("model.sentence_vae.encoder.layers.") for k in moved), moved

    # Same outputs as the gathered trained weights put into a model built from the saved config.
    gathered = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out)).eval()
    missing, unexpected = gathered.load_state_dict(trained, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(default_corpus()[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected, got = gathered(**batch, labels=batch["input_ids"]), model(**batch, labels=batch["input_ids"])
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=0)
    start = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out)).eval()
    start.load_state_dict(initial, strict=False)
    with torch.no_grad():
        assert not torch.equal(start(**batch, labels=batch["input_ids"]).loss, got.loss)
    # The training script's held-out evaluation ran on the sharded model too, and reached the model card.
    assert "held-out perplexity" in (out / "README.md").read_text()


def test_readme_documents_the_fsdp_launch():
    """README's FSDP command names the flags this test launches with."""
    readme = (REPO / "README.md").read_text()
    at = readme.index("accelerate launch --use_fsdp")
    command = readme[at : readme.index("```", at)]
    for flag in FSDP_FLAGS[1:]:
        assert flag in command, flag
