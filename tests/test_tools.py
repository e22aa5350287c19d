"""The tools users evaluate and fine-tune causal LMs with, pointed at a SentenceLM as a user would:
lm-evaluation-harness (``--model hf``) on the local tasks of tests/lm_eval_tasks (word perplexity
by ``loglikelihood_rolling``, ``multiple_choice``, ``generate_until``), and TRL's ``SFTTrainer``
through the small subclass the README documents (the model's own loss instead of TRL's fused
LM head, which needs one hidden state per token). PEFT LoRA is tested in
test_sentence_lm_integrations.py. Offline, tiny models, CPU."""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import sentence_lm  # noqa: F401  (registers the Auto classes lm-eval and TRL load through)
from helpers import assert_same_weights, tiny_sentence_opt

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "lm_eval_tasks"  # the YAMLs name their data relative to the repository root

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def in_repo_root():
    old = os.getcwd()
    os.chdir(ROOT)
    try:
        yield
    finally:
        os.chdir(old)


# ------------------------------------------------------------------ lm-evaluation-harness


@pytest.fixture(scope="module")
def checkpoint(tokenizer, tmp_path_factory):
    """A tiny SentenceOPT, trained for a few seconds on the built-in corpus (so that its scores mean
    something), saved with its tokenizer, loadable by AutoModelForCausalLM/AutoTokenizer."""
    from sentence_lm.corpus import default_corpus

    path = tmp_path_factory.mktemp("lm_eval_ckpt")
    model = tiny_sentence_opt(tokenizer).train()
    texts = default_corpus()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        pick = torch.randint(len(texts), (8,), generator=generator).tolist()
        batch = tokenizer([texts[i] for i in pick], padding=True, truncation=True, max_length=60,
                          return_tensors="pt", return_sentence_ids=False)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


LM_EVAL_TASKS = ["sentence_lm_ppl", "sentence_lm_mc", "sentence_lm_gen"]


def run_lm_eval(checkpoint, batch_size):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    with in_repo_root():
        return lm_eval.simple_evaluate(
            model="hf",
            # max_length: lm-eval would otherwise read max_position_embeddings (sentences, not tokens);
            # add_bos_token=False: lm-eval puts the BOS in front itself (as the rolling prefix)
            model_args=f"pretrained={checkpoint},dtype=float32,max_length=1024,add_bos_token=False",
            tasks=LM_EVAL_TASKS,
            batch_size=batch_size,
            device="cpu",
            task_manager=TaskManager(include_path=str(TASKS)),
            log_samples=True,
        )


@pytest.fixture(scope="module")
def lm_eval_runs(checkpoint):
    return {bs: run_lm_eval(checkpoint, bs) for bs in (1, 4)}


def _responses(run, task):
    """Per document, the numbers lm-eval got from the model (log-likelihoods or generated text)."""
    out = []
    for sample in sorted(run["samples"][task], key=lambda s: s["doc_id"]):
        resps = [r[0] for r in sample["resps"]]
        out.append([r[0] if isinstance(r, (tuple, list)) else r for r in resps])
    return out


def test_lm_eval_tasks_run(lm_eval_runs):
    for run in lm_eval_runs.values():
        res = run["results"]
        assert set(LM_EVAL_TASKS) <= set(res)
        assert math.isfinite(res["sentence_lm_ppl"]["word_perplexity,none"])
        assert 0.0 <= res["sentence_lm_mc"]["acc,none"] <= 1.0
        gens = _responses(run, "sentence_lm_gen")
        assert len(gens) == 2 and all(isinstance(g[0], str) and "\n" not in g[0] for g in gens)


def test_lm_eval_scores_independent_of_batch_size(lm_eval_runs):
    one, four = lm_eval_runs[1], lm_eval_runs[4]
    for task in ("sentence_lm_ppl", "sentence_lm_mc"):
        a, b = _responses(one, task), _responses(four, task)
        assert torch.allclose(torch.tensor(sum(a, [])), torch.tensor(sum(b, [])), rtol=1e-5, atol=1e-4), task
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert one["results"]["sentence_lm_ppl"][metric] == pytest.approx(
            four["results"]["sentence_lm_ppl"][metric], rel=1e-5
        )
    assert one["results"]["sentence_lm_mc"]["acc,none"] == four["results"]["sentence_lm_mc"]["acc,none"]
    assert _responses(one, "sentence_lm_gen") == _responses(four, "sentence_lm_gen")


def test_lm_eval_word_perplexity_is_the_models_causal_scores(lm_eval_runs, checkpoint):
    """lm-eval's word perplexity is exp(-sum of log_softmax(logits) over the text's tokens / words),
    the text scored after BOS: it sees the model's causal scores faithfully. Printed next to the
    model's own exp(nll / words) (which also counts the end of the text)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    tok = AutoTokenizer.from_pretrained(checkpoint)
    texts = [json.loads(line)["text"] for line in (TASKS / "data" / "ppl.jsonl").read_text().splitlines()]
    ll_direct, nll_own, words = [], 0.0, 0
    for text in texts:
        ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model(input_ids=ids, labels=ids)
        logp = out.logits[0, :-1].float().log_softmax(-1).gather(-1, ids[0, 1:, None])
        ll_direct.append(logp.sum().item())
        nll_own += float(out.nll.sum())
        words += len(text.split())
    expected = math.exp(-sum(ll_direct) / words)
    ppl = {bs: run["results"]["sentence_lm_ppl"]["word_perplexity,none"] for bs, run in lm_eval_runs.items()}
    own = math.exp(nll_own / words)
    print(f"\nlm-eval word perplexity: batch 1 {ppl[1]:.10g}, batch 4 {ppl[4]:.10g}; "
          f"from the logits directly {expected:.10g}; the model's own exp(nll/words) {own:.10g}")
    for bs in (1, 4):
        assert torch.allclose(torch.tensor(_responses(lm_eval_runs[bs], "sentence_lm_ppl")).flatten(),
                              torch.tensor(ll_direct, dtype=torch.float64).float(), rtol=1e-5, atol=1e-3)
        assert ppl[bs] == pytest.approx(expected, rel=1e-4)
    assert math.isfinite(own)


# ------------------------------------------------------------------ TRL


def sentence_lm_sft_trainer_class():
    """The package's SFTTrainer: the model's own loss from ``labels`` (-100 = no loss)."""
    from sentence_lm.trl_sft import SentenceLMSFTTrainer

    return SentenceLMSFTTrainer


def test_plain_sft_trainer_is_refused_when_built_and_ours_keeps_the_forward(tokenizer, tmp_path):
    """TRL's own SFTTrainer would swap in a fused LM head over per-token backbone states, which a
    SentenceLM lacks: building it raises a TypeError naming the supported trainer, before any
    cryptic shape error; SentenceLMSFTTrainer builds on the same arguments and leaves forward as it is."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_list([{"prompt": "What is returned?", "completion": " The value is returned."}] * 2)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                     save_strategy="no", use_cpu=True, bf16=False)  # fmt: skip
    model = tiny_sentence_opt(tokenizer).train()
    with pytest.raises(TypeError, match="SentenceLMSFTTrainer"):
        SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    assert "forward" not in vars(model)
    sentence_lm_sft_trainer_class()(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    assert "forward" not in vars(model)


def test_sft_trainer_with_gradient_accumulation_takes_the_full_batch_step(tokenizer, tmp_path):
    """Two accumulated batches of 2 move the weights as one batch of 4 (the loss is divided by the
    labelled tokens of both, num_items_in_batch, not averaged per batch). Plain SGD without
    clipping, so that the size of the gradient shows (Adam's first step and clipping hide it)."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig

    pairs = [("What is returned?", " The value is returned. It is kept."), ("Where?", " Here."),
             ("Who is it?", " It is the list of all the names."), ("Why?", " It helps.")]  # fmt: skip
    data = Dataset.from_list([{"prompt": p, "completion": c} for p, c in pairs])
    weights = []
    for batch, steps in ((4, 1), (2, 2)):
        args = SFTConfig(output_dir=str(tmp_path / str(batch)), max_steps=1, per_device_train_batch_size=batch,
                         gradient_accumulation_steps=steps, learning_rate=1.0, optim="sgd", max_grad_norm=0.0, completion_only_loss=True,
                         report_to=[], save_strategy="no", use_cpu=True, bf16=False, seed=0,
                         dataloader_drop_last=False, shuffle_dataset=False)  # fmt: skip
        model = tiny_sentence_opt(tokenizer).train()
        trainer = sentence_lm_sft_trainer_class()(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        trainer.get_train_dataloader = lambda trainer=trainer: torch.utils.data.DataLoader(
            trainer.train_dataset, batch_size=trainer.args.per_device_train_batch_size, shuffle=False,
            collate_fn=trainer.data_collator,
        )  # fmt: skip
        trainer.train()
        weights.append(model.stop_head.weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-4, atol=1e-6)


def test_trl_sft_trainer_completion_only(tokenizer, tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    base = sentence_lm_sft_trainer_class()
    batches = []

    class Recording(base):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            batches.append(({k: v.detach().clone() for k, v in inputs.items()}, float(loss)))
            return loss

    pairs = [("What is returned?", " The value is returned."), ("Where is the list?", " The list is kept here.")]
    data = Dataset.from_list([{"prompt": p, "completion": c} for p, c in pairs] * 4)
    model = tiny_sentence_opt(tokenizer).train()
    args = SFTConfig(
        output_dir=str(tmp_path / "sft"), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=1, completion_only_loss=True, report_to=[], save_strategy="no", use_cpu=True,
        bf16=False, seed=0,  # SFTConfig defaults to bf16 autocast; fp32 here so the reload compares exactly
    )
    trainer = Recording(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()

    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 6 and losses[-1] < losses[0] * 0.8, losses

    # prompt tokens are out of the loss: -100 on every prompt token, the completion labelled
    batch, _ = batches[0]
    for row_ids, row_labels, row_mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        ids = row_ids[row_mask.bool()].tolist()
        labels = row_labels[row_mask.bool()].tolist()
        for prompt, completion in pairs:
            n_prompt = len(tokenizer(prompt)["input_ids"])  # BOS + prompt tokens
            if ids[:n_prompt] == tokenizer(prompt)["input_ids"] and len(ids) > n_prompt:
                break
        else:
            raise AssertionError(f"no prompt matches {ids}")
        assert labels[:n_prompt] == [-100] * n_prompt
        assert labels[n_prompt:] == ids[n_prompt:]
        assert (row_labels[~row_mask.bool()] == -100).all()
    # the trainer's loss is the model's own loss on those labels, which differs from the full-text loss
    model.eval()
    with torch.no_grad():
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        masked = model(**inputs, labels=batch["labels"]).loss
        full = model(**inputs, labels=torch.where(batch["attention_mask"].bool(), batch["input_ids"], -100)).loss
    assert not torch.isclose(masked, full)

    trainer.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    assert type(reloaded).__name__ == type(model).__name__
    with torch.no_grad():
        a = model(**inputs).logits
        b = reloaded(**inputs).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_trl_appends_the_eos_and_the_model_reads_it_as_the_end_of_the_text(tokenizer, tmp_path):
    """SFTTrainer appends the tokenizer's EOS (here ``</s>``, the same id as the BOS, as in OPT) to
    every completion and labels it. The model takes it as the end of the text, not as a one-token
    sentence: the same NLL as the text without it (the stop decision after the completion is
    STOP), and the same loss terms with the EOS's label counted as one item."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig

    assert tokenizer.eos_token_id == tokenizer.bos_token_id
    pairs = [("What is returned?", " The value is returned."), ("Where is the list?", " The list is kept. It is here.")]
    data = Dataset.from_list([{"prompt": p, "completion": c} for p, c in pairs])
    args = SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=2, completion_only_loss=True,
                     report_to=[], save_strategy="no", use_cpu=True, bf16=False)  # fmt: skip
    model = tiny_sentence_opt(tokenizer)
    trainer = sentence_lm_sft_trainer_class()(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    last = mask.sum(1) - 1  # right padding
    rows = torch.arange(len(ids))
    assert (ids[rows, last] == tokenizer.eos_token_id).all() and (labels[rows, last] == tokenizer.eos_token_id).all()
    without = mask.clone()
    without[rows, last] = 0
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        ref = model(input_ids=ids, attention_mask=without, labels=labels.masked_fill(without == 0, -100))
    torch.testing.assert_close(out.nll, ref.nll)
    assert out.num_tokens.tolist() == ref.num_tokens.tolist()
    items = int((labels[:, 1:] != -100).sum())  # as the Trainer counts them: the EOS labels included
    torch.testing.assert_close(out.loss * items, ref.loss * (items - len(ids)))


def test_readme_lm_eval_command_runs(checkpoint, lm_eval_runs):
    """The README's `lm_eval` command, as written (its checkpoint path swapped for the test's), in a
    fresh process that never imports sentence_lm: the checkpoint loads through its saved code."""
    import re
    import shlex
    import shutil
    import subprocess
    import sys

    from test_readme import shell_commands

    commands = [argv for _, argv in shell_commands() if argv[0] == "lm_eval"]
    assert len(commands) == 1
    exe = shutil.which("lm_eval")
    argv = [exe] if exe else [sys.executable, "-m", "lm_eval"]
    argv += [arg.replace("runs/my-sentence-lm", str(checkpoint)) for arg in commands[0][1:]]
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{shlex.join(argv)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    match = re.search(r"\|\s*word_perplexity\s*\|[^|]*\|\s*([0-9.eE+]+)\s*\|", done.stdout)
    assert match, done.stdout[-3000:]
    expected = lm_eval_runs[1]["results"]["sentence_lm_ppl"]["word_perplexity,none"]
    assert float(match.group(1)) == pytest.approx(expected, rel=1e-6)


def test_trl_sft_trainer_with_peft_lora(tokenizer, tmp_path):
    """The same subclass with `peft_config`: LoRA on the backbone's attention (by path, as in the
    README), only the adapter trains, the adapter saves and loads back onto a fresh base."""
    pytest.importorskip("trl")
    peft = pytest.importorskip("peft")
    from datasets import Dataset
    from trl import SFTConfig

    model = tiny_sentence_opt(tokenizer).train()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    data = Dataset.from_list([{"prompt": "What is returned?", "completion": " The value is returned."}] * 8)
    lora = peft.LoraConfig(r=4, target_modules=r".*backbone\.(decoder\.)?layers\.\d+\.self_attn\.(q_proj|v_proj)",
                           task_type="CAUSAL_LM")
    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                     logging_steps=1, completion_only_loss=True, report_to=[], save_strategy="no", use_cpu=True,
                     bf16=False, seed=0)
    trainer = sentence_lm_sft_trainer_class()(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                              peft_config=lora)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[-1] < losses[0], losses
    trained = trainer.model
    assert isinstance(trained, peft.PeftModel)
    base = trained.get_base_model().state_dict()
    # Adapter only: without the LoRA matrices (and with PEFT's base_layer wrappers unwrapped),
    # the base model holds the weights it started with, every one of them.
    unwrapped = {k.replace(".base_layer.", "."): v for k, v in base.items() if "lora_" not in k}
    assert_same_weights(unwrapped, frozen)
    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = peft.PeftModel.from_pretrained(tiny_sentence_opt(tokenizer), tmp_path / "adapter").eval()
    trained.eval()
    ids = tokenizer(["What is returned? The value is returned."], return_tensors="pt", return_sentence_ids=False)
    with torch.no_grad():
        assert torch.allclose(trained(**ids).logits, reloaded(**ids).logits, atol=1e-5)


def test_trl_packing_scores_each_packed_text_on_its_own(tokenizer, tmp_path):
    """SFTTrainer(packing=True) packs texts padding-free, with position_ids restarting at each text;
    the README's subclass passes them on and the model scores every text as a row of its own."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig

    texts = ["The value is returned. It is kept.", "Where is the list? It is here.", "One more text is here."]
    data = Dataset.from_list([{"text": t} for t in texts])
    args = SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=3, packing=True, max_length=64,
                     report_to=[], save_strategy="no", use_cpu=True, bf16=False)  # fmt: skip
    model = tiny_sentence_opt(tokenizer)
    trainer = sentence_lm_sft_trainer_class()(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    starts = torch.nonzero(batch["position_ids"][0] == 0).flatten().tolist()
    assert batch["input_ids"].shape[0] == 1 and len(starts) == len(texts)  # one row holding every text
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        packed = model(**{k: v for k, v in batch.items() if k != "labels"})
        ends = starts[1:] + [batch["input_ids"].shape[1]]
        pieces = [batch["input_ids"][:, a:b] for a, b in zip(starts, ends)]
        alone = [model(piece, labels=batch["labels"][:, a:b]) for piece, a, b in zip(pieces, starts, ends)]
    torch.testing.assert_close(packed.nll[0], sum(a.nll[0] for a in alone))
    items = [int((batch["labels"][:, a + 1 : b] != -100).sum()) for a, b in zip(starts, ends)]
    torch.testing.assert_close(loss, sum(a.loss * n for a, n in zip(alone, items)) / sum(items))
