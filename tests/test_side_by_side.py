"""benchmarks/side_by_side.py on tiny saved models: one table per prompt, every model's greedy
and sampled continuation, prompts made of whole sentences from the text file."""


import pytest
import torch
from helpers import backbone_configs, load_script
from transformers import AutoModelForCausalLM

from sentence_lm import SentenceLMForCausalLM, default_corpus


@pytest.fixture(scope="module")
def side_by_side():
    return load_script("benchmarks/side_by_side.py")


def test_tables_hold_every_models_continuations(side_by_side, tokenizer, tmp_path):
    config = backbone_configs(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)["llama"]
    torch.manual_seed(0)
    token_model = AutoModelForCausalLM.from_config(config).eval()
    token_model.save_pretrained(tmp_path / "token")
    tokenizer.save_pretrained(tmp_path / "token")
    SentenceLMForCausalLM.from_pretrained_backbone(token_model, tokenizer=tokenizer).save_pretrained(tmp_path / "slm")
    text = tmp_path / "text.txt"
    text.write_text("= A heading =\n\n" + "\n\n".join(default_corpus()[:40]))

    markdown = side_by_side.main([
        "--checkpoint", str(tmp_path / "slm"), "--token_model", f"token model={tmp_path / 'token'}",
        "--text", str(text), "--num_prompts", "2", "--min_words", "8", "--new_tokens", "6",
        "--out", str(tmp_path / "side.md"),
    ])  # fmt: skip
    assert (tmp_path / "side.md").read_text() == markdown
    sections = markdown.split("## Prompt ")[1:]
    assert len(sections) == 2
    for section in sections:
        prompt = section.split("\n> ", 1)[1].split("\n", 1)[0]
        assert len(prompt.split()) >= 8 and prompt[-1] in ".!?:" and "heading" not in prompt
        rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line][1:]
        assert [row.split(" | ")[0] for row in rows] == ["| SentenceLM", "| token model"]
        for row in rows:
            greedy, sampled = row.split(" | ")[1:3]
            assert greedy.strip() and sampled.strip()
    summary = markdown.split("## Prompt ")[0]
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in summary.splitlines() if line.startswith("| ")}
    for label in ("SentenceLM", "token model"):  # distinct-2 and repetition, greedy and sampled
        assert len(rows[label]) == 4 and all(0.0 <= float(value.strip(" |")) <= 1.0 for value in rows[label])
    # Prompts that a text cannot give are refused.
    with pytest.raises(SystemExit, match="paragraphs"):
        side_by_side.main(["--checkpoint", str(tmp_path / "slm"), "--text", str(text), "--num_prompts", "1000",
                           "--out", str(tmp_path / "x.md")])  # fmt: skip


def test_distinct_n_and_repetition_measure_loops(side_by_side):
    assert side_by_side.distinct_n(["a b c d", "e f"], 2) == 1.0
    assert side_by_side.distinct_n(["a b a b a b"], 2) == pytest.approx(2 / 5)
    assert side_by_side.distinct_n(["one"], 2) == 0.0
    assert side_by_side.repetition("the cat sat on the mat today", 4) == 0.0
    loop = "== = == = == = == = == ="
    assert side_by_side.repetition(loop, 4) == pytest.approx(1 - 2 / 7)  # ten words, seven 4-grams, two of them different
    assert side_by_side.repetition("The Cat sat the cat SAT", 3) == pytest.approx(1 / 4)
