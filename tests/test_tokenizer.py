"""SentenceTokenizer: sentence_ids in every output format, padding, saving and loading (also as
remote code in a fresh Python that cannot import sentence_lm), and the trained tokenizer."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, GPT2Tokenizer

from sentence_lm.corpus import default_corpus, group_paragraphs, read_text_lines, split_train_validation
from sentence_lm.tokenization_sentence_lm import SentenceTokenizer, train_sentence_tokenizer

TEXTS = ['He said, "Hello there." Then he left.', "Short one!", "", "No punctuation here at all"]


def expected_sentence_ids(tokenizer, ids: list[int]) -> list[int]:
    return tokenizer.segment(torch.tensor([ids], dtype=torch.long))[0].tolist() if ids else []


# ----------------------------------------------------------------------------- outputs


def test_single_text(tokenizer):
    encoding = tokenizer(TEXTS[0])
    ids = encoding["input_ids"]
    assert set(encoding) == {"input_ids", "attention_mask", "sentence_ids"}
    assert ids[0] == tokenizer.bos_token_id == 2
    assert encoding["sentence_ids"][0] == -1  # the BOS belongs to no sentence
    assert encoding["sentence_ids"][1] == 0
    sentences = [
        tokenizer.decode([i for i, s in zip(ids, encoding["sentence_ids"]) if s == k]) for k in range(3)
    ]
    assert sentences == ["He said,", ' "Hello there."', " Then he left."]
    assert max(encoding["sentence_ids"]) == 2
    assert encoding["sentence_ids"] == expected_sentence_ids(tokenizer, ids)


def test_batch_lists_without_padding(tokenizer):
    batch = tokenizer(TEXTS)
    assert len(batch["sentence_ids"]) == len(TEXTS)
    for ids, sentence_ids in zip(batch["input_ids"], batch["sentence_ids"]):
        assert len(sentence_ids) == len(ids)
        assert sentence_ids == expected_sentence_ids(tokenizer, ids)
    assert batch["sentence_ids"][2] == [-1]  # empty text: only the BOS


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("return_tensors", ["pt", "np", None])
def test_padded_batch(tokenizer, side, return_tensors):
    plain = tokenizer(TEXTS)
    batch = tokenizer(TEXTS, padding=True, padding_side=side, return_tensors=return_tensors)
    sentence_ids = batch["sentence_ids"]
    if return_tensors == "pt":
        assert isinstance(sentence_ids, torch.Tensor) and sentence_ids.dtype == torch.long
    elif return_tensors == "np":
        assert isinstance(sentence_ids, np.ndarray)
    rows = np.asarray(sentence_ids).tolist()
    mask = np.asarray(batch["attention_mask"]).tolist()
    width = len(rows[0])
    for row, expected, row_mask in zip(rows, plain["sentence_ids"], mask):
        pad = [-1] * (width - len(expected))
        assert row == (pad + expected if side == "left" else expected + pad)
        assert all(s == -1 for s, m in zip(row, row_mask) if not m)


def test_padding_to_max_length_and_truncation(tokenizer):
    batch = tokenizer(TEXTS[:2], padding="max_length", max_length=40, return_tensors="pt")
    assert batch["sentence_ids"].shape == (2, 40)
    truncated = tokenizer(TEXTS[0], truncation=True, max_length=5)
    assert len(truncated["sentence_ids"]) == 5
    assert truncated["sentence_ids"] == expected_sentence_ids(tokenizer, truncated["input_ids"])


def test_special_tokens_in_the_text_are_tokens_of_its_sentences(tokenizer):
    """As a SentenceLM reads a chat template's text: the prepended BOS belongs to no sentence, an EOS
    after text ends a turn (the last token of the sentence it closes: the next token opens one),
    and any other special token (here OPT's unused <s> and a <pad> spelled in the text) is a token."""
    encoding = tokenizer("One. Two</s>three.<pad><s>four")
    tokens = tokenizer.convert_ids_to_tokens(encoding["input_ids"])
    by_sentence = {}
    for token, sentence_id in zip(tokens, encoding["sentence_ids"]):
        by_sentence.setdefault(sentence_id, []).append(token)
    assert by_sentence.pop(-1) == ["</s>"]
    pieces = ["".join(by_sentence[k]) for k in sorted(by_sentence)]
    assert pieces == ["One.Ġ", "Two</s>", "three.", "<pad><s>four"]
    assert {0, 1, 2, 3} <= tokenizer.special_token_ids  # OPT's <s> too, an added special token


def test_return_sentence_ids_can_be_turned_off(tokenizer):
    assert "sentence_ids" not in tokenizer(TEXTS[0], return_sentence_ids=False)
    assert "sentence_ids" not in tokenizer(TEXTS, padding=True, return_tensors="pt", return_sentence_ids=False)
    quiet = copy.deepcopy(tokenizer)
    quiet.return_sentence_ids = False
    assert "sentence_ids" not in quiet(TEXTS[0])
    assert "sentence_ids" in quiet(TEXTS[0], return_sentence_ids=True)
    assert tokenizer.encode(TEXTS[1]) == tokenizer(TEXTS[1])["input_ids"]


def test_empty_text(tokenizer):
    assert tokenizer("", add_special_tokens=False) == {"input_ids": [], "attention_mask": [], "sentence_ids": []}
    batch = tokenizer(["", ""], add_special_tokens=False, return_tensors="pt")
    assert batch["sentence_ids"].shape == (2, 0)


# ----------------------------------------------------------------------------- pad


@pytest.mark.parametrize("side", ["left", "right"])
def test_pad_fills_sentence_ids_with_minus_one(tokenizer, side):
    features = [tokenizer(text) for text in TEXTS]
    padded = tokenizer.pad(features, padding_side=side, return_tensors="pt")
    direct = tokenizer(TEXTS, padding=True, padding_side=side, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "sentence_ids"):
        assert torch.equal(padded[key], direct[key]), key
    # A dict of lists, and padding to a multiple.
    lists = tokenizer.pad(tokenizer(TEXTS), padding_side=side, pad_to_multiple_of=8)
    assert all(len(row) % 8 == 0 for row in lists["sentence_ids"])
    for row, mask in zip(lists["sentence_ids"], lists["attention_mask"]):
        assert all(s == -1 for s, m in zip(row, mask) if not m)
    # One unbatched encoding.
    single = tokenizer.pad(tokenizer(TEXTS[1]), padding="max_length", max_length=12, padding_side=side)
    assert len(single["sentence_ids"]) == 12 and -1 in single["sentence_ids"]


def test_pad_without_sentence_ids_adds_none(tokenizer):
    padded = tokenizer.pad([{"input_ids": [2, 40, 41]}, {"input_ids": [2]}])
    assert "sentence_ids" not in padded


# ----------------------------------------------------------------------------- segment


def test_boundary_table_is_built_once(tokenizer):
    table = tokenizer.boundary_table
    assert table.dtype == torch.uint8 and table.shape == (len(tokenizer),)
    assert tokenizer.boundary_table is table
    grown = copy.deepcopy(tokenizer)
    grown.add_tokens(["<new_token>"])
    assert grown.boundary_table.shape == (len(tokenizer) + 1,)


def test_segment(tokenizer):
    batch = tokenizer(TEXTS, padding=True, padding_side="left", return_tensors="pt")
    got = tokenizer.segment(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(got, batch["sentence_ids"])
    one = tokenizer(TEXTS[0], return_tensors="pt")
    assert torch.equal(tokenizer.segment(one["input_ids"][0]), one["sentence_ids"][0])
    assert tokenizer.segment(one["input_ids"][0].tolist()).tolist() == one["sentence_ids"][0].tolist()
    # A smaller cap can be asked for.
    assert int(torch.bincount(tokenizer.segment(one["input_ids"], max_sentence_len=2)[0] + 1)[1:].max()) <= 2


def test_segment_rejects_bad_input(tokenizer):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.segment(torch.tensor([[5, len(tokenizer) + 3]]))
    with pytest.raises(ValueError, match="attention_mask"):
        tokenizer.segment(torch.tensor([[5, 6, 7]]), torch.ones(1, 2))
    with pytest.raises(TypeError):
        tokenizer.segment(torch.tensor([[5.0, 6.0]]))
    with pytest.raises(ValueError, match="max_sentence_len"):
        tokenizer.segment(torch.tensor([[5, 6]]), max_sentence_len=0)


# ----------------------------------------------------------------------------- construction


def test_trained_tokenizer_has_opt_layout(tokenizer):
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<s>", "<pad>", "</s>", "<unk>"]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id) == (
        2,
        2,
        1,
        3,
    )
    assert len(tokenizer) == 1024 and tokenizer.max_sentence_len == 16
    assert tokenizer.add_bos_token and not tokenizer.add_eos_token
    assert tokenizer("Hi.")["input_ids"][0] == 2
    assert tokenizer("Hi.", add_special_tokens=False)["input_ids"][0] != 2
    text = "Ünïcödé → 😀 and\ttabs\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_setting_add_eos_token_keeps_the_bos(tokenizer):
    with_eos = copy.deepcopy(tokenizer)
    with_eos.add_eos_token = True
    ids = with_eos("Hi.")["input_ids"]
    assert ids[0] == ids[-1] == 2
    # The appended EOS ends the text: the last token of the sentence it closes.
    sentence_ids = with_eos("Hi.")["sentence_ids"]
    assert sentence_ids[0] == -1 and set(sentence_ids[1:]) == {0}


def test_train_rejects_bad_arguments():
    with pytest.raises(TypeError, match="not one string"):
        train_sentence_tokenizer("just one string")
    with pytest.raises(ValueError, match="vocab_size"):
        train_sentence_tokenizer(["a b c"], vocab_size=100)
    with pytest.raises(ValueError, match="max_sentence_len"):
        train_sentence_tokenizer(["a b c"], vocab_size=300, max_sentence_len=0)
    with pytest.raises(TypeError, match="strings"):
        train_sentence_tokenizer(["a", 3], vocab_size=300)


def test_from_tokenizer_wraps_an_opt_style_gpt2_tokenizer(tokenizer):
    # OPT's tokenizer is a GPT2Tokenizer with "</s>" as BOS/EOS, "<pad>" as padding and a BOS
    # prepended to every text; build one from our vocabulary, as we cannot download OPT's here.
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    opt_like = GPT2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,
        padding_side="left",
    )
    wrapped = SentenceTokenizer.from_tokenizer(opt_like, max_sentence_len=8)
    assert isinstance(wrapped, SentenceTokenizer) and wrapped.max_sentence_len == 8
    assert wrapped.special_tokens_map == opt_like.special_tokens_map
    assert wrapped.padding_side == "left"
    for text in TEXTS:
        assert wrapped(text)["input_ids"] == opt_like(text)["input_ids"]
    batch = wrapped(TEXTS, padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], opt_like(TEXTS, padding=True, return_tensors="pt")["input_ids"])
    assert torch.equal(batch["sentence_ids"], wrapped.segment(batch["input_ids"], batch["attention_mask"]))
    assert "sentence_ids" not in opt_like(TEXTS[0])  # the original is left alone
    with pytest.raises(TypeError, match="fast tokenizer"):
        SentenceTokenizer.from_tokenizer(object())


def test_max_sentence_len_is_validated():
    with pytest.raises(ValueError, match="max_sentence_len"):
        train_sentence_tokenizer(["a b"], vocab_size=300, max_sentence_len=-2)


# ----------------------------------------------------------------------------- save / load


@pytest.fixture(scope="module")
def saved(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "sentence-tokenizer"
    tokenizer.save_pretrained(path)
    return path


def test_save_writes_code_and_auto_map(saved):
    files = {p.name for p in saved.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "tokenization_sentence_lm.py", "segmentation.py"} <= files
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "SentenceTokenizer"
    assert config["max_sentence_len"] == 16
    assert config["auto_map"]["AutoTokenizer"][0] == "tokenization_sentence_lm.SentenceTokenizer"


@pytest.mark.parametrize("loader", [SentenceTokenizer.from_pretrained, AutoTokenizer.from_pretrained])
def test_round_trip(tokenizer, saved, loader):
    # AutoTokenizer needs no remote code here: importing sentence_lm registered the class.
    loaded = loader(saved)
    assert type(loaded) is SentenceTokenizer
    assert loaded.max_sentence_len == 16 and len(loaded) == len(tokenizer)
    assert loaded.special_tokens_map == tokenizer.special_tokens_map
    assert loaded.add_bos_token and not loaded.add_eos_token
    for side in ("left", "right"):
        a = loaded(TEXTS, padding=True, padding_side=side, return_tensors="pt")
        b = tokenizer(TEXTS, padding=True, padding_side=side, return_tensors="pt")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(loaded.boundary_table, tokenizer.boundary_table)


def test_changed_max_sentence_len_is_saved(tokenizer, tmp_path):
    changed = copy.deepcopy(tokenizer)
    changed.max_sentence_len = 5
    changed.save_pretrained(tmp_path)
    assert SentenceTokenizer.from_pretrained(tmp_path).max_sentence_len == 5
    assert SentenceTokenizer.from_pretrained(tmp_path, max_sentence_len=7).max_sentence_len == 7


def test_padding_and_truncation_sides_are_saved(tokenizer, tmp_path):
    changed = copy.deepcopy(tokenizer)
    changed.padding_side = changed.truncation_side = "left"
    changed.save_pretrained(tmp_path)
    for loader in (SentenceTokenizer.from_pretrained, AutoTokenizer.from_pretrained):
        loaded = loader(tmp_path)
        assert (loaded.padding_side, loaded.truncation_side) == ("left", "left")
        batch = loaded(TEXTS, padding=True, truncation=True, max_length=6, return_tensors="pt")
        expected = changed(TEXTS, padding=True, truncation=True, max_length=6, return_tensors="pt")
        assert all(torch.equal(batch[k], expected[k]) for k in expected)
    # The session tokenizer may have been switched to left padding by a pipeline: use a copy.
    right = copy.deepcopy(tokenizer)
    right.padding_side = "right"
    right.save_pretrained(tmp_path / "right")
    assert SentenceTokenizer.from_pretrained(tmp_path / "right").padding_side == "right"


# Code run in a fresh interpreter. `python -I` ignores PYTHONPATH and the user site and does not
# put the working directory on sys.path, so the source tree cannot be found that way. An
# installed copy of sentence_lm (plain or editable: a .pth path entry or an import hook from
# setuptools) would still be found, so a meta-path finder placed *first* on sys.meta_path
# refuses `sentence_lm` and its submodules whatever else is installed; the code then checks the
# import really fails. The checkpoint's own code loads as `transformers_modules.*`, which is not
# blocked.
REMOTE_CODE = textwrap.dedent(
    """
    import json, sys

    class BlockSentenceLM:
        def find_spec(self, name, path=None, target=None):
            if name == "sentence_lm" or name.startswith("sentence_lm."):
                raise ImportError("sentence_lm is blocked in this test process")
            return None

    sys.meta_path.insert(0, BlockSentenceLM())
    try:
        import sentence_lm
    except ImportError:
        pass
    else:
        raise SystemExit("sentence_lm is importable; the test must run without it")

    from transformers import AutoTokenizer

    path, texts = sys.argv[1], json.loads(sys.argv[2])
    try:
        AutoTokenizer.from_pretrained(path)
    except ValueError as error:
        refused = "trust_remote_code" in str(error)
    else:
        refused = False
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    out = tok(texts, padding=True, padding_side="left", return_tensors="pt")
    tok.save_pretrained(path + "-again")
    again = AutoTokenizer.from_pretrained(path + "-again", trust_remote_code=True)
    print("\\nRESULT " + json.dumps({
        "module": type(tok).__module__,
        "name": type(tok).__name__,
        "max_sentence_len": tok.max_sentence_len,
        "refused_without_trust": refused,
        "input_ids": out["input_ids"].tolist(),
        "sentence_ids": out["sentence_ids"].tolist(),
        "again": again(texts, padding=True, padding_side="left")["sentence_ids"],
        "sentence_lm_loaded": any(m == "sentence_lm" or m.startswith("sentence_lm.") for m in sys.modules),
    }))
    """
)


@pytest.mark.slow
def test_auto_tokenizer_with_remote_code_without_the_package(tokenizer, saved, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(
        HF_HOME=str(tmp_path / "hf_home"),
        HF_MODULES_CACHE=str(tmp_path / "hf_modules"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        TOKENIZERS_PARALLELISM="false",
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", REMOTE_CODE, str(saved), json.dumps(TEXTS)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    out = json.loads(result.stdout.split("\nRESULT ", 1)[1])
    assert out["module"].startswith("transformers_modules.")
    assert out["name"] == "SentenceTokenizer" and out["max_sentence_len"] == 16
    assert out["refused_without_trust"]
    assert not out["sentence_lm_loaded"]
    local = tokenizer(TEXTS, padding=True, padding_side="left", return_tensors="pt")
    assert out["input_ids"] == local["input_ids"].tolist()
    assert out["sentence_ids"] == local["sentence_ids"].tolist() == out["again"]


# ----------------------------------------------------------------------------- corpus helpers
# (the corpus feeds the trained tokenizer; its helpers are tested here)


def test_default_corpus_is_prose_and_deterministic():
    corpus = default_corpus()
    assert corpus == default_corpus()
    assert len(corpus) > 500 and sum(map(len, corpus)) > 100_000
    assert all(len(p) >= 80 and "\n" not in p and p == p.strip() for p in corpus)
    # reST markup is gone ("**" stays where the text quotes Python code: "**kwargs").
    assert not any(re.search(r"\*\*[A-Za-z][^*\"]*\*\*", p) or p.startswith(("* ", "[1]")) for p in corpus)
    assert any(p.startswith("Assert statements are a convenient way") for p in corpus)


def test_read_text_lines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("\ufeffone\r\ntwo\n\nthree\rfour\n".encode())
    assert read_text_lines(path) == ["one", "two", "", "three", "four"]
    path.write_bytes(b"no final newline")
    assert read_text_lines(path) == ["no final newline"]
    path.write_bytes(b"")
    assert read_text_lines(path) == []


def test_split_train_validation_takes_the_last_tenth():
    lines = [str(i) for i in range(30)]
    train, validation = split_train_validation(lines)
    assert train == lines[:27] and validation == lines[27:]
    assert split_train_validation(lines[:10], 0.7) == (lines[:3], lines[3:10])
    assert split_train_validation([], 0.1) == ([], [])
    assert split_train_validation(lines[:5], 0.1) == (lines[:5], [])
    with pytest.raises(ValueError):
        split_train_validation(lines, 1.5)


def test_group_paragraphs_keeps_inner_newlines():
    lines = ["", "First line", "second line", "   ", "", "Next", "", "", "Last\r"]
    assert group_paragraphs(lines) == ["First line\nsecond line", "Next", "Last"]
    assert group_paragraphs([]) == [] and group_paragraphs(["", " "]) == []
