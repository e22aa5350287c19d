"""Reusable test helpers: the tiny SentenceOPT that the end-to-end tests share
(:func:`tiny_sentence_opt`) and the tokenizer call that feeds it (:func:`encode`); the
comparison of two models' weights, key sets first (:func:`assert_same_weights`); tiny token
model configs of each backbone family (:func:`backbone_configs`); for checkpoint
tests, running code in a fresh Python where ``sentence_lm`` cannot be imported, and laying a
checkpoint out as a Hugging Face hub cache entry."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from transformers import (
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PhiConfig,
    Qwen2Config,
)

TINY_HIDDEN = 32  # the width of tiny_sentence_opt's SentenceVAE and backbone
WIDTH, HEADS = 32, 4  # the tiny token models of backbone_configs


def tiny_sentence_opt(tokenizer, seed: int = 0, *, sentence_vae: dict | None = None, **config_overrides):
    """A tiny random ``SentenceOPTForCausalLM`` over ``tokenizer`` (the session ``tokenizer``
    fixture of conftest.py), in eval mode, ready for text in and text out.

    SentenceVAE and backbone: width 32, 4 heads, ffn 64, no dropout; the SentenceVAE has the
    tokenizer's vocabulary and ``max_sentence_len`` and ``init_std=0.3`` (larger random weights,
    so that greedy choices vary along a sentence); one backbone layer over 64 sentence slots. The
    boundary table comes from ``tokenizer``, which is attached as ``model.tokenizer`` (saved with
    the model), and the stop head is biased towards "go on" (random weights would often end a text
    at once). ``sentence_vae`` overrides SentenceVAE fields; ``config_overrides`` override
    SentenceOPTConfig fields (``num_hidden_layers``, ``max_position_embeddings``, ...). The
    weights depend only on ``seed`` and the config."""
    from sentence_lm import SentenceOPTConfig, SentenceOPTForCausalLM

    vae = dict(
        vocab_size=len(tokenizer),
        hidden_size=TINY_HIDDEN,
        num_attention_heads=4,
        ffn_dim=64,
        max_sentence_len=tokenizer.max_sentence_len,
        init_std=0.3,
        dropout=0.0,
    )
    vae.update(sentence_vae or {})
    fields = dict(
        hidden_size=TINY_HIDDEN,
        num_attention_heads=4,
        ffn_dim=64,
        num_hidden_layers=1,
        max_position_embeddings=64,
        dropout=0.0,
    )
    fields.update(config_overrides)
    torch.manual_seed(seed)
    model = SentenceOPTForCausalLM(SentenceOPTConfig(sentence_vae=vae, **fields)).eval()
    model.sentence_vae.set_boundary_table(tokenizer)
    with torch.no_grad():  # random weights would often end a text at once; make texts run on
        model.stop_head.bias.copy_(torch.tensor([3.0, -3.0]))
    model.tokenizer = tokenizer
    return model


def assert_same_weights(first, second, *, rtol: float | None = None, atol: float | None = None, close: bool = False):
    """Assert that two sets of weights hold the same names and, name by name, the same tensors.

    ``first`` and ``second`` are modules (their ``state_dict()`` is compared) or mappings of name
    to tensor (``dict(model.named_parameters())``, a saved copy of a state dict, ...). The key
    sets are compared first, so that a name missing on one side fails instead of being skipped
    (as a ``zip`` over two ``state_dict()``s would skip it); then each tensor, with a message
    naming its key: exactly (``torch.equal``, same shape and dtype) by default, or with
    ``torch.testing.assert_close`` when ``close`` is true or ``rtol``/``atol`` are given."""
    first, second = (w.state_dict() if isinstance(w, torch.nn.Module) else dict(w) for w in (first, second))
    only_first, only_second = sorted(set(first) - set(second)), sorted(set(second) - set(first))
    assert not only_first and not only_second, (
        f"the key sets differ: only in the first {only_first}, only in the second {only_second}"
    )
    close = close or rtol is not None or atol is not None
    for name, a in first.items():
        b = second[name]
        if close:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
        else:
            assert a.shape == b.shape and a.dtype == b.dtype, f"{name}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
            assert torch.equal(a, b), f"{name}: the values differ"


def encode(tokenizer, texts, side: str = "left", **kwargs) -> dict:
    """What a user feeds the model: the tokenizer's tensors for ``texts``, padded on ``side``
    (``sentence_ids`` included, which the model accepts too)."""
    return dict(tokenizer(texts, padding=True, padding_side=side, return_tensors="pt", **kwargs))

BLOCKER_SOURCE = 'raise ImportError("sentence_lm is blocked in this test process")\n'

PRELUDE = textwrap.dedent(
    """\
    try:
        import sentence_lm  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("sentence_lm could be imported; the test process must not see it")
    """
)


def isolated_env(root: str | os.PathLike, env: dict | None = None) -> dict:
    """A copy of ``os.environ`` with Hugging Face caches under ``root`` (so that remote code and
    downloads never touch the user's cache), quiet logging, then ``env`` on top."""
    root = Path(root)
    full = dict(os.environ)
    full.update(
        {
            "HF_HOME": str(root / "hf_home"),
            "HF_MODULES_CACHE": str(root / "hf_home" / "modules"),
            "TRANSFORMERS_VERBOSITY": "error",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    full.update(env or {})
    return full


def run_without_package(
    code: str, cwd: str | os.PathLike, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh ``python -c`` whose ``import sentence_lm`` fails.

    A directory holding a ``sentence_lm/__init__.py`` that raises ``ImportError`` is put first
    on ``PYTHONPATH``, so neither the source tree nor an (editable) install can be imported; the
    code is preceded by an assertion that the import indeed fails. ``cwd`` should be a temporary
    directory (not the repository root). Hugging Face caches go under ``cwd`` unless ``env``
    says otherwise. Returns the completed process (stdout/stderr as text); check ``returncode``.
    """
    cwd = Path(cwd)
    blocker = cwd / "_blocked_packages"
    (blocker / "sentence_lm").mkdir(parents=True, exist_ok=True)
    (blocker / "sentence_lm" / "__init__.py").write_text(BLOCKER_SOURCE)
    full_env = isolated_env(cwd, env)
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(blocker), full_env.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check_run(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Assert that a subprocess succeeded, showing its output if not."""
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def make_hub_cache(
    checkpoint_dir: str | os.PathLike,
    cache_root: str | os.PathLike,
    repo_id: str,
    commit: str | None = None,
) -> dict:
    """Lay ``checkpoint_dir`` out in ``cache_root`` as the hub cache does for model ``repo_id``:
    ``models--org--name/blobs/<sha256>``, ``snapshots/<commit>/<file>`` symlinks to the blobs,
    ``refs/main`` holding the commit. Returns the environment to load it by repo id offline:
    ``{"HF_HUB_CACHE": ..., "HF_HUB_OFFLINE": "1"}``.
    """
    commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()
    assert len(commit) == 40
    repo_dir = Path(cache_root) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    blobs = repo_dir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    for src in sorted(Path(checkpoint_dir).rglob("*")):
        if not src.is_file():
            continue
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        blob = blobs / digest
        if not blob.exists():
            shutil.copyfile(src, blob)
        link = snapshot / src.relative_to(checkpoint_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return {"HF_HUB_CACHE": str(cache_root), "HF_HUB_OFFLINE": "1"}


def backbone_configs(vocab_size: int, bos: int, eos: int, pad: int) -> dict:
    """Tiny configs of each family, 2 layers of width 32 (positions count sentence slots)."""
    ids = dict(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    common = dict(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=HEADS, max_position_embeddings=64)
    llama_like = dict(common, intermediate_size=64, num_key_value_heads=2, **ids)
    return {
        "opt": OPTConfig(**common, ffn_dim=64, word_embed_proj_dim=WIDTH, **ids),
        "gpt2": GPT2Config(n_embd=WIDTH, n_layer=2, n_head=HEADS, n_positions=64, **ids),
        "llama": LlamaConfig(**llama_like),
        "qwen2": Qwen2Config(**llama_like),
        "mistral": MistralConfig(**llama_like, head_dim=WIDTH // HEADS),
        "gemma": GemmaConfig(**llama_like, head_dim=WIDTH // HEADS),
        "phi": PhiConfig(**common, intermediate_size=64, **ids),
    }


FAMILIES = ["opt", "gpt2", "llama", "qwen2", "mistral", "gemma", "phi"]


REPO = Path(__file__).resolve().parents[1]


def load_script(relative_path: str):
    """A script of the repository (``benchmarks/...py``, ``examples/...py``) imported as a module."""
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
