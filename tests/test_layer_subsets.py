"""benchmarks/layer_subsets.py: the token model on some of its layers, after W tokens of context,
checked against the token model itself on a tiny Llama saved here."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_script
from test_smollm2_script import tiny_llama
from transformers import AutoModelForCausalLM

from sentence_lm.corpus import default_corpus


@pytest.fixture(scope="module")
def script():
    return load_script("benchmarks/layer_subsets.py")


def test_layer_specs(script):
    assert script.layer_indices("all", 4) == [0, 1, 2, 3]
    assert script.layer_indices("first2", 30) == [0, 1] and script.layer_indices("last3", 30) == [27, 28, 29]
    assert script.layer_indices("0,1,24-26", 30) == [0, 1, 24, 25, 26]
    assert script.parse_spec("last2:16:bos", 4) == ([2, 3], 16, True)
    for bad in ("all", "all:x", "all:4:eos", "0,9:4"):
        with pytest.raises(SystemExit):
            script.parse_spec(bad, 4)


def test_all_layers_score_as_the_token_model(script, tokenizer, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(p for p in default_corpus() if p.strip()), encoding="utf-8")
    tiny_llama(tmp_path / "tiny", tokenizer)
    report = script.main(["--model", str(tmp_path / "tiny"), "--text", str(text), "--paragraphs", "6", "--sentences", "12",
                          "--block_size", "64", "--max_sentence_len", "16", "--batch_size", "5",
                          "--specs", "all:0;all:6;all:6:bos;last1:6", "--json", str(tmp_path / "out.json")])  # fmt: skip
    results = report["results"]
    assert json.loads((tmp_path / "out.json").read_text())["results"] == results
    # The whole model after 6 context tokens, one text at a time, as the script scores it.
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny").eval()
    pairs = script.selection_sentences(tokenizer, str(text), 6, 12, 64, 16)
    assert len(pairs) == report["sentences"] and any(len(before) > 6 for before, _ in pairs)
    total = count = 0.0
    with torch.no_grad():
        for before, sentence in pairs:
            head = before[-6:] or [tokenizer.bos_token_id]
            ids = torch.tensor([head + sentence])
            log_probs = torch.log_softmax(model(ids).logits[0, :-1], dim=-1)
            targets = ids[0, len(head):]
            total -= float(log_probs[len(head) - 1 :].gather(1, targets[:, None]).sum())
            count += len(sentence)
    assert results["all:6"]["nll"] == pytest.approx(total / count, rel=1e-4)
    assert results["all:6"]["nll"] != pytest.approx(results["all:6:bos"]["nll"], rel=1e-4)
    assert results["last1:6"]["layers"] == [1] and results["last1:6"]["nll"] != pytest.approx(results["all:6"]["nll"], rel=1e-6)
