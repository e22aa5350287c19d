"""Packaging of sentence_lm: a Hugging Face `transformers` plugin for SentenceVAE and
sentence-level language models (next-sentence prediction)."""

from setuptools import find_packages, setup

setup(
    name="sentence_lm",
    version="0.1.0",
    description="SentenceVAE and sentence-level LLMs (next-sentence prediction) for Hugging Face transformers",
    packages=find_packages(include=["sentence_lm", "sentence_lm.*"]),
    # The model-card template (a link to the repository's MODEL_CARD.md) ships with the package.
    package_data={"sentence_lm": ["MODEL_CARD.md"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "safetensors",
        "huggingface-hub",
        "accelerate",
        "tokenizers",
        "datasets",
        "tqdm",
        "jinja2",
    ],
    extras_require={
        # matplotlib: the benchmark test draws its plots; peft: LoRA on a SentenceLM (test_sentence_lm_integrations);
        # gguf: GGUF files are read (and, in a test, written) with it; lm-eval, trl: test_tools runs
        # lm-evaluation-harness and TRL's SFTTrainer on a tiny SentenceLM; fastapi, uvicorn, openai:
        # test_serve runs `transformers serve` (python -m sentence_lm.serve) and its OpenAI client
        "test": ["pytest", "hypothesis", "matplotlib", "peft", "gguf", "lm-eval>=0.4.13", "trl>=1.16", "markdown-it-py",
                 "fastapi", "uvicorn", "openai>=1.98.0"],
        "serve": ["fastapi", "uvicorn", "openai>=1.98.0"],
        "gguf": ["gguf"],
        "plots": ["matplotlib"],
    },
)
