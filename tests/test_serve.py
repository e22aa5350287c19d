"""`transformers serve` runs a SentenceLM: ``python -m sentence_lm.serve MODEL`` (sentence_lm/serve.py).

A live server on localhost, started and stopped here, serves a tiny SentenceLM on a Llama
backbone (the generic ``SentenceLMForCausalLM``; a tiny SentenceOPT is served by the slow test of
its own): ``/v1/completions`` and ``/v1/chat/completions`` through the ``openai`` client, streaming
and not, several requests at once, each answer the text the model's own greedy ``generate()``
writes; and ``transformers chat`` against it. Nothing is downloaded: the checkpoints are written
here and the server runs offline."""

from __future__ import annotations

import copy
import json
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers import BLOCKER_SOURCE, backbone_configs, isolated_env, tiny_sentence_opt
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from sentence_lm import SentenceLMForCausalLM

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
STARTUP_SECONDS = 180  # two fresh Pythons import torch and transformers (about 25 s on 2 cores)
MAX_TOKENS = 12


def save_checkpoint(model, tokenizer, path: Path) -> str:
    """``model`` and ``tokenizer`` (with a chat template) saved to ``path``, as a user's checkpoint."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    model.tokenizer = tokenizer
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def tiny_llama_sentence_lm(tokenizer):
    """A tiny random SentenceLM on a tiny Llama (stop head biased to go on)."""
    config = backbone_configs(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(0)
    llama = AutoModelForCausalLM.from_config(config["llama"])
    model = SentenceLMForCausalLM.from_pretrained_backbone(
        llama, tokenizer=tokenizer, sentence_vae_config=dict(max_sentence_len=tokenizer.max_sentence_len)
    ).eval()
    with torch.no_grad():
        model.stop_head.bias.copy_(torch.tensor([3.0, -3.0]))
    return model


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``python -m sentence_lm.serve MODEL`` in a subprocess on a free localhost port, offline."""

    def __init__(self, model: str, workdir: Path, launcher: tuple = ("sentence_lm.serve",), env: dict | None = None):
        self.model, self.port = model, free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"serve_{self.port}.log"
        self.env = isolated_env(workdir, {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", **(env or {})})
        command = [sys.executable, "-m", *launcher, model, "--device", "cpu"]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(command, cwd=workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        try:
            self.wait_until_healthy()
        except BaseException:
            self.stop()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def wait_until_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited ({self.process.returncode}) while starting:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"the server was not up after {STARTUP_SECONDS} s:\n{self.log()}")

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def stop(self) -> None:
        """SIGTERM (uvicorn shuts down, its model process with it), then SIGKILL if it lingers."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)


@pytest.fixture(scope="module")
def served(tokenizer, tmp_path_factory):
    """A tiny Llama-backbone SentenceLM saved and served; yields the server and the saved model."""
    workdir = tmp_path_factory.mktemp("serve")
    path = save_checkpoint(tiny_llama_sentence_lm(tokenizer), tokenizer, workdir / "sentence-llama")
    server = Server(path, workdir)
    try:
        yield server, AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    finally:
        server.stop()
    assert server.process.returncode is not None


def expected_text(model, tokenizer, prompt: str | None = None, messages: list | None = None) -> str:
    """What the model's own greedy ``generate()`` writes for a prompt or a chat, as serve decodes it."""
    if messages is not None:
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=True, tokenize=True, return_tensors="pt"
        )
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[-1] :], skip_special_tokens=True)


def streamed(text: str) -> str:
    """``text`` as serve streams it: its detokenizer (the Rust tokenizer's ``DecodeStream``) holds
    back the bytes of a character that never completes (random weights write arbitrary bytes),
    where a whole decode ends with U+FFFD."""
    return text.rstrip("\ufffd")


def complete(client, model: str, prompt: str, stream: bool) -> str:
    if not stream:
        response = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS)
        assert response.choices[0].finish_reason in ("stop", "length")
        assert 0 < response.usage.completion_tokens <= MAX_TOKENS
        return response.choices[0].text
    chunks = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, stream=True)
    return "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)


def chat(client, model: str, messages: list, stream: bool, **kwargs) -> str:
    if not stream:
        response = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, **kwargs)
        assert response.choices[0].message.role == "assistant"
        return response.choices[0].message.content
    chunks = client.chat.completions.create(
        model=model, messages=messages, max_tokens=MAX_TOKENS, stream=True, **kwargs
    )
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


PROMPTS = ["The value of the function", "A class definition creates a new object. It", "Hello"]
CHATS = [
    [{"role": "user", "content": "What does a class definition do?"}],
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Name a built-in type."},
    ],
]


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_completions(served, stream):
    server, model, tokenizer = served
    for prompt in PROMPTS[:2]:
        text = complete(server.client(), server.model, prompt, stream)
        expected = expected_text(model, tokenizer, prompt=prompt)
        assert text == (streamed(expected) if stream else expected)
        assert text.strip()


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_chat_completions(served, stream):
    server, model, tokenizer = served
    for messages in CHATS:
        text = chat(server.client(), server.model, messages, stream)
        expected = expected_text(model, tokenizer, messages=messages)
        assert text == (streamed(expected) if stream else expected)
        assert text.strip()


@pytest.mark.slow
def test_sampling_settings_as_transformers_chat_sends_them(served):
    """`transformers chat` streams with a ``generation_config`` JSON (sampling on) and usage."""
    server, _, _ = served
    config = GenerationConfig(do_sample=True, max_new_tokens=MAX_TOKENS, temperature=0.8, top_k=20)
    chunks = server.client().chat.completions.create(
        model=server.model,
        messages=CHATS[0],
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"generation_config": config.to_json_string()},
        seed=0,
    )
    chunks = list(chunks)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    usage = chunks[-1].usage
    assert text.strip() and 0 < usage.completion_tokens <= MAX_TOKENS


@pytest.mark.slow
def test_several_requests_at_once(served):
    """Eight requests in flight together, of both endpoints, streaming and not: each gets the
    answer it gets alone."""
    server, model, tokenizer = served
    jobs = []
    for index in range(8):
        stream = index % 2 == 1
        if index % 4 < 2:
            prompt = PROMPTS[index % len(PROMPTS)]
            jobs.append((complete, prompt, stream, expected_text(model, tokenizer, prompt=prompt)))
        else:
            messages = CHATS[index % len(CHATS)]
            jobs.append((chat, messages, stream, expected_text(model, tokenizer, messages=messages)))
    clients = [server.client() for _ in jobs]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = [
            pool.submit(function, client, server.model, request, stream)
            for client, (function, request, stream, _) in zip(clients, jobs)
        ]
        answers = [future.result(timeout=120) for future in futures]
    assert answers == [streamed(expected) if stream else expected for _, _, stream, expected in jobs]


@pytest.mark.slow
def test_transformers_chat(served, tmp_path):
    """`transformers chat MODEL URL` against the server: one user turn, then it quits."""
    server, _, _ = served
    command = [sys.executable, "-m", "transformers.cli.transformers", "chat", server.model, server.base_url]
    command += [f"max_new_tokens={MAX_TOKENS}", "--user", "tester", "--save-folder", str(tmp_path)]
    result = subprocess.run(
        command,
        input="What does a class definition do?\nn\n!exit\n",
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        # not offline: huggingface_hub's client, which `transformers chat` talks through, would refuse localhost too
        env={**{k: v for k, v in server.env.items() if k != "HF_HUB_OFFLINE"}, "COLUMNS": "200", "TERM": "dumb"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"<{server.model}>:" in output and f"{MAX_TOKENS} tokens in" in output, output


@pytest.mark.slow
def test_sentence_opt_checkpoint(tokenizer, tmp_path):
    """A SentenceOPT (the paper's setting, its own architecture name) serves as well."""
    path = save_checkpoint(tiny_sentence_opt(tokenizer), tokenizer, tmp_path / "sentence-opt")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    server = Server(path, tmp_path)
    try:
        client = server.client()
        expected = streamed(expected_text(model, tokenizer, prompt=PROMPTS[0]))
        assert complete(client, path, PROMPTS[0], stream=True) == expected
        assert chat(client, path, CHATS[0], stream=False) == expected_text(model, tokenizer, messages=CHATS[0])
    finally:
        server.stop()


@pytest.mark.slow
def test_plain_transformers_serve_without_the_package(tokenizer, tmp_path):
    """Where sentence_lm cannot be imported, plain `transformers serve --trust-remote-code` serves
    the checkpoint through its saved code once its config.json names no ``architectures``: serve
    then loads it with ``AutoModelForCausalLM`` (its ``auto_map``) instead of looking the class up
    among transformers' own."""
    path = save_checkpoint(tiny_llama_sentence_lm(tokenizer), tokenizer, tmp_path / "sentence-llama")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    config = json.loads((Path(path) / "config.json").read_text())
    del config["architectures"]
    (Path(path) / "config.json").write_text(json.dumps(config, indent=2))
    blocker = tmp_path / "_blocked_packages" / "sentence_lm"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text(BLOCKER_SOURCE)
    launcher = ("transformers.cli.transformers", "serve", "--trust-remote-code")
    server = Server(path, tmp_path, launcher=launcher, env={"PYTHONPATH": str(blocker.parent)})
    try:
        client = server.client()
        assert complete(client, path, PROMPTS[0], stream=False) == expected_text(model, tokenizer, prompt=PROMPTS[0])
        expected = streamed(expected_text(model, tokenizer, messages=CHATS[0]))
        assert chat(client, path, CHATS[0], stream=True) == expected
    finally:
        server.stop()
    assert "sentence_lm is blocked" not in server.log()


def test_serve_finds_the_classes(tokenizer, tmp_path):
    """The lookup of serve's model loader finds the SentenceLM classes once sentence_lm.serve is
    imported (no server: its loader, in this process)."""
    import sentence_lm.serve  # noqa: F401
    from transformers.cli.serving.model_manager import ModelLoader

    path = save_checkpoint(tiny_sentence_opt(tokenizer), tokenizer, tmp_path / "sentence-opt")
    model, processor = ModelLoader(device="cpu").load_model_and_processor(path)
    assert type(model).__name__ == "SentenceOPTForCausalLM"
    assert processor.chat_template == CHAT_TEMPLATE


def test_continuous_batching_is_refused():
    from sentence_lm.serve import main

    with pytest.raises(SystemExit, match="continuous-batching is not supported"):
        main(["some/model", "--continuous-batching"])
